namespace Qwen3Native.Tests.Interop;

/// <summary>The checkout the tests run from: the first directory above the test binaries holding tests/fixtures.</summary>
internal static class RepositoryRoot
{
    private static readonly Lazy<string> s_path = new(Find);

    public static string Path => s_path.Value;

    public static string Combine(params string[] parts) => System.IO.Path.Combine([Path, .. parts]);

    private static string Find()
    {
        for (var dir = new DirectoryInfo(TestContext.CurrentContext.TestDirectory); dir is not null; dir = dir.Parent)
        {
            if (Directory.Exists(System.IO.Path.Combine(dir.FullName, "tests", "fixtures")))
                return dir.FullName;
        }
        throw new InvalidOperationException("no directory containing tests/fixtures above " + TestContext.CurrentContext.TestDirectory);
    }
}
