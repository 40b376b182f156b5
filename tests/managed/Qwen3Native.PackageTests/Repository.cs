using System.Text.Json;

namespace Qwen3Native.PackageTests;

/// <summary>The checkout this test runs from: where the engine, the package and the fixture are.</summary>
internal static class Repository
{
    private static readonly Lazy<string> s_root = new(FindRoot);

    public static string Root => s_root.Value;

    /// <summary>What `dotnet run build.cs -- native` writes (a symlink to the versioned file).</summary>
    public static string NativeLibrary => Path.Combine(Root, "out", "build", "libqwen3native.so");

    public static string PackagesDirectory => Path.Combine(Root, "out", "packages");

    public static string ProjectFile => Path.Combine(Root, "managed", "Qwen3Native", "Qwen3Native.csproj");

    public static string PackScript => Path.Combine(Root, "build", "pack.sh");

    public static string FixtureDirectory => Path.Combine(Root, "tests", "fixtures", "qwen3", "real_vocab_tiny");

    /// <summary>
    /// The newest write time of anything the package is made from. A package older than this does not contain the
    /// current engine or façade, and testing it would test something else than the checkout.
    /// </summary>
    public static DateTime PackageInputsWrittenUtc()
    {
        string managed = Path.GetDirectoryName(ProjectFile)!;
        var inputs = new List<string>
        {
            ResolveLinks(NativeLibrary),
            ProjectFile,
            Path.Combine(Root, "README.md"),
            Path.Combine(Root, "bindings", "NativeMethods.g.cs"),
        };
        string bin = Path.Combine(managed, "bin") + Path.DirectorySeparatorChar;
        string obj = Path.Combine(managed, "obj") + Path.DirectorySeparatorChar;
        inputs.AddRange(Directory.EnumerateFiles(managed, "*.cs", SearchOption.AllDirectories)
            .Where(f => !f.StartsWith(bin, StringComparison.Ordinal) && !f.StartsWith(obj, StringComparison.Ordinal)));
        // The link's own time is when CMake last relinked it, not when the library changed: compare the file it names.
        return inputs.Where(File.Exists).Max(File.GetLastWriteTimeUtc);
    }

    public static string ResolveLinks(string path) =>
        new FileInfo(path).ResolveLinkTarget(returnFinalTarget: true)?.FullName ?? path;

    /// <summary>cases[0] of the fixture's reference.json: the chat prompt's ids and transformers' greedy continuation.</summary>
    public static (int[] PromptIds, int[] GreedyTokens, double[] Margins) ReferenceCase()
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(FixtureDirectory, "reference.json")));
        var c = doc.RootElement.GetProperty("cases")[0];
        var greedy = c.GetProperty("greedy");
        return (
            c.GetProperty("prompt_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray(),
            greedy.GetProperty("tokens").EnumerateArray().Select(e => e.GetInt32()).ToArray(),
            greedy.GetProperty("margins").EnumerateArray().Select(e => e.GetDouble()).ToArray());
    }

    private static string FindRoot()
    {
        for (var dir = new DirectoryInfo(TestContext.CurrentContext.TestDirectory); dir is not null; dir = dir.Parent)
        {
            if (File.Exists(Path.Combine(dir.FullName, "build.cs")) && File.Exists(Path.Combine(dir.FullName, "Qwen3Native.sln")))
                return dir.FullName;
        }
        throw new InvalidOperationException("The repository root (build.cs beside Qwen3Native.sln) is not above " + TestContext.CurrentContext.TestDirectory);
    }
}
