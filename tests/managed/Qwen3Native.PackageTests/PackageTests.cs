using System.Text.RegularExpressions;
using System.Xml.Linq;
using NUnit.Framework.Interfaces;

namespace Qwen3Native.PackageTests;

/// <summary>
/// The Qwen3Native package from out/packages, installed into a fresh console app the way a user installs it, generates
/// transformers' greedy tokens on tests/fixtures/qwen3/real_vocab_tiny with the engine the package carries, in a portable
/// build (the engine under runtimes/linux-x64/native) and in a build for linux-x64 (the engine beside the app).
/// </summary>
[TestFixture]
[NonParallelizable]
public sealed class PackageTests
{
    private const string PackageId = "Qwen3Native";
    private const string NativeFile = "libqwen3native.so";

    // A short generation: enough to show the package's engine runs the model as transformers does, in seconds.
    private const int Tokens = 8;

    // As in the façade's tests: steps whose top1-top2 margin is below this may legitimately differ, so the fixture must
    // not have one among the steps compared here.
    private const double MarginTolerance = 1e-3;

    private string _work = "";
    private string _app = "";
    private string _packages = "";
    private string _packagePath = "";
    private int[] _prompt = [];
    private int[] _expected = [];

    [OneTimeSetUp]
    public void CreateConsumerApp()
    {
        if (!File.Exists(Repository.NativeLibrary))
            Assert.Fail($"The native engine {Repository.NativeLibrary} is not built, so there is no package to test: run " +
                "`dotnet run build.cs -- native` first (then `bash build/pack.sh`, or let this test pack).");

        var (prompt, greedy, margins) = Repository.ReferenceCase();
        Assert.That(margins.Take(Tokens), Is.All.GreaterThanOrEqualTo(MarginTolerance),
            $"reference.json: the first {Tokens} greedy steps must be decided by a clear margin to be compared exactly");
        _prompt = prompt;
        _expected = greedy.Take(Tokens).ToArray();

        _packagePath = FreshPackage();

        _work = Path.Combine(Path.GetTempPath(), "q3n-package-" + Guid.NewGuid().ToString("N"));
        _app = Path.Combine(_work, "app");
        _packages = Path.Combine(_work, "nuget-packages");
        Directory.CreateDirectory(_work);
        TestContext.Progress.WriteLine($"consumer app in {_app}");

        // Read before this test's nuget.config exists, so that they are the sources of the user's and machine's configs.
        var sources = MachineSources();
        Commands.RunChecked(Commands.Dotnet, ["new", "console", "--name", "App", "--output", _app, "--framework", "net10.0", "--no-restore"],
            _work, AppEnvironment);
        WriteNuGetConfig(sources);
        string version = Path.GetFileNameWithoutExtension(_packagePath)[(PackageId.Length + 1)..];
        Commands.RunChecked(Commands.Dotnet, ["add", Path.Combine(_app, "App.csproj"), "package", PackageId, "--version", version, "--no-restore"],
            _app, AppEnvironment);
        File.Copy(Path.Combine(TestContext.CurrentContext.TestDirectory, "ConsumerApp", "Program.cs"), Path.Combine(_app, "Program.cs"), overwrite: true);
    }

    [OneTimeTearDown]
    public void DeleteConsumerApp()
    {
        if (_work.Length == 0 || !Directory.Exists(_work))
            return;
        // Left behind on failure, to rerun the commands by hand (the nuget.config names the same package folder).
        if (TestContext.CurrentContext.Result.Outcome.Status == TestStatus.Failed)
        {
            TestContext.Progress.WriteLine($"kept {_work} for inspection");
            return;
        }
        try
        {
            Directory.Delete(_work, recursive: true);
        }
        catch (IOException)
        {
            // The OS cleans the temp folder; a failed cleanup is not a failed test.
        }
    }

    [Test]
    public void PortableBuildLoadsTheEngineFromRuntimesFolder()
    {
        var run = Commands.RunChecked(Commands.Dotnet,
            ["run", "--configuration", "Release", "--disable-build-servers", "--", Repository.FixtureDirectory, string.Join(',', _prompt), Tokens.ToString()],
            _app, AppEnvironment);

        string output = Path.Combine(_app, "bin", "Release", "net10.0");
        CheckRun(run, Path.Combine(output, "runtimes", "linux-x64", "native", NativeFile));
    }

    [Test]
    public void LinuxX64BuildLoadsTheEngineBesideTheApp()
    {
        Commands.RunChecked(Commands.Dotnet, ["build", "--configuration", "Release", "--runtime", "linux-x64", "--disable-build-servers"],
            _app, AppEnvironment);
        string output = Path.Combine(_app, "bin", "Release", "net10.0", "linux-x64");
        var run = Commands.RunChecked(Commands.Dotnet,
            [Path.Combine(output, "App.dll"), Repository.FixtureDirectory, string.Join(',', _prompt), Tokens.ToString()],
            _app, AppEnvironment);

        CheckRun(run, Path.Combine(output, NativeFile));
    }

