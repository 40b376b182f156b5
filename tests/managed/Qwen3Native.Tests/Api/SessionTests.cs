using Qwen3Native.Chat;
using Qwen3Native.Generation;

namespace Qwen3Native.Tests.Api;

/// <summary>Chat sessions: templated prompts, streaming, KV reuse across turns, cancellation.</summary>
[TestFixture]
public class SessionTests
{
    private Qwen3Model _model = null!;

    [OneTimeSetUp]
    public void LoadModel() => _model = ApiFixture.Load();

    [OneTimeTearDown]
    public void DisposeModel() => _model.Dispose();

    private static IEnumerable<ReferenceCase> Cases() => ApiFixture.Cases;

    private Qwen3Session NewSession(ReferenceCase c, bool enableThinking = false) =>
        _model.CreateSession(new SessionOptions { SystemPrompt = c.SystemPrompt, EnableThinking = enableThinking });

    [TestCaseSource(nameof(Cases))]
    public async Task TemplatedPromptIdsEqualTransformersAndGreedyAnswerMatches(ReferenceCase c)
    {
        Assert.That(_model.ChatTemplate, Is.SameAs(Qwen3ChatTemplate.Hybrid), "the fixture ships the hybrid Qwen3 template");
        Assert.That(_model.ChatTemplateNote, Is.Null);
        using var session = NewSession(c);

        var result = await session.ChatAsync(c.LastUserMessage, SamplingOptions.Greedy with { MaxTokens = 32 });

        var tokens = session.GetTokens();
        Assert.That(result.Usage.PromptTokens, Is.EqualTo(c.PromptIds.Length));
        Assert.That(tokens.Take(c.PromptIds.Length), Is.EqualTo(c.PromptIds),
            "the session's prompt must be transformers' apply_chat_template(enable_thinking=False) token for token");
        int comparable = ApiFixture.ComparableSteps(c);
        Assert.That(result.TokenIds.Take(comparable), Is.EqualTo(c.GreedyTokens.Take(comparable)));
        Assert.That(tokens.Skip(c.PromptIds.Length), Is.EqualTo(result.TokenIds), "the sequence holds the prompt and then the answer");
        if (comparable == c.GreedyTokens.Length)
        {
            Assert.That(result.RawText, Is.EqualTo(c.GreedyText));
            Assert.That(result.FinishReason, Is.EqualTo(FinishReason.Length));
        }
        Assert.That(session.Messages[^1].Role, Is.EqualTo(ChatRole.Assistant));
        Assert.That(session.Messages[^2].Content, Is.EqualTo(c.LastUserMessage));
    }

    [TestCaseSource(nameof(Cases))]
    public async Task StreamedDeltasConcatenateToTheDecodedText(ReferenceCase c)
    {
        using var session = NewSession(c);
        var deltas = new List<string>();
        GenerationUpdate? last = null;
        await foreach (var update in session.ChatStreamAsync(c.LastUserMessage, SamplingOptions.Greedy with { MaxTokens = 32 }))
        {
            deltas.Add(update.Text);
            GenerationTests.AssertNoBrokenCharacter(update.Text);
            last = update;
        }

        Assert.That(last!.IsFinal, Is.True);
        Assert.That(last.Usage!.GeneratedTokens, Is.EqualTo(32));
        var generated = session.GetTokens().Skip(c.PromptIds.Length).ToArray();
        Assert.That(string.Concat(deltas), Is.EqualTo(_model.Tokenizer.Decode(generated)));
        if (ApiFixture.ComparableSteps(c) == c.GreedyTokens.Length)
            Assert.That(string.Concat(deltas), Is.EqualTo(c.GreedyText));
    }

