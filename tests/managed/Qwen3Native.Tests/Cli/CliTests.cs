using System.Text.Json;
using Qwen3Native.Cli;
using Qwen3Native.Tests.Api;
using Qwen3Native.Tokenization;

namespace Qwen3Native.Tests.Cli;

/// <summary>The qwen3 command line, run in-process on strings, against the real-vocabulary fixture.</summary>
[TestFixture]
public sealed class CliTests
{
    private static readonly Lazy<Qwen3Tokenizer> s_tokenizer = new(() => Qwen3Tokenizer.FromFile(Path.Combine(ApiFixture.Directory, "tokenizer.json")));

    private static string Model => ApiFixture.Directory;

    // Two threads and the CPU, as every model load in the tests (the CI machine has two cores).
    private static readonly string[] s_load = ["--device", "cpu", "--threads", "2"];

    internal sealed record Run(int ExitCode, string Out, string Error)
    {
        public JsonElement Json => JsonDocument.Parse(Out).RootElement;

        public override string ToString() => $"exit {ExitCode}\nstdout: {Out}\nstderr: {Error}";
    }

    private static async Task<Run> RunWithInputAsync(string stdin, string[] args)
    {
        using var output = new StringWriter();
        using var error = new StringWriter();
        int code = await Qwen3Native.Cli.Cli.RunAsync(args, new StringReader(stdin), output, error);
        return new Run(code, output.ToString(), error.ToString());
    }

    private static Task<Run> RunAsync(params string[] args) => RunWithInputAsync("", args);

    private static string Ids(IEnumerable<int> ids) => string.Join(",", ids);

    [Test]
    public async Task TokenizeJsonEqualsTheTokenizersIds()
    {
        const string text = "Hello, world! <|im_start|>user\nÉcris un haïku 🌊 你好\n\n  spaces";
        var run = await RunAsync("tokenize", "--model", Model, "--text", text, "--json");

        Assert.That(run.ExitCode, Is.Zero, run.ToString());
        Assert.That(run.Error, Is.Empty);
        Assert.That(run.Out.Trim(), Does.StartWith("[").And.EndWith("]"), "--json prints the array and nothing else");
        var ids = run.Json.EnumerateArray().Select(e => e.GetInt32()).ToArray();
        Assert.That(ids, Is.EqualTo(s_tokenizer.Value.Encode(text)));
        Assert.That(ids, Does.Contain(151644), "special tokens in the text are recognised");
    }

    [Test]
    public async Task TokenizeAFileWithoutJsonPrintsIdsForPromptIds()
    {
        using var dir = ApiFixture.NewTempDirectory();
        string file = dir.Write("prompt.txt", "The capital of France is");
        var run = await RunAsync("tokenize", "-m", Model, "--text-file", file);

        Assert.That(run.ExitCode, Is.Zero, run.ToString());
        Assert.That(run.Out.TrimEnd(), Is.EqualTo(Ids(s_tokenizer.Value.Encode("The capital of France is"))));
    }

