using System.Text.Json.Nodes;
using Qwen3Native.Chat;
using Qwen3Native.Generation;

namespace Qwen3Native.Tests.Api;

/// <summary>Every bad input gives a typed exception whose message says what is wrong.</summary>
[TestFixture]
public class ErrorTests
{
    private static string FixtureConfig() => File.ReadAllText(Path.Combine(ApiFixture.Directory, "config.json"));

    private static ModelOptions DummyOptions(int contextLength = 0) =>
        ApiFixture.Options(contextLength) with { LoadFormat = LoadFormat.Dummy, DummySeed = 1 };

    [Test]
    public void MissingDirectory()
    {
        string missing = Path.Combine(Path.GetTempPath(), "q3n-does-not-exist-" + Guid.NewGuid().ToString("N"));
        var ex = Assert.Throws<ModelLoadException>(() => Qwen3Model.Load(missing));
        Assert.That(ex!.Status, Is.EqualTo(Qwen3Status.Io));
        Assert.That(ex.Directory, Is.EqualTo(missing));
        Assert.That(ex.Message, Does.Contain(missing).And.Contain("does not exist"));
    }

    [Test]
    public void MissingDirectoryThroughLoadAsync()
    {
        string missing = Path.Combine(Path.GetTempPath(), "q3n-does-not-exist-" + Guid.NewGuid().ToString("N"));
        var ex = Assert.ThrowsAsync<ModelLoadException>(() => Qwen3Model.LoadAsync(missing));
        Assert.That(ex!.Status, Is.EqualTo(Qwen3Status.Io));
    }

    [Test]
    public void MalformedConfigJson()
    {
        using var dir = ApiFixture.NewTempDirectory();
        dir.Write("config.json", "{ \"architectures\": [\"Qwen3ForCausalLM\"], ");
        var ex = Assert.Throws<ModelLoadException>(() => Qwen3Model.Load(dir.Path, DummyOptions()));
        Assert.That(ex!.Status, Is.EqualTo(Qwen3Status.BadConfig));
        Assert.That(ex.Message, Does.Contain("config.json"));
        Assert.That(ex.Message, Does.Contain("Q3N_ERR_BAD_CONFIG"));
        TestContext.Out.WriteLine(ex.Message);
    }

    [Test]
    public void MissingConfigJson()
    {
        using var dir = ApiFixture.NewTempDirectory();
        var ex = Assert.Throws<ModelLoadException>(() => Qwen3Model.Load(dir.Path, DummyOptions()));
        Assert.That(ex!.Status, Is.AnyOf(Qwen3Status.BadConfig, Qwen3Status.Io));
        Assert.That(ex.Message, Does.Contain("config.json"));
        TestContext.Out.WriteLine(ex.Message);
    }

    [Test]
    public void UnknownArchitecture()
    {
        using var dir = ApiFixture.NewTempDirectory();
        var config = JsonNode.Parse(FixtureConfig())!.AsObject();
        config["architectures"] = new JsonArray("LlamaForCausalLM");
        config["model_type"] = "llama";
        dir.Write("config.json", config.ToJsonString());
        var ex = Assert.Throws<ModelLoadException>(() => Qwen3Model.Load(dir.Path, DummyOptions()));
        Assert.That(ex!.Status, Is.EqualTo(Qwen3Status.Unsupported));
        Assert.That(ex.Message, Does.Contain("LlamaForCausalLM"));
        Assert.That(ex.Message, Does.Contain("Qwen3ForCausalLM"), "the message names what is supported");
        TestContext.Out.WriteLine(ex.Message);
    }

    [Test]
    public void MalformedGenerationConfig()
    {
        using var dir = ApiFixture.NewTempDirectory();
        dir.Write("config.json", FixtureConfig());
        dir.Write("generation_config.json", "{\"do_sample\": true, \"temperature\": -1}");
        var ex = Assert.Throws<ModelLoadException>(() => Qwen3Model.Load(dir.Path, DummyOptions()));
        Assert.That(ex!.Status, Is.EqualTo(Qwen3Status.BadConfig));
        Assert.That(ex.Message, Does.Contain("generation_config.json").And.Contain("Temperature"));

        dir.Write("generation_config.json", "{\"do_sample\": tru");
        ex = Assert.Throws<ModelLoadException>(() => Qwen3Model.Load(dir.Path, DummyOptions()));
        Assert.That(ex!.Message, Does.Contain("generation_config.json").And.Contain("not valid JSON"));
    }

    [Test]
    public async Task MissingTokenizerJson()
    {
        using var dir = ApiFixture.NewTempDirectory();
        dir.Write("config.json", FixtureConfig());
        using var model = Qwen3Model.Load(dir.Path, DummyOptions());

        Assert.That(model.HasTokenizer, Is.False);
        var ex = Assert.Throws<FileNotFoundException>(() => _ = model.Tokenizer);
        Assert.That(ex!.FileName, Is.EqualTo(Path.Combine(model.Directory, "tokenizer.json")));
        Assert.That(ex.Message, Does.Contain("tokenizer.json"));
        Assert.Throws<FileNotFoundException>(() => model.CreateSession());

        // Without a tokenizer: greedy defaults (no generation_config.json), the hybrid template with a note, and raw
        // generation from ids still works (with no text).
        Assert.That(model.GenerationDefaults.IsGreedy, Is.True);
        Assert.That(model.ChatTemplateNote, Does.Contain("no chat template"));
        var result = await model.GenerateAsync(ApiFixture.Cases[0].PromptIds, SamplingOptions.Greedy with { MaxTokens = 3 });
        Assert.That(result.TokenIds, Has.Count.EqualTo(3));
        Assert.That(result.Text, Is.Empty);
        Assert.ThrowsAsync<InvalidOperationException>(() =>
            model.GenerateAsync(ApiFixture.Cases[0].PromptIds, SamplingOptions.Greedy with { StopStrings = ["x"] }));
    }

