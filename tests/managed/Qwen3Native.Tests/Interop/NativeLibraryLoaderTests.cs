using Qwen3Native.Interop;

namespace Qwen3Native.Tests.Interop;

/// <summary>The loader's search and its failure message, exercised without disturbing the library the
/// other tests use: Probe takes the environment value and base directory as arguments.</summary>
[TestFixture]
public class NativeLibraryLoaderTests
{
    private string _empty = null!;

    [SetUp]
    public void CreateEmptyDirectory()
    {
        _empty = Path.Combine(Path.GetTempPath(), "q3n-loader-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(_empty);
    }

    [TearDown]
    public void DeleteEmptyDirectory() => Directory.Delete(_empty, recursive: true);

    [Test]
    public void CandidatesFollowTheDocumentedOrder()
    {
        var candidates = NativeLibraryLoader.CandidatePaths(_empty, "/app", ["debian.12-x64", "linux-x64"]);
        string file = NativeLibraryLoader.LibraryFileName;
        Assert.That(candidates.Select(c => c.Path), Is.EqualTo(new[]
        {
            Path.Combine(_empty, file),
            Path.Combine("/app", file),
            Path.Combine("/app", "runtimes", "debian.12-x64", "native", file),
            Path.Combine("/app", "runtimes", "linux-x64", "native", file),
        }));
        Assert.That(candidates[0].Origin, Is.EqualTo(NativeLibraryLoader.PathVariable));
    }

    [Test]
    public void RuntimeIdentifiersIncludeThePortableOne()
    {
        Assert.That(NativeLibraryLoader.RuntimeIdentifiers(), Does.Contain(NativeLibraryLoader.PortableRuntimeIdentifier));
        Assert.That(NativeLibraryLoader.RuntimeIdentifiers()[0], Is.EqualTo(System.Runtime.InteropServices.RuntimeInformation.RuntimeIdentifier));
    }

    [Test]
    public void MessageForAMissingEnvironmentPathListsEveryAttemptAndTheLikelyCauses()
    {
        string missing = Path.Combine(_empty, "nowhere", NativeLibraryLoader.LibraryFileName);
        var attempts = new List<NativeLibraryLoader.ProbeAttempt>();
        nint handle = NativeLibraryLoader.Probe(missing, _empty, ["linux-x64"], attempts, defaultProbe: null, out string? origin);
        Assert.That(handle, Is.EqualTo((nint)0));
        Assert.That(origin, Is.Null);

        string message = NativeLibraryLoader.BuildNotFoundMessage(attempts, missing);
        TestContext.Out.WriteLine(message);
        Assert.That(attempts, Has.Count.EqualTo(3));
        Assert.That(message, Does.Contain($"{missing} ({NativeLibraryLoader.PathVariable}): does not exist"));
        Assert.That(message, Does.Contain(Path.Combine(_empty, NativeLibraryLoader.LibraryFileName)));
        Assert.That(message, Does.Contain(Path.Combine(_empty, "runtimes", "linux-x64", "native")));
        Assert.That(message, Does.Contain($"{NativeLibraryLoader.PathVariable} is set to '{missing}', which does not exist"));
        Assert.That(message, Does.Contain("dotnet run build.cs -- native"));
        Assert.That(message, Does.Contain("RID"));
        Assert.That(message, Does.Contain("CUDA"));
        Assert.That(message, Does.Contain("libstdc++"));
    }

    [Test]
    public void DefaultProbingIsTriedLastAndReported()
    {
        var attempts = new List<NativeLibraryLoader.ProbeAttempt>();
        bool called = false;
        nint handle = NativeLibraryLoader.Probe(null, _empty, [], attempts, () => { called = true; return 0; }, out _);
        Assert.That(called, Is.True);
        Assert.That(handle, Is.EqualTo((nint)0));
        Assert.That(attempts.Last().Location, Does.Contain("default probing"));
    }

    [Test]
    public void AFileThatIsNotALibraryReportsTheLoadersReason()
    {
        string bogus = Path.Combine(_empty, NativeLibraryLoader.LibraryFileName);
        File.WriteAllText(bogus, "not an ELF file");
        var attempts = new List<NativeLibraryLoader.ProbeAttempt>();
        nint handle = NativeLibraryLoader.Probe(null, _empty, [], attempts, defaultProbe: null, out _);
        Assert.That(handle, Is.EqualTo((nint)0));
        Assert.That(attempts[0].Outcome, Is.Not.EqualTo("does not exist").And.Not.Empty);
    }

    [Test]
    public void EnvironmentDirectoryWithTheLibraryWinsOverEverythingElse()
    {
        // The test's own directory holds the library copied from out/build.
        string here = TestContext.CurrentContext.TestDirectory;
        var attempts = new List<NativeLibraryLoader.ProbeAttempt>();
        nint handle = NativeLibraryLoader.Probe(here, _empty, [], attempts, defaultProbe: null, out string? origin);
        Assert.That(handle, Is.Not.EqualTo((nint)0), string.Join("\n", attempts));
        Assert.That(origin, Is.EqualTo(Path.Combine(here, NativeLibraryLoader.LibraryFileName)));
        Assert.That(attempts, Is.Empty);
        System.Runtime.InteropServices.NativeLibrary.Free(handle);
    }

    [TestCase(NativeMethods.AbiVersion)]
    [TestCase(NativeMethods.AbiVersion + 998)]
    public void AbiCheckAcceptsOnlyTheBindingsVersion(uint abi)
    {
        // A stand-in library that exports only q3n_abi_version, built with the C++ compiler the native build uses.
        string source = Path.Combine(_empty, "fake.c"), library = Path.Combine(_empty, "libfake.so");
        File.WriteAllText(source, $"unsigned q3n_abi_version(void) {{ return {abi}u; }}\n");
        var psi = new System.Diagnostics.ProcessStartInfo("g++", $"-x c -shared -fPIC -o \"{library}\" \"{source}\"") { RedirectStandardError = true };
        using (var compiler = System.Diagnostics.Process.Start(psi)!)
        {
            string errors = compiler.StandardError.ReadToEnd();
            compiler.WaitForExit();
            Assert.That(compiler.ExitCode, Is.Zero, errors);
        }
        nint handle = System.Runtime.InteropServices.NativeLibrary.Load(library);
        if (abi != NativeMethods.AbiVersion)
        {
            var e = Assert.Throws<InvalidOperationException>(() => NativeLibraryLoader.CheckAbi(handle, library));
            Assert.That(e!.Message, Does.Contain(library).And.Contain($"ABI version {abi}"));
        }
        else
        {
            Assert.DoesNotThrow(() => NativeLibraryLoader.CheckAbi(handle, library));
            System.Runtime.InteropServices.NativeLibrary.Free(handle);
        }
    }

    [Test]
    public void AbiMismatchMessageNamesBothVersionsAndTheFix()
    {
        string message = NativeLibraryLoader.AbiMismatchMessage("/opt/lib/libqwen3native.so", NativeMethods.AbiVersion + 1);
        Assert.That(message, Does.Contain("/opt/lib/libqwen3native.so"));
        Assert.That(message, Does.Contain($"ABI version {NativeMethods.AbiVersion + 1}"));
        Assert.That(message, Does.Contain($"ABI version {NativeMethods.AbiVersion}."));
        Assert.That(message, Does.Contain("dotnet run build.cs -- native"));
    }
}
