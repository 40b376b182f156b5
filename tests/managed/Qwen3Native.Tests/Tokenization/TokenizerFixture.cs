using Qwen3Native.Tokenization;

namespace Qwen3Native.Tests.Tokenization;

/// <summary>
/// Locates tests/fixtures/tokenizer (the gold cases) and loads the real Qwen3 tokenizer once for all tests. The
/// tokenizer files themselves live once in the repository, beside the real-vocabulary test model.
/// </summary>
internal static class TokenizerFixture
{
    private static readonly Lazy<string> s_dir = new(FindDirectory);
    private static readonly Lazy<Qwen3Tokenizer> s_tokenizer = new(() => Qwen3Tokenizer.FromFile(TokenizerJsonPath));

    public static string Directory => s_dir.Value;

    public static string TokenizerJsonPath => Path.Combine(Directory, "..", "qwen3", "real_vocab_tiny", "tokenizer.json");

    public static string GoldPath => Path.Combine(Directory, "gold.json");

    public static Qwen3Tokenizer Tokenizer => s_tokenizer.Value;

    private static string FindDirectory()
    {
        for (var dir = new DirectoryInfo(TestContext.CurrentContext.TestDirectory); dir is not null; dir = dir.Parent)
        {
            string candidate = Path.Combine(dir.FullName, "tests", "fixtures", "tokenizer");
            if (File.Exists(Path.Combine(candidate, "make_gold.py"))) return candidate;
        }
        throw new InvalidOperationException("tests/fixtures/tokenizer not found above " + TestContext.CurrentContext.TestDirectory);
    }

    /// <summary>Id of a vocabulary entry given in byte-level form; fails the test if it is missing.</summary>
    public static int Id(string token)
    {
        int? id = Tokenizer.TokenToId(token);
        Assert.That(id, Is.Not.Null, $"token '{token}' should be in the vocabulary");
        return id!.Value;
    }
}
