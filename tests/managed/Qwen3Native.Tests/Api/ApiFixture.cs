using System.Text.Json;

namespace Qwen3Native.Tests.Api;

/// <summary>
/// tests/fixtures/qwen3/real_vocab_tiny: a random-weight Qwen3 with the real vocabulary, tokenizer and hybrid chat
/// template, and reference.json from transformers 5.17 (prompt ids of apply_chat_template(add_generation_prompt=True,
/// enable_thinking=False) and the 32-token greedy continuation with each step's top1-top2 logit margin).
/// </summary>
internal static class ApiFixture
{
    private static readonly Lazy<string> s_dir = new(FindDirectory);
    private static readonly Lazy<IReadOnlyList<ReferenceCase>> s_cases = new(LoadCases);

    public static string Directory => s_dir.Value;

    public static IReadOnlyList<ReferenceCase> Cases => s_cases.Value;

    /// <summary>
    /// Steps whose top1-top2 margin is below this are where a correct engine may legitimately pick the other token: the
    /// engine's logits match transformers' to about 1e-5 on this fixture (the C++ suites check relative L2 &lt; 1e-4), so
    /// margins of 1e-3 and more are decided the same way by both, and smaller ones are not compared.
    /// </summary>
    public const double MarginTolerance = 1e-3;

    /// <summary>Model loads in the tests use two threads: the CI machine has two cores and tests may run side by side.</summary>
    public static ModelOptions Options(int contextLength = 0, long kvCacheTokens = 0) =>
        new() { Device = Qwen3Device.Cpu, Threads = 2, ContextLength = contextLength, KvCacheTokens = kvCacheTokens };

    public static Qwen3Model Load(int contextLength = 0, long kvCacheTokens = 0) =>
        Qwen3Model.Load(Directory, Options(contextLength, kvCacheTokens));

    /// <summary>The generated tokens that transformers' greedy choice fixes: those before the first step whose margin is below the tolerance.</summary>
    public static int ComparableSteps(ReferenceCase c)
    {
        int n = 0;
        while (n < c.Margins.Count && c.Margins[n] >= MarginTolerance)
            n++;
        return n;
    }

    /// <summary>A fresh directory under the temp folder, deleted by <see cref="TempDirectory.Dispose"/>.</summary>
    public static TempDirectory NewTempDirectory() => new();

    private static string FindDirectory()
    {
        for (var dir = new DirectoryInfo(TestContext.CurrentContext.TestDirectory); dir is not null; dir = dir.Parent)
        {
            string candidate = Path.Combine(dir.FullName, "tests", "fixtures", "qwen3", "real_vocab_tiny");
            if (File.Exists(Path.Combine(candidate, "reference.json")))
                return candidate;
        }
        throw new InvalidOperationException("tests/fixtures/qwen3/real_vocab_tiny not found above " + TestContext.CurrentContext.TestDirectory);
    }

    private static IReadOnlyList<ReferenceCase> LoadCases()
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(Directory, "reference.json")));
        var cases = new List<ReferenceCase>();
        foreach (var c in doc.RootElement.GetProperty("cases").EnumerateArray())
        {
            var messages = c.GetProperty("messages").EnumerateArray()
                .Select(m => (m.GetProperty("role").GetString()!, m.GetProperty("content").GetString()!))
                .ToArray();
            var greedy = c.GetProperty("greedy");
            cases.Add(new ReferenceCase(
                messages,
                c.GetProperty("prompt_text").GetString()!,
                c.GetProperty("prompt_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray(),
                greedy.GetProperty("tokens").EnumerateArray().Select(e => e.GetInt32()).ToArray(),
                greedy.GetProperty("margins").EnumerateArray().Select(e => e.GetDouble()).ToArray(),
                greedy.GetProperty("text").GetString()!));
        }
        return cases;
    }
}

public sealed record ReferenceCase(
    IReadOnlyList<(string Role, string Content)> Messages,
    string PromptText,
    int[] PromptIds,
    int[] GreedyTokens,
    IReadOnlyList<double> Margins,
    string GreedyText)
{
    public string? SystemPrompt => Messages[0].Role == "system" ? Messages[0].Content : null;

    public string LastUserMessage => Messages[^1].Content;

    public override string ToString() => Messages[^1].Content;
}

internal sealed class TempDirectory : IDisposable
{
    public TempDirectory()
    {
        Path = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "q3n-api-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(Path);
    }

    public string Path { get; }

    public string Write(string name, string content)
    {
        string file = System.IO.Path.Combine(Path, name);
        File.WriteAllText(file, content);
        return file;
    }

    public void CopyFromFixture(string name) =>
        File.Copy(System.IO.Path.Combine(ApiFixture.Directory, name), System.IO.Path.Combine(Path, name));

    public void Dispose()
    {
        try
        {
            Directory.Delete(Path, recursive: true);
        }
        catch (IOException)
        {
            // Left for the OS to clean; a failed cleanup must not fail a test.
        }
    }
}