    [Test]
    public void PromptOverTheContext()
    {
        var c = ApiFixture.Cases[0];
        using var model = ApiFixture.Load(contextLength: 16);
        Assert.That(model.Info.ContextLength, Is.EqualTo(16));

        var ex = Assert.ThrowsAsync<ContextOverflowException>(() => model.GenerateAsync(c.PromptIds, SamplingOptions.Greedy));
        Assert.That(ex!.Status, Is.EqualTo(Qwen3Status.ContextOverflow));
        Assert.That(ex.Message, Does.Contain($"{c.PromptIds.Length} tokens").And.Contain("16"));

        using var session = model.CreateSession(new SessionOptions { EnableThinking = false });
        Assert.ThrowsAsync<ContextOverflowException>(() => session.ChatAsync(c.LastUserMessage, SamplingOptions.Greedy));
        Assert.That(session.Messages, Is.Empty, "the failed turn is not in the conversation");

        // A prompt that fills the context exactly leaves no room for a token.
        Assert.ThrowsAsync<ContextOverflowException>(() => model.GenerateAsync(c.PromptIds.Take(16).ToArray(), SamplingOptions.Greedy));
    }

    [Test]
    public void ContextLongerThanTheModelAllows()
    {
        var ex = Assert.Throws<ModelLoadException>(() => ApiFixture.Load(contextLength: 1 << 20));
        Assert.That(ex!.Message, Does.Contain("context_length"));
        TestContext.Out.WriteLine(ex.Message);
    }

    [TestCase(float.NaN)]
    [TestCase(-0.5f)]
    [TestCase(float.PositiveInfinity)]
    public void BadTemperature(float value)
    {
        var ex = Assert.Throws<ArgumentOutOfRangeException>(() => _ = new SamplingOptions { Temperature = value });
        Assert.That(ex!.ParamName, Is.EqualTo("Temperature"));
        Assert.That(ex.Message, Does.Contain("Temperature must be finite and >= 0"));
        Assert.Throws<ArgumentOutOfRangeException>(() => _ = SamplingOptions.Greedy with { Temperature = value }, "`with` validates too");
    }

    [Test]
    public void OtherBadSamplingValues()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => _ = new SamplingOptions { TopK = -1 });
        Assert.Throws<ArgumentOutOfRangeException>(() => _ = new SamplingOptions { TopP = 0f });
        Assert.Throws<ArgumentOutOfRangeException>(() => _ = new SamplingOptions { TopP = float.NaN });
        Assert.Throws<ArgumentOutOfRangeException>(() => _ = new SamplingOptions { MinP = 1.5f });
        Assert.Throws<ArgumentOutOfRangeException>(() => _ = new SamplingOptions { RepetitionPenalty = 0f });
        Assert.Throws<ArgumentOutOfRangeException>(() => _ = new SamplingOptions { RepetitionPenalty = float.NaN });
        Assert.Throws<ArgumentOutOfRangeException>(() => _ = new SamplingOptions { PresencePenalty = float.NaN });
        Assert.Throws<ArgumentOutOfRangeException>(() => _ = new SamplingOptions { FrequencyPenalty = 3f });
        Assert.Throws<ArgumentOutOfRangeException>(() => _ = new SamplingOptions { MaxTokens = 0 });
        Assert.Throws<ArgumentOutOfRangeException>(() => _ = new SamplingOptions { StopTokenIds = [-3] });
        Assert.Throws<ArgumentException>(() => _ = new SamplingOptions { StopStrings = [""] });
        Assert.Throws<ArgumentOutOfRangeException>(() => _ = new ModelOptions { ContextLength = -1 });
        Assert.Throws<ArgumentOutOfRangeException>(() => _ = new ModelOptions { Threads = -2 });
        // Large top-k is valid (it just keeps every token).
        Assert.DoesNotThrow(() => _ = new SamplingOptions { TopK = int.MaxValue });
    }

    [Test]
    public void BadPromptIds()
    {
        using var model = ApiFixture.Load();
        Assert.Throws<ArgumentException>(() => model.GenerateStreamAsync(Array.Empty<int>()));
        var ex = Assert.Throws<ArgumentOutOfRangeException>(() => model.GenerateStreamAsync([1, 2, model.Info.VocabSize]));
        Assert.That(ex!.Message, Does.Contain("index 2").And.Contain("outside the vocabulary"));
        Assert.Throws<ArgumentOutOfRangeException>(() => model.GenerateStreamAsync([-1]));
        Assert.Throws<ArgumentNullException>(() => model.GenerateStreamAsync((IReadOnlyList<int>)null!));
    }

    [Test]
    public void BadChatArguments()
    {
        using var model = ApiFixture.Load();
        using var session = model.CreateSession();
        Assert.Throws<ArgumentNullException>(() => session.ChatAsync((string)null!));
        Assert.Throws<ArgumentException>(() => session.ChatAsync(Array.Empty<ChatMessage>()));
    }
}