    [TestCaseSource(typeof(ApiFixture), nameof(ApiFixture.Cases))]
    public async Task GenerateFromPromptIdsGivesTransformersGreedyIds(ReferenceCase c)
    {
        int steps = Math.Min(8, ApiFixture.ComparableSteps(c));
        Assume.That(steps, Is.GreaterThan(0));
        var run = await RunAsync(["generate", "--model", Model, .. s_load, "--prompt-ids", Ids(c.PromptIds),
            "--max-tokens", "8", "--temperature", "0", "--json"]);

        Assert.That(run.ExitCode, Is.Zero, run.ToString());
        var json = run.Json;
        var ids = json.GetProperty("ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
        Assert.That(ids, Has.Length.EqualTo(8));
        Assert.That(ids.Take(steps), Is.EqualTo(c.GreedyTokens.Take(steps)));
        Assert.That(json.GetProperty("text").GetString(), Is.EqualTo(s_tokenizer.Value.Decode(ids)));
        Assert.That(json.GetProperty("finish_reason").GetString(), Is.EqualTo("length"));
        Assert.That(json.GetProperty("usage").GetProperty("prompt_tokens").GetInt32(), Is.EqualTo(c.PromptIds.Length));
        Assert.That(json.TryGetProperty("logprobs", out _), Is.False, "only with --logprobs");
    }

    [Test]
    public async Task LogprobsAddEntriesWhoseBestAlternativeIsTheGreedyToken()
    {
        var c = ApiFixture.Cases[0];
        var run = await RunAsync(["generate", "--model", Model, .. s_load, "--prompt-ids", Ids(c.PromptIds),
            "--max-tokens", "8", "--temperature", "0", "--json", "--logprobs", "3", "--prompt-logprobs"]);

        Assert.That(run.ExitCode, Is.Zero, run.ToString());
        var json = run.Json;
        var ids = json.GetProperty("ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
        var logprobs = json.GetProperty("logprobs").EnumerateArray().ToArray();
        Assert.That(logprobs, Has.Length.EqualTo(ids.Length));
        for (int i = 0; i < logprobs.Length; i++)
        {
            var entry = logprobs[i];
            var top = entry.GetProperty("top").EnumerateArray().ToArray();
            Assert.That(entry.GetProperty("id").GetInt32(), Is.EqualTo(ids[i]));
            Assert.That(top, Has.Length.EqualTo(3));
            Assert.That(top[0].GetProperty("id").GetInt32(), Is.EqualTo(ids[i]), "greedy takes the most likely token");
            Assert.That(top[0].GetProperty("logprob").GetDouble(), Is.EqualTo(entry.GetProperty("logprob").GetDouble()));
            Assert.That(top[1].GetProperty("logprob").GetDouble(), Is.LessThanOrEqualTo(top[0].GetProperty("logprob").GetDouble()));
            Assert.That(entry.GetProperty("text").GetString(), Is.EqualTo(s_tokenizer.Value.Decode(ids[i])));
        }
        Assert.That(ids.Take(ApiFixture.ComparableSteps(c)), Is.EqualTo(c.GreedyTokens.Take(Math.Min(8, ApiFixture.ComparableSteps(c)))));
        var prompt = json.GetProperty("prompt_logprobs").EnumerateArray().Select(e => e.GetProperty("id").GetInt32()).ToArray();
        Assert.That(prompt, Is.EqualTo(c.PromptIds.Skip(1)));
    }

    [Test]
    public async Task StatsHaveExactCountsAndTimings()
    {
        var c = ApiFixture.Cases[1];
        var run = await RunAsync(["generate", "--model", Model, .. s_load, "--prompt-ids", Ids(c.PromptIds),
            "--max-tokens", "6", "--temperature", "0", "--json", "--stats"]);

        Assert.That(run.ExitCode, Is.Zero, run.ToString());
        var stats = run.Json.GetProperty("stats");
        Assert.That(stats.GetProperty("prompt_tokens").GetInt32(), Is.EqualTo(c.PromptIds.Length));
        Assert.That(stats.GetProperty("cached_tokens").GetInt32(), Is.Zero);
        Assert.That(stats.GetProperty("generated_tokens").GetInt32(), Is.EqualTo(6));
        Assert.That(stats.GetProperty("time_to_first_token_ms").GetDouble(), Is.GreaterThan(0));
        Assert.That(stats.GetProperty("decode_tokens_per_s").GetDouble(), Is.GreaterThan(0));
        var usage = run.Json.GetProperty("usage");
        Assert.That(usage.GetProperty("prompt_tokens").GetInt32(), Is.EqualTo(c.PromptIds.Length));
        Assert.That(usage.GetProperty("generated_tokens").GetInt32(), Is.EqualTo(6));
    }

    [Test]
    public async Task WithoutJsonTheTextStreamsToStdoutAndStatsGoToStderr()
    {
        var c = ApiFixture.Cases[0];
        var run = await RunAsync(["generate", "--model", Model, .. s_load, "--prompt-ids", Ids(c.PromptIds),
            "--max-tokens", "8", "--temperature", "0", "--stats"]);

        Assert.That(run.ExitCode, Is.Zero, run.ToString());
        Assert.That(run.Out, Is.EqualTo(s_tokenizer.Value.Decode(c.GreedyTokens.Take(8).ToArray()) + Environment.NewLine));
        Assert.That(run.Error, Does.Contain("time to first token").And.Contain("generated 8").And.Contain("finish: length"));
    }

    [Test]
    public async Task ChatPromptsAreRenderedWithTheTemplate()
    {
        // reference.json's prompts are apply_chat_template(enable_thinking=False): --chat --no-think renders the same.
        var c = ApiFixture.Cases[0];
        var run = await RunAsync(["generate", "--model", Model, .. s_load, "--prompt", c.LastUserMessage, "--chat", "--no-think",
            "--max-tokens", "8", "--temperature", "0", "--json"]);

        Assert.That(run.ExitCode, Is.Zero, run.ToString());
        var json = run.Json;
        Assert.That(json.GetProperty("usage").GetProperty("prompt_tokens").GetInt32(), Is.EqualTo(c.PromptIds.Length));
        var ids = json.GetProperty("ids").EnumerateArray().Select(e => e.GetInt32()).ToArray();
        int steps = Math.Min(8, ApiFixture.ComparableSteps(c));
        Assert.That(ids.Take(steps), Is.EqualTo(c.GreedyTokens.Take(steps)));
        Assert.That(json.GetProperty("content").GetString(), Is.Not.Null);

        // Without --chat the same words are a raw prompt: far fewer tokens than the templated one.
        var raw = await RunAsync(["generate", "--model", Model, .. s_load, "--prompt", c.LastUserMessage, "--max-tokens", "2", "--json"]);
        Assert.That(raw.Json.GetProperty("usage").GetProperty("prompt_tokens").GetInt32(),
            Is.EqualTo(s_tokenizer.Value.Encode(c.LastUserMessage).Length));
    }

    [Test]
    public async Task InfoDescribesTheCheckpoint()
    {
        var text = await RunAsync(["info", "--model", Model, .. s_load]);
        Assert.That(text.ExitCode, Is.Zero, text.ToString());
        Assert.That(text.Out, Does.Contain("Qwen3ForCausalLM").And.Contain("151645, 151643").And.Contain("Qwen3Hybrid")
            .And.Contain(Qwen3Model.NativeVersion));

        var json = (await RunAsync(["info", "--model", Model, .. s_load, "--json", "--context", "1024"])).Json;
        Assert.That(json.GetProperty("architecture").GetString(), Is.EqualTo("Qwen3ForCausalLM"));
        Assert.That(json.GetProperty("vocab_size").GetInt32(), Is.EqualTo(151936));
        Assert.That(json.GetProperty("layers").GetInt32(), Is.EqualTo(2));
        Assert.That(json.GetProperty("context_length").GetInt32(), Is.EqualTo(1024));
        Assert.That(json.GetProperty("max_position_embeddings").GetInt32(), Is.EqualTo(4096));
        Assert.That(json.GetProperty("eos_token_ids").EnumerateArray().Select(e => e.GetInt32()), Is.EqualTo(new[] { 151645, 151643 }));
        Assert.That(json.GetProperty("weight_dtype").GetString(), Is.EqualTo("BF16"));
        Assert.That(json.GetProperty("chat_template").GetString(), Is.EqualTo("Qwen3Hybrid"));
        Assert.That(json.GetProperty("native_version").GetString(), Is.EqualTo(Qwen3Model.NativeVersion));
    }

    [Test]
    public async Task ChatWithRedirectedInputAnswersAndExits()
    {
        var run = await RunWithInputAsync("hello\n/exit\nnever read\n",
            ["chat", "--model", Model, .. s_load, "--max-tokens", "8", "--temperature", "0", "--stats"]);

        Assert.That(run.ExitCode, Is.Zero, run.ToString());
        Assert.That(run.Out.Trim(), Is.Not.Empty);
        Assert.That(run.Out, Does.Not.Contain("> "), "no prompt is printed when the input is not a terminal");
        Assert.That(run.Out, Does.Not.Contain("\u001b["), "no colour codes when the output is not a terminal");
        Assert.That(run.Error, Does.Contain("generated 8"), "one answer, with its figures");
        Assert.That(run.Error.Split("generated").Length - 1, Is.EqualTo(1), "/exit ends the conversation");
    }

    [Test]
    public async Task ChatKeepsTheConversationAndResetsIt()
    {
        var run = await RunWithInputAsync("hello\nand again\n/reset\nhello\n",
            ["chat", "--model", Model, .. s_load, "--max-tokens", "4", "--temperature", "0", "--no-think", "--stats"]);

        Assert.That(run.ExitCode, Is.Zero, run.ToString());
        var lines = run.Error.Split('\n').Where(l => l.StartsWith("prompt ", StringComparison.Ordinal)).ToArray();
        Assert.That(lines, Has.Length.EqualTo(3), "three answers; the end of the input ends the chat");
        Assert.That(lines[1], Does.Not.Contain("(0 cached)"), "the second turn reuses the first one's tokens");
        Assert.That(run.Error, Does.Contain("(conversation cleared)"));
        // After /reset the same first message renders the same prompt as the first turn.
        Assert.That(lines[2][..lines[2].IndexOf('(')], Is.EqualTo(lines[0][..lines[0].IndexOf('(')]));
    }

    [Test]
    public async Task CtrlCStopsTheAnswerNotTheChat()
    {
        using var error = new StringWriter();
        using var output = new InterruptingWriter();
        var console = new CliConsole(new StringReader("first\nsecond\n"), output, error);
        output.OnFirstText = () => console.Interrupts.Interrupt();

        int code = await Qwen3Native.Cli.Cli.RunAsync(["chat", "--model", Model, .. s_load, "--max-tokens", "200", "--stats"], console);

        Assert.That(code, Is.Zero, error.ToString());
        Assert.That(error.ToString(), Does.Contain("(answer stopped"));
        Assert.That(error.ToString().Split("generated").Length - 1, Is.EqualTo(1), "the second message is still answered");
    }

    [Test]
    public async Task InterruptedGenerateExitsWith130()
    {
        using var error = new StringWriter();
        using var output = new InterruptingWriter();
        var console = new CliConsole(TextReader.Null, output, error);
        output.OnFirstText = () => console.Interrupts.Interrupt();

        int code = await Qwen3Native.Cli.Cli.RunAsync(["generate", "--model", Model, .. s_load, "--prompt", "Hello", "--max-tokens", "500"], console);

        Assert.That(code, Is.EqualTo(130), error.ToString());
        Assert.That(error.ToString().Trim(), Is.EqualTo("qwen3: interrupted."));
    }

    [Test]
    public async Task BenchReportsSpeeds()
    {
        var run = await RunAsync(["bench", "--model", Model, .. s_load, "--prompt-tokens", "32", "--new-tokens", "4", "--json"]);
        Assert.That(run.ExitCode, Is.Zero, run.ToString());
        Assert.That(run.Json.GetProperty("prefill_tokens_per_s").GetDouble(), Is.GreaterThan(0));
        Assert.That(run.Json.GetProperty("decode_tokens_per_s").GetDouble(), Is.GreaterThan(0));
        Assert.That(run.Json.GetProperty("new_tokens").GetInt32(), Is.EqualTo(4));

        var dummy = await RunAsync(["bench", "--model", Model, .. s_load, "--dummy", "--prompt-tokens", "8", "--new-tokens", "2"]);
        Assert.That(dummy.ExitCode, Is.Zero, dummy.ToString());
        Assert.That(dummy.Out, Does.Contain("prefill:").And.Contain("decode:").And.Contain("(dummy)"));
    }

    [TestCase("generate", "--prompt", "hi")]
    [TestCase("info")]
    [TestCase("chat")]
    [TestCase("tokenize", "--text", "hi")]
    public async Task AMissingModelDirectoryExitsWith1AndSaysSo(params string[] args)
    {
        string missing = Path.Combine(Path.GetTempPath(), "q3n-no-such-model-" + Guid.NewGuid().ToString("N"));
        var run = await RunAsync([args[0], "--model", missing, .. args[1..]]);

        Assert.That(run.ExitCode, Is.EqualTo(1), run.ToString());
        Assert.That(run.Error, Does.Contain(missing).And.Contain("does not exist"));
        Assert.That(run.Error.TrimEnd().Split('\n'), Has.Length.EqualTo(1), "one clear line");
        Assert.That(run.Out, Is.Empty);
    }

    [TestCase("generate", "--bogus")]
    [TestCase("generate", "--temperature", "-1")]
    [TestCase("generate", "--logprobs", "21")]
    [TestCase("generate", "--top-p", "0")]
    [TestCase("generate", "--device", "tpu")]
    [TestCase("generate", "--prompt-ids", "1,two")]
    [TestCase("generate", "--chat", "--prompt-ids", "1,2")]
    [TestCase("tokenize")]
    public async Task BadArgumentsExitWith2(params string[] args)
    {
        // Every case but the prompt-less ones also names a prompt, so that only the bad part is wrong.
        string[] prompt = args.Contains("--prompt-ids") || args[0] == "tokenize" ? [] : ["--prompt", "hi"];
        var run = await RunAsync([args[0], "--model", Model, .. prompt, .. args[1..]]);

        Assert.That(run.ExitCode, Is.EqualTo(2), run.ToString());
        Assert.That(run.Error, Does.StartWith("qwen3: "));
        Assert.That(run.Out, Is.Empty);
    }

    [Test]
    public async Task UnknownCommandsAndNoCommandExitWith2()
    {
        Assert.That((await RunAsync("frobnicate")).ExitCode, Is.EqualTo(2));
        Assert.That((await RunAsync()).ExitCode, Is.EqualTo(2));
        var help = await RunAsync("generate", "--help");
        Assert.That(help.ExitCode, Is.Zero);
        Assert.That(help.Out, Does.Contain("--prompt-ids").And.Contain("--logprobs").And.Contain("--temperature"));
    }

    [Test]
    public async Task ValuesTheEngineRefusesAreBadArguments()
    {
        var outside = await RunAsync(["generate", "--model", Model, .. s_load, "--prompt-ids", "999999"]);
        Assert.That(outside.ExitCode, Is.EqualTo(2), outside.ToString());
        Assert.That(outside.Error.Trim(), Is.EqualTo("qwen3: Token id 999999 at index 0 is outside the vocabulary [0, 151936)."));

        var empty = await RunAsync(["generate", "--model", Model, .. s_load, "--prompt", ""]);
        Assert.That(empty.ExitCode, Is.EqualTo(2), empty.ToString());
        Assert.That(empty.Error, Does.Contain("empty"));
    }

    [Test]
    public void StopStringsUnescapeTheCommonSequences()
    {
        Assert.That(CliOptions.Unescape(@"a\nb"), Is.EqualTo("a\nb"));
        Assert.That(CliOptions.Unescape(@"\t\\n"), Is.EqualTo("\t\\n"));
        Assert.That(CliOptions.Unescape(@"C:\x"), Is.EqualTo(@"C:\x"));
    }

    /// <summary>A stdout that presses Ctrl+C (through <see cref="Interrupts.Interrupt"/>) once the first text arrives.</summary>
    private sealed class InterruptingWriter : StringWriter
    {
        private int _fired;

        public Action? OnFirstText { get; set; }

        public override void Write(string? value)
        {
            base.Write(value);
            if (!string.IsNullOrEmpty(value) && Interlocked.Exchange(ref _fired, 1) == 0)
                OnFirstText?.Invoke();
        }
    }
}
