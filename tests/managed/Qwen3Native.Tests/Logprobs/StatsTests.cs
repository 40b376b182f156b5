using Microsoft.Extensions.AI;
using Qwen3Native.AI;
using Qwen3Native.Generation;
using Qwen3Native.Tests.Api;
using AIChatMessage = Microsoft.Extensions.AI.ChatMessage;
using AIChatRole = Microsoft.Extensions.AI.ChatRole;

namespace Qwen3Native.Tests.Logprobs;

/// <summary>The engine's per-request statistics through the managed layers, and their agreement with the managed usage.</summary>
[TestFixture]
public sealed class StatsTests
{
    private Qwen3Model _model = null!;

    [OneTimeSetUp]
    public void LoadModel() => _model = ApiFixture.Load();

    [OneTimeTearDown]
    public void DisposeModel() => _model.Dispose();

    private static void AssertAgrees(GenerationStats stats, GenerationUsage usage)
    {
        Assert.That(stats.PromptTokens, Is.EqualTo(usage.PromptTokens), "prompt tokens");
        Assert.That(stats.CachedPromptTokens, Is.EqualTo(usage.CachedPromptTokens), "cached tokens");
        Assert.That(stats.GeneratedTokens, Is.EqualTo(usage.GeneratedTokens), "generated tokens");
        Assert.That(stats.PrefilledTokens, Is.EqualTo(usage.PrefilledTokens));
    }

    [Test]
    public async Task RawGenerationHasExactCountsAndSaneTimings()
    {
        var c = ApiFixture.Cases[0];
        var result = await _model.GenerateAsync(c.PromptIds, SamplingOptions.Greedy with { MaxTokens = 8 });

        var s = result.Stats;
        Assert.That(s.PromptTokens, Is.EqualTo(c.PromptIds.Length));
        Assert.That(s.CachedPromptTokens, Is.Zero);
        Assert.That(s.GeneratedTokens, Is.EqualTo(8));
        Assert.That(s.TimeToFirstToken, Is.GreaterThan(TimeSpan.Zero));
        Assert.That(s.PrefillTime, Is.GreaterThan(TimeSpan.Zero).And.LessThanOrEqualTo(s.TimeToFirstToken));
        Assert.That(s.DecodeTokensPerSecond, Is.GreaterThan(0).And.LessThan(1e7));
        Assert.That(s.PrefillTokensPerSecond, Is.GreaterThan(0));
        Assert.That(s.TimeToFirstToken, Is.LessThan(TimeSpan.FromMinutes(1)));
        AssertAgrees(s, result.Usage);
    }

    [Test]
    public async Task TheLastStreamedUpdateCarriesTheStats()
    {
        var c = ApiFixture.Cases[1];
        var updates = new List<GenerationUpdate>();
        await foreach (var u in _model.GenerateStreamAsync(c.PromptIds, SamplingOptions.Greedy with { MaxTokens = 5 }))
            updates.Add(u);

        Assert.That(updates.Take(updates.Count - 1).Select(u => u.Stats), Has.All.Null);
        var stats = updates[^1].Stats!;
        Assert.That(stats.GeneratedTokens, Is.EqualTo(5));
        Assert.That(stats.TimeToFirstToken, Is.GreaterThan(TimeSpan.Zero));
        AssertAgrees(stats, updates[^1].Usage!);
    }

    [Test]
    public async Task OneTokenHasNoDecodeSpeed()
    {
        var result = await _model.GenerateAsync(ApiFixture.Cases[0].PromptIds, SamplingOptions.Greedy with { MaxTokens = 1 });
        Assert.That(result.Stats.GeneratedTokens, Is.EqualTo(1));
        Assert.That(result.Stats.DecodeTokensPerSecond, Is.Zero, "a speed needs two samples");
        Assert.That(result.Stats.TimeToFirstToken, Is.GreaterThan(TimeSpan.Zero));
    }

