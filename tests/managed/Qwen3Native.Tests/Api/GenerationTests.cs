using Qwen3Native.Generation;

namespace Qwen3Native.Tests.Api;

/// <summary>Raw generation from token ids (no template) against transformers' greedy continuations.</summary>
[TestFixture]
public class GenerationTests
{
    private Qwen3Model _model = null!;

    [OneTimeSetUp]
    public void LoadModel() => _model = ApiFixture.Load();

    [OneTimeTearDown]
    public void DisposeModel() => _model.Dispose();

    private static IEnumerable<ReferenceCase> Cases() => ApiFixture.Cases;

    [TestCaseSource(nameof(Cases))]
    public async Task GreedyTokensEqualTransformers(ReferenceCase c)
    {
        int comparable = ApiFixture.ComparableSteps(c);
        Assert.That(comparable, Is.GreaterThan(0), "the fixture should have at least one decisive step");
        var result = await _model.GenerateAsync(c.PromptIds, SamplingOptions.Greedy with { MaxTokens = 32 });

        Assert.That(result.TokenIds.Take(comparable), Is.EqualTo(c.GreedyTokens.Take(comparable)),
            $"greedy tokens must equal transformers' for the {comparable} steps whose top1-top2 margin is at least {ApiFixture.MarginTolerance}");
        Assert.That(result.Usage.PromptTokens, Is.EqualTo(c.PromptIds.Length));
        Assert.That(result.Usage.CachedPromptTokens, Is.Zero);
        if (comparable == c.GreedyTokens.Length)
        {
            Assert.That(result.FinishReason, Is.EqualTo(FinishReason.Length));
            Assert.That(result.TokenIds, Has.Count.EqualTo(32));
            Assert.That(result.Text, Is.EqualTo(c.GreedyText));
        }
    }

    [TestCaseSource(nameof(Cases))]
    public async Task StreamedTextConcatenatesToTheDecodedText(ReferenceCase c)
    {
        var deltas = new List<string>();
        var tokens = new List<int>();
        GenerationUpdate? last = null;
        await foreach (var update in _model.GenerateStreamAsync(c.PromptIds, SamplingOptions.Greedy with { MaxTokens = 32 }))
        {
            Assert.That(last?.IsFinal ?? false, Is.False, "nothing may follow the final update");
            deltas.Add(update.Text);
            if (update.TokenId >= 0)
                tokens.Add(update.TokenId);
            Assert.That(update.Kind, Is.EqualTo(OutputKind.Content), "raw generation has no chat structure");
            AssertNoBrokenCharacter(update.Text);
            last = update;
        }

        Assert.That(last, Is.Not.Null);
        Assert.That(last!.FinishReason, Is.EqualTo(FinishReason.Length));
        Assert.That(last.Usage, Is.EqualTo(new GenerationUsage(c.PromptIds.Length, 0, 32)));
        Assert.That(string.Concat(deltas), Is.EqualTo(_model.Tokenizer.Decode(tokens.ToArray())));
        int comparable = ApiFixture.ComparableSteps(c);
        if (comparable == c.GreedyTokens.Length)
            Assert.That(string.Concat(deltas), Is.EqualTo(c.GreedyText));
    }

    [Test]
    public async Task StopStringSplitAcrossTokensEndsGenerationAndIsNotInTheText()
    {
        var c = ApiFixture.Cases[0];
        int comparable = ApiFixture.ComparableSteps(c);
        // "lickenargsirate proofphones…": "rate pro" spans the tokens "irate" and " proof", so it must be held back and matched across them.
        string reference = _model.Tokenizer.Decode(c.GreedyTokens.Take(comparable).ToArray());
        const string stop = "rate pro";
        int at = reference.IndexOf(stop, StringComparison.Ordinal);
        Assert.That(at, Is.GreaterThan(0), "the reference continuation should contain the stop string");

        var deltas = new List<string>();
        GenerationUpdate? last = null;
        await foreach (var update in _model.GenerateStreamAsync(c.PromptIds, SamplingOptions.Greedy with { MaxTokens = 32, StopStrings = [stop] }))
        {
            deltas.Add(update.Text);
            last = update;
        }

        Assert.That(last!.FinishReason, Is.EqualTo(FinishReason.Stop));
        Assert.That(string.Concat(deltas), Is.EqualTo(reference.Substring(0, at)));
        Assert.That(deltas, Has.None.Contains("rate p"), "text that might start the stop string must be held back until decided");
    }