    [Test]
    public async Task SecondTurnOnlyPrefillsTheNewTokens()
    {
        var c = ApiFixture.Cases[1];
        using var session = NewSession(c);
        var first = await session.ChatAsync(c.LastUserMessage, SamplingOptions.Greedy with { MaxTokens = 6 });
        Assert.That(first.Usage.CachedPromptTokens, Is.Zero);
        Assert.That(first.Usage.PrefilledTokens, Is.EqualTo(c.PromptIds.Length));
        var afterFirst = session.GetTokens().ToArray();
        // The last sampled token is queued for the next step, not yet in the cache.
        Assert.That(session.CachedTokenCount, Is.EqualTo(c.PromptIds.Length + 6 - 1));

        const string followUp = "Et maintenant en anglais ?";
        var expectedHistory = session.Messages.Append(ChatMessage.User(followUp)).ToList();
        int[] expectedPrompt = _model.Tokenizer.Encode(
            Qwen3ChatTemplate.Hybrid.Render(expectedHistory, null, new ChatTemplateOptions { EnableThinking = false }));
        int shared = afterFirst.AsSpan().CommonPrefixLength(expectedPrompt);

        var second = await session.ChatAsync(followUp, SamplingOptions.Greedy with { MaxTokens = 4 });

        Assert.That(second.Usage.PromptTokens, Is.EqualTo(expectedPrompt.Length));
        Assert.That(second.Usage.CachedPromptTokens, Is.EqualTo(shared));
        Assert.That(second.Usage.PrefilledTokens, Is.EqualTo(expectedPrompt.Length - shared),
            "only the tokens after the shared prefix are processed again");
        // The hybrid template drops the empty think block of earlier turns, so the prefix ends just before it: the
        // whole first prompt except "<think>\n\n</think>\n\n" (4 tokens) is reused.
        Assert.That(shared, Is.EqualTo(c.PromptIds.Length - 4));
        Assert.That(session.GetTokens().Take(expectedPrompt.Length), Is.EqualTo(expectedPrompt),
            "after truncating and appending, the sequence holds exactly the new prompt");
        Assert.That(session.Messages, Has.Count.EqualTo(5)); // system, user, assistant, user, assistant
    }

    [Test]
    public async Task EnableThinkingLeavesTheThinkBlockToTheModel()
    {
        var c = ApiFixture.Cases[0];
        using var session = NewSession(c, enableThinking: true);
        var result = await session.ChatAsync(c.LastUserMessage, SamplingOptions.Greedy with { MaxTokens = 1 });
        // With thinking enabled the prompt ends at "<|im_start|>assistant\n": no empty "<think>\n\n</think>\n\n".
        Assert.That(result.Usage.PromptTokens, Is.EqualTo(c.PromptIds.Length - 4));
        Assert.That(session.GetTokens().Take(c.PromptIds.Length - 4), Is.EqualTo(c.PromptIds.Take(c.PromptIds.Length - 4)));
    }

    [Test]
    public async Task CancellationMidStreamThrowsFreesTheSequenceAndTheSessionGoesOn()
    {
        // Chosen behaviour: a cancelled turn throws GenerationCanceledException (an OperationCanceledException, as .NET
        // callers expect) carrying the partial result with FinishReason.Cancelled; the conversation is left as it was.
        var c = ApiFixture.Cases[0];
        using var session = NewSession(c);
        int messagesBefore = session.Messages.Count;
        using var cts = new CancellationTokenSource();
        int received = 0;

        var ex = Assert.ThrowsAsync<GenerationCanceledException>(async () =>
        {
            await foreach (var _ in session.ChatStreamAsync(c.LastUserMessage, SamplingOptions.Greedy with { MaxTokens = 500 }, cts.Token))
            {
                if (++received == 3)
                    cts.Cancel();
            }
        });

        Assert.That(ex!.CancellationToken, Is.EqualTo(cts.Token));
        Assert.That(ex.Partial.FinishReason, Is.EqualTo(FinishReason.Cancelled));
        Assert.That(ex.Partial.TokenIds, Has.Count.EqualTo(3), "the token is checked before every step");
        Assert.That(session.GetTokens(), Is.Empty, "the native sequence (and its KV blocks) is freed at once");
        Assert.That(session.CachedTokenCount, Is.Zero);
        Assert.That(session.Messages, Has.Count.EqualTo(messagesBefore), "a cancelled turn leaves no trace in the conversation");

        var after = await session.ChatAsync(c.LastUserMessage, SamplingOptions.Greedy with { MaxTokens = 4 });
        Assert.That(after.Usage.CachedPromptTokens, Is.Zero, "a new sequence processes the whole prompt");
        Assert.That(session.GetTokens().Take(c.PromptIds.Length), Is.EqualTo(c.PromptIds));
        Assert.That(after.TokenIds, Is.EqualTo(c.GreedyTokens.Take(4)));
    }

    [Test]
    public async Task CancelledTurnReturnsItsKvBlocksToTheModel()
    {
        // The KV cache holds 128 tokens for every sequence of the model. A cancelled turn that kept its blocks (two
        // blocks of 16 for ~25 tokens) would leave too little for a 100-token prompt plus 20 generated tokens.
        var c = ApiFixture.Cases[0];
        using var model = ApiFixture.Load(contextLength: 128, kvCacheTokens: 128);
        using var session = model.CreateSession(new SessionOptions { EnableThinking = false });
        using var cts = new CancellationTokenSource();
        int received = 0;
        Assert.CatchAsync<OperationCanceledException>(async () =>
        {
            await foreach (var _ in session.ChatStreamAsync(c.LastUserMessage, SamplingOptions.Greedy with { MaxTokens = 50 }, cts.Token))
                if (++received == 4)
                    cts.Cancel();
        });

        int[] prompt = Enumerable.Repeat(c.PromptIds, 5).SelectMany(p => p).Take(100).ToArray();
        var result = await model.GenerateAsync(prompt, SamplingOptions.Greedy with { MaxTokens = 20 });
        Assert.That(result.TokenIds, Has.Count.EqualTo(20));
    }