    [Test]
    public async Task SessionTurnsReportReusedTokensAsTheUsageDoes()
    {
        var c = ApiFixture.Cases[0];
        using var session = _model.CreateSession(new SessionOptions { EnableThinking = false });
        var sampling = SamplingOptions.Greedy with { MaxTokens = 4 };

        var first = await session.ChatAsync(c.LastUserMessage, sampling);
        Assert.That(first.Stats.PromptTokens, Is.EqualTo(c.PromptIds.Length));
        Assert.That(first.Stats.CachedPromptTokens, Is.Zero);
        AssertAgrees(first.Stats, first.Usage);

        var second = await session.ChatAsync("And of Italy?", sampling);
        Assert.That(second.Stats.CachedPromptTokens, Is.GreaterThan(10), "the first turn's prompt is reused up to where the template re-renders it");
        Assert.That(second.Stats.GeneratedTokens, Is.EqualTo(4));
        AssertAgrees(second.Stats, second.Usage);

        // A reset conversation shares only the system-less prefix "<|im_start|>user\n" with the cache.
        session.Reset();
        var third = await session.ChatAsync("Hi", sampling);
        AssertAgrees(third.Stats, third.Usage);
        Assert.That(third.Stats.CachedPromptTokens, Is.LessThan(third.Stats.PromptTokens));
    }

    [Test]
    public async Task ChatClientMapsUsageTimingsAndLogprobs()
    {
        var c = ApiFixture.Cases[0];
        using IChatClient client = new Qwen3ChatClient(_model);
        List<AIChatMessage> messages = [new(AIChatRole.User, c.LastUserMessage)];
        var options = new ChatOptions
        {
            Temperature = 0,
            MaxOutputTokens = 6,
            Reasoning = new ReasoningOptions { Effort = ReasoningEffort.None },
            AdditionalProperties = new() { ["logprobs"] = true, ["top_logprobs"] = 3 },
        };

        var response = await client.GetResponseAsync(messages, options);

        Assert.That(response.Usage!.InputTokenCount, Is.EqualTo(c.PromptIds.Length));
        Assert.That(response.Usage.OutputTokenCount, Is.EqualTo(6));
        Assert.That(response.Usage.CachedInputTokenCount, Is.Zero);
        var extra = response.AdditionalProperties!;
        Assert.That(extra["time_to_first_token_ms"], Is.TypeOf<double>().And.GreaterThan(0.0));
        Assert.That(extra["decode_tokens_per_s"], Is.TypeOf<double>().And.GreaterThan(0.0));
        var logprobs = (IReadOnlyList<TokenLogprob>)extra["logprobs"]!;
        Assert.That(logprobs.Select(l => l.TokenId), Is.EqualTo(c.GreedyTokens.Take(6)), "greedy, as transformers chose");
        Assert.That(logprobs.Select(l => l.TopLogprobs.Count), Has.All.EqualTo(3));
        Assert.That(logprobs.Select(l => l.TopLogprobs[0].TokenId), Is.EqualTo(logprobs.Select(l => l.TokenId)));

        Assert.That(response.Messages[^1].AdditionalProperties!["logprobs"], Is.SameAs(logprobs), "also on the message");

        // Streaming: the last update carries the same, and ToChatResponse moves it to the message.
        var updates = new List<ChatResponseUpdate>();
        await foreach (var u in client.GetStreamingResponseAsync(messages, options))
            updates.Add(u);
        Assert.That(updates.Take(updates.Count - 1).Select(u => u.AdditionalProperties), Has.All.Null);
        var streamed = updates.ToChatResponse();
        var properties = streamed.Messages[^1].AdditionalProperties!;
        var streamedLogprobs = (IReadOnlyList<TokenLogprob>)properties["logprobs"]!;
        Assert.That(streamedLogprobs.Select(l => l.TokenId), Is.EqualTo(logprobs.Select(l => l.TokenId)));
        Assert.That(properties["time_to_first_token_ms"], Is.GreaterThan(0.0));
        Assert.That(streamed.Usage!.CachedInputTokenCount, Is.EqualTo(c.PromptIds.Length - 1), "the idle session's cache is reused");

        // Not asked: timings only.
        var plain = await client.GetResponseAsync(messages, new ChatOptions { Temperature = 0, MaxOutputTokens = 2 });
        Assert.That(plain.AdditionalProperties!.ContainsKey("logprobs"), Is.False);
        Assert.That(plain.AdditionalProperties.ContainsKey("time_to_first_token_ms"), Is.True);
    }

    [Test]
    public void BadTopLogprobsFromChatOptionsIsTyped()
    {
        using IChatClient client = new Qwen3ChatClient(_model);
        var options = new ChatOptions { AdditionalProperties = new() { ["top_logprobs"] = 50 } };
        Assert.ThrowsAsync<ArgumentOutOfRangeException>(() => client.GetResponseAsync("Hi", options));
    }
}