    private void CheckRun(CommandResult run, string expectedLibrary)
    {
        var tokens = Regex.Match(run.Output, @"^tokens: (?<ids>[0-9,]*)$", RegexOptions.Multiline);
        Assert.That(tokens.Success, Is.True, $"the app printed no token line; {run}");
        int[] ids = tokens.Groups["ids"].Value.Split(',', StringSplitOptions.RemoveEmptyEntries).Select(int.Parse).ToArray();
        Assert.That(ids, Is.EqualTo(_expected), $"greedy tokens must be transformers' first {Tokens} (reference.json cases[0]); {run}");

        var libraries = Regex.Matches(run.Output, @"^library: (?<path>.+)$", RegexOptions.Multiline).Select(m => m.Groups["path"].Value.Trim()).ToArray();
        Assert.That(libraries, Is.EqualTo(new[] { expectedLibrary }),
            $"the engine must be loaded from the package's copy in the app's output; {run}");
        Assert.That(File.ReadAllBytes(expectedLibrary), Is.EqualTo(File.ReadAllBytes(Repository.NativeLibrary)),
            $"{expectedLibrary} must be the engine in {Repository.NativeLibrary}: the package is older than the build");
    }

    /// <summary>The package of the checkout's version in out/packages, packed again by build/pack.sh when it is missing or older than its inputs.</summary>
    private static string FreshPackage()
    {
        string version = Commands.RunChecked(Commands.Dotnet,
            ["msbuild", Repository.ProjectFile, "-p:Configuration=Release", "-getProperty:PackageVersion"], Repository.Root).Output.Trim();
        string package = Path.Combine(Repository.PackagesDirectory, $"{PackageId}.{version}.nupkg");
        DateTime inputs = Repository.PackageInputsWrittenUtc();
        if (File.Exists(package) && File.GetLastWriteTimeUtc(package) >= inputs)
        {
            TestContext.Progress.WriteLine($"using {package} (newer than its inputs)");
            return package;
        }
        TestContext.Progress.WriteLine($"{package} is missing or older than its inputs: packing");
        // The normal package folder, not this test's: pack restores the project in place, and its obj/ must keep
        // pointing at the developer's packages.
        var pack = Commands.RunChecked("bash", [Repository.PackScript], Repository.Root);
        string printed = pack.Output.TrimEnd().Split('\n')[^1].Trim();
        Assert.That(printed, Is.EqualTo(package), $"build/pack.sh must print the package it wrote; {pack}");
        return package;
    }

    /// <summary>
    /// The enabled package sources of the user's and machine's NuGet configs (~/.nuget/NuGet/NuGet.Config here: the
    /// registry that serves the package's dependencies), by name, so that credentials kept under that name still apply.
    /// </summary>
    private List<(string Name, string Url)> MachineSources()
    {
        var list = Commands.RunChecked(Commands.Dotnet, ["nuget", "list", "source"], _work, AppEnvironment);
        // "  1.  nuget.org [Enabled]" then the URL on the next line.
        var lines = list.Output.Split('\n').Select(l => l.Trim()).Where(l => l.Length > 0).ToArray();
        var sources = new List<(string, string)>();
        for (int i = 0; i + 1 < lines.Length; i++)
        {
            var m = Regex.Match(lines[i], @"^\d+\.\s+(?<name>.+?)\s+\[(?<state>[^\]]+)\]$");
            if (m.Success && m.Groups["state"].Value == "Enabled")
                sources.Add((m.Groups["name"].Value, lines[i + 1]));
        }
        Assert.That(sources, Is.Not.Empty,
            $"no enabled NuGet source is configured, so Qwen3Native's dependencies cannot be restored; {list}");
        return sources;
    }

    private void WriteNuGetConfig(List<(string Name, string Url)> machineSources)
    {
        // <clear/> and then the local folder first: only this checkout's package can answer for Qwen3Native.
        var sources = new XElement("packageSources",
            new XElement("clear"),
            new XElement("add", new XAttribute("key", "qwen3native-local"), new XAttribute("value", Repository.PackagesDirectory)));
        foreach (var (name, url) in machineSources)
            sources.Add(new XElement("add", new XAttribute("key", name), new XAttribute("value", url)));
        // The package folder here as well as in NUGET_PACKAGES, so that the commands rerun by hand in a kept directory
        // are isolated the same way.
        var config = new XElement("config",
            new XElement("add", new XAttribute("key", "globalPackagesFolder"), new XAttribute("value", _packages)));
        new XDocument(new XElement("configuration", sources, config)).Save(Path.Combine(_app, "nuget.config"));
    }

    /// <summary>
    /// The consuming app's package folder is empty at first, so a Qwen3Native of the same version cached by an earlier
    /// restore can never stand in for the package under test.
    /// </summary>
    private IReadOnlyDictionary<string, string?> AppEnvironment => new Dictionary<string, string?> { ["NUGET_PACKAGES"] = _packages };
}