    [Test]
    public async Task AbandonedStreamLeavesTheConversationUnchanged()
    {
        var c = ApiFixture.Cases[0];
        using var session = NewSession(c);
        await foreach (var _ in session.ChatStreamAsync(c.LastUserMessage, SamplingOptions.Greedy with { MaxTokens = 50 }))
            break;

        Assert.That(session.Messages, Is.Empty);
        Assert.That(session.GetTokens(), Is.Empty);
        var result = await session.ChatAsync(c.LastUserMessage, SamplingOptions.Greedy with { MaxTokens = 2 });
        Assert.That(result.TokenIds, Is.EqualTo(c.GreedyTokens.Take(2)));
    }

    [Test]
    public void CancellationOfRawGenerationThrowsWithThePartialResult()
    {
        var c = ApiFixture.Cases[0];
        using var cts = new CancellationTokenSource();
        var tokens = new List<int>();
        var ex = Assert.ThrowsAsync<GenerationCanceledException>(async () =>
        {
            await foreach (var u in _model.GenerateStreamAsync(c.PromptIds, SamplingOptions.Greedy with { MaxTokens = 500 }, cts.Token))
            {
                tokens.Add(u.TokenId);
                if (tokens.Count == 5)
                    cts.Cancel();
            }
        });
        Assert.That(ex!.Partial.TokenIds, Is.EqualTo(tokens));

        // An already-cancelled token never starts a step.
        var early = Assert.ThrowsAsync<GenerationCanceledException>(() => _model.GenerateAsync(c.PromptIds, null, cts.Token));
        Assert.That(early!.Partial.TokenIds, Is.Empty);
    }

    [Test]
    public void TwoTurnsAtOnceOnOneSessionAreRefused()
    {
        var c = ApiFixture.Cases[0];
        using var session = NewSession(c);
        var sampling = SamplingOptions.Greedy with { MaxTokens = 20 };
        var ex = Assert.ThrowsAsync<InvalidOperationException>(async () =>
        {
            await foreach (var _ in session.ChatStreamAsync("one", sampling))
                await foreach (var __ in session.ChatStreamAsync("two", sampling))
                {
                }
        });
        Assert.That(ex!.Message, Does.Contain("already running"));
    }

    [Test]
    public async Task ToolResultsAndToolsRenderThroughTheTemplate()
    {
        var tool = ToolDefinition.FromJson("""{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}""");
        using var session = _model.CreateSession(new SessionOptions { EnableThinking = false, Tools = [tool] });
        session.AddMessage(ChatMessage.User("Weather in Paris?"));
        session.AddMessage(ChatMessage.Assistant("", toolCalls: [ToolCall.FromText("get_weather", """{"city": "Paris"}""")]));
        var result = await session.ChatAsync([ChatMessage.Tool("""{"temp": 21}""")], SamplingOptions.Greedy with { MaxTokens = 2 });

        var expected = _model.Tokenizer.Encode(Qwen3ChatTemplate.Hybrid.Render(session.Messages.Take(3).ToList(), [tool],
            new ChatTemplateOptions { EnableThinking = false }));
        Assert.That(result.Usage.PromptTokens, Is.EqualTo(expected.Length));
        Assert.That(session.GetTokens().Take(expected.Length), Is.EqualTo(expected));
        Assert.That(session.Messages.Select(m => m.Role),
            Is.EqualTo(new[] { ChatRole.User, ChatRole.Assistant, ChatRole.Tool, ChatRole.Assistant }));

        // A turn with no new message answers what AddMessage put at the end, even when added after the call but
        // before the enumeration started.
        var stream = session.ChatStreamAsync(Array.Empty<ChatMessage>(), SamplingOptions.Greedy with { MaxTokens = 1 });
        session.AddMessage(ChatMessage.Tool("{\"temp\": 22}"));
        await foreach (var _ in stream)
        {
        }
        Assert.That(session.Messages, Has.Count.EqualTo(6));
        Assert.That(session.Messages[4].Content, Is.EqualTo("{\"temp\": 22}"));
    }
}