    [Test]
    public async Task StopTokenIdEndsGenerationAndItsTextIsLeftOut()
    {
        var c = ApiFixture.Cases[0];
        Assume.That(ApiFixture.ComparableSteps(c), Is.GreaterThanOrEqualTo(6));
        int stopToken = c.GreedyTokens[5];
        Assume.That(c.GreedyTokens.Take(5), Has.None.EqualTo(stopToken));

        var result = await _model.GenerateAsync(c.PromptIds, SamplingOptions.Greedy with { StopTokenIds = [stopToken] });

        Assert.That(result.FinishReason, Is.EqualTo(FinishReason.Stop));
        Assert.That(result.TokenIds, Is.EqualTo(c.GreedyTokens.Take(6)), "the stop token is counted and returned as a token");
        Assert.That(result.Text, Is.EqualTo(_model.Tokenizer.Decode(c.GreedyTokens.Take(5).ToArray())));
    }

    [Test]
    public async Task SameSeedGivesSameTokensAndAnotherSeedDiffers()
    {
        var c = ApiFixture.Cases[1];
        var sampling = new SamplingOptions { Temperature = 1.0f, TopK = 50, TopP = 0.95f, Seed = 1234, MaxTokens = 24 };

        var a = await _model.GenerateAsync(c.PromptIds, sampling);
        var b = await _model.GenerateAsync(c.PromptIds, sampling);
        var other = await _model.GenerateAsync(c.PromptIds, sampling with { Seed = 98765 });

        Assert.That(b.TokenIds, Is.EqualTo(a.TokenIds));
        Assert.That(other.TokenIds, Is.Not.EqualTo(a.TokenIds),
            "random weights give a nearly flat distribution, so 24 draws from two seeds should not all agree");
    }

    [Test]
    public async Task GenerationStopsWithLengthAtTheEndOfTheContext()
    {
        var c = ApiFixture.Cases[0];
        using var model = ApiFixture.Load(contextLength: c.PromptIds.Length + 5);
        var result = await model.GenerateAsync(c.PromptIds, SamplingOptions.Greedy with { MaxTokens = 100 });

        Assert.That(result.FinishReason, Is.EqualTo(FinishReason.Length));
        Assert.That(result.TokenIds, Has.Count.EqualTo(5), "prompt plus output fill the context exactly");
        Assert.That(result.TokenIds.Take(ApiFixture.ComparableSteps(c)), Is.EqualTo(c.GreedyTokens.Take(Math.Min(5, ApiFixture.ComparableSteps(c)))));
    }

    [Test]
    public async Task ModelDefaultsComeFromGenerationConfig()
    {
        // generation_config.json: do_sample true, temperature 0.7, top_k 20, top_p 0.8, eos [151645, 151643].
        var d = _model.GenerationDefaults;
        Assert.That(d.Temperature, Is.EqualTo(0.7f));
        Assert.That(d.TopK, Is.EqualTo(20));
        Assert.That(d.TopP, Is.EqualTo(0.8f));
        Assert.That(d.MinP, Is.Zero);
        Assert.That(d.RepetitionPenalty, Is.EqualTo(1f));
        Assert.That(d.StopTokenIds, Is.EqualTo(new[] { 151645, 151643 }));

        // Without options a request samples with those defaults: a fixed seed must still reproduce.
        var c = ApiFixture.Cases[0];
        var a = await _model.GenerateAsync(c.PromptIds, d with { Seed = 7, MaxTokens = 8 });
        var b = await _model.GenerateAsync(c.PromptIds, d with { Seed = 7, MaxTokens = 8 });
        Assert.That(a.TokenIds, Is.EqualTo(b.TokenIds));
    }

    internal static void AssertNoBrokenCharacter(string text)
    {
        for (int i = 0; i < text.Length; i++)
        {
            if (char.IsHighSurrogate(text[i]))
            {
                Assert.That(i + 1 < text.Length && char.IsLowSurrogate(text[i + 1]), Is.True, $"unpaired high surrogate in '{text}'");
                i++;
            }
            else
            {
                Assert.That(char.IsLowSurrogate(text[i]), Is.False, $"unpaired low surrogate in '{text}'");
            }
        }
        Assert.That(text, Does.Not.Contain("\uFFFD"), "a delta must not contain a replacement character for a split UTF-8 sequence");
    }
}
