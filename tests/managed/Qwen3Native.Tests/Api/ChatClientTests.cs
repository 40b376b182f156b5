using System.Text.Json;
using Microsoft.Extensions.AI;
using Qwen3Native.AI;
using Qwen3Native.Chat;
using AIChatMessage = Microsoft.Extensions.AI.ChatMessage;
using AIChatRole = Microsoft.Extensions.AI.ChatRole;
using Q3ChatMessage = Qwen3Native.Chat.ChatMessage;

namespace Qwen3Native.Tests.Api;

/// <summary>The Microsoft.Extensions.AI adapter.</summary>
[TestFixture]
public class ChatClientTests
{
    private Qwen3Model _model = null!;

    [OneTimeSetUp]
    public void LoadModel() => _model = ApiFixture.Load();

    [OneTimeTearDown]
    public void DisposeModel() => _model.Dispose();

    private static ChatOptions Greedy(int maxTokens) => new()
    {
        Temperature = 0,
        MaxOutputTokens = maxTokens,
        Reasoning = new ReasoningOptions { Effort = ReasoningEffort.None }, // enable_thinking=False, as in reference.json
    };

    private static List<AIChatMessage> Messages(ReferenceCase c) =>
        c.Messages.Select(m => new AIChatMessage(new AIChatRole(m.Role), m.Content)).ToList();

    [Test]
    public async Task ResponseHasTextUsageAndFinishReason()
    {
        var c = ApiFixture.Cases[0];
        using IChatClient client = new Qwen3ChatClient(_model);

        var response = await client.GetResponseAsync(Messages(c), Greedy(8));

        // Same prompt as transformers (21 tokens), so greedy gives the reference tokens.
        string expected = ChatOutputParser.Parse(_model.Tokenizer.Decode(c.GreedyTokens.Take(8).ToArray())).Content;
        Assert.That(response.Text, Is.EqualTo(expected));
        Assert.That(response.Text, Is.Not.Empty);
        Assert.That(response.Usage!.InputTokenCount, Is.EqualTo(c.PromptIds.Length));
        Assert.That(response.Usage.OutputTokenCount, Is.EqualTo(8));
        Assert.That(response.Usage.TotalTokenCount, Is.EqualTo(c.PromptIds.Length + 8));
        Assert.That(response.FinishReason, Is.EqualTo(ChatFinishReason.Length));
        Assert.That(response.Messages, Has.Count.EqualTo(1));
        Assert.That(response.Messages[0].Role, Is.EqualTo(AIChatRole.Assistant));
        Assert.That(response.ModelId, Is.EqualTo("real_vocab_tiny"));
        Assert.That(response.ResponseId, Is.Not.Empty);
    }

    [Test]
    public async Task StreamingGivesTheSameTextAndUsage()
    {
        var c = ApiFixture.Cases[1];
        using IChatClient client = new Qwen3ChatClient(_model);

        var updates = new List<ChatResponseUpdate>();
        await foreach (var u in client.GetStreamingResponseAsync(Messages(c), Greedy(12)))
            updates.Add(u);
        var streamed = updates.ToChatResponse();
        var whole = await client.GetResponseAsync(Messages(c), Greedy(12));

        Assert.That(streamed.Text.TrimEnd(), Is.EqualTo(whole.Text));
        Assert.That(updates[^1].FinishReason, Is.EqualTo(ChatFinishReason.Length));
        var usage = updates.SelectMany(u => u.Contents).OfType<UsageContent>().Single().Details;
        Assert.That(usage.InputTokenCount, Is.EqualTo(c.PromptIds.Length));
        Assert.That(usage.OutputTokenCount, Is.EqualTo(12));
        Assert.That(updates.Select(u => u.ResponseId).Distinct().Count(), Is.EqualTo(1));
        // The second request repeats the first's prompt: the idle session's cache covers all of it but the last token.
        Assert.That(whole.Usage!.CachedInputTokenCount, Is.EqualTo(c.PromptIds.Length - 1));
    }

    [Test]
    public async Task FollowUpRequestReusesTheCache()
    {
        var c = ApiFixture.Cases[0];
        using IChatClient client = new Qwen3ChatClient(_model);
        var history = Messages(c);
        var first = await client.GetResponseAsync(history, Greedy(4));
        history.AddRange(first.Messages);
        history.Add(new AIChatMessage(AIChatRole.User, "And of Italy?"));

        var second = await client.GetResponseAsync(history, Greedy(4));

        Assert.That(second.Usage!.CachedInputTokenCount, Is.GreaterThan(c.PromptIds.Length - 5));
        Assert.That(second.Usage.InputTokenCount, Is.GreaterThan(second.Usage.CachedInputTokenCount!.Value));
    }

    [Test]
    public async Task ToolsAndFunctionContentsAreRenderedByTheTemplate()
    {
        using IChatClient client = new Qwen3ChatClient(_model);
        var weather = AIFunctionFactory.Create((string city) => "sunny", "get_weather", "Weather of a city");
        var history = new List<AIChatMessage>
        {
            new(AIChatRole.System, "Be brief."),
            new(AIChatRole.User, "Weather in Paris?"),
            new(AIChatRole.Assistant, [new FunctionCallContent("call_1", "get_weather", new Dictionary<string, object?> { ["city"] = "Paris" })]),
            new(AIChatRole.Tool, [new FunctionResultContent("call_1", "sunny, 21 C")]),
        };
        var options = Greedy(2);
        options.Tools = [weather];

        var response = await client.GetResponseAsync(history, options);

        var tool = new ToolDefinition("get_weather", "Weather of a city", weather.JsonSchema);
        var expected = new List<Q3ChatMessage>
        {
            Q3ChatMessage.System("Be brief."),
            Q3ChatMessage.User("Weather in Paris?"),
            Q3ChatMessage.Assistant("", toolCalls: [ToolCall.FromJson("get_weather", JsonSerializer.SerializeToElement(new { city = "Paris" }))]),
            Q3ChatMessage.Tool("sunny, 21 C"),
        };
        string prompt = Qwen3ChatTemplate.Hybrid.Render(expected, [tool], new ChatTemplateOptions { EnableThinking = false });
        Assert.That(prompt, Does.Contain("\"name\": \"get_weather\"").And.Contain("<tool_response>\nsunny, 21 C\n</tool_response>"));
        Assert.That(response.Usage!.InputTokenCount, Is.EqualTo(_model.Tokenizer.Encode(prompt).Length));

        // ToolMode None leaves the tools out.
        options.ToolMode = ChatToolMode.None;
        var without = await client.GetResponseAsync(history, options);
        Assert.That(without.Usage!.InputTokenCount, Is.EqualTo(
            _model.Tokenizer.Encode(Qwen3ChatTemplate.Hybrid.Render(expected, null, new ChatTemplateOptions { EnableThinking = false })).Length));
    }

    [Test]
    public async Task ThinkingFollowsReasoningOptions()
    {
        var c = ApiFixture.Cases[0];
        using IChatClient client = new Qwen3ChatClient(_model);
        var thinking = await client.GetResponseAsync(Messages(c), new ChatOptions { Temperature = 0, MaxOutputTokens = 1 });
        Assert.That(thinking.Usage!.InputTokenCount, Is.EqualTo(c.PromptIds.Length - 4), "default: the model opens its own think block");

        var viaProperty = new ChatOptions { Temperature = 0, MaxOutputTokens = 1, AdditionalProperties = new() { ["enable_thinking"] = false } };
        var direct = await client.GetResponseAsync(Messages(c), viaProperty);
        Assert.That(direct.Usage!.InputTokenCount, Is.EqualTo(c.PromptIds.Length));
    }

    [Test]
    public void GetServiceReturnsTheModelAndTheClient()
    {
        using var client = new Qwen3ChatClient(_model);
        IChatClient abstraction = client;
        Assert.That(abstraction.GetService<Qwen3Model>(), Is.SameAs(_model));
        Assert.That(abstraction.GetService<IChatClient>(), Is.SameAs(client));
        Assert.That(abstraction.GetService<Qwen3ChatClient>(), Is.SameAs(client));
        Assert.That(abstraction.GetService<ChatClientMetadata>()!.ProviderName, Is.EqualTo("qwen3native"));
        Assert.That(abstraction.GetService<Qwen3Model>("some key"), Is.Null);
        Assert.That(abstraction.GetService<Uri>(), Is.Null);
    }

    [Test]
    public void UnsupportedContentAndBadOptionsAreTyped()
    {
        using IChatClient client = new Qwen3ChatClient(_model);
        var image = new AIChatMessage(AIChatRole.User, [new DataContent(new byte[] { 1, 2, 3 }, "image/png")]);
        // A text-only model: refused before any work, with the engine's status for it.
        var ex = Assert.ThrowsAsync<UnsupportedInputException>(() => client.GetResponseAsync([image]));
        Assert.That(ex!.Status, Is.EqualTo(Qwen3Status.Unsupported));
        Assert.That(ex.Message, Does.Contain("vision"));

        Assert.ThrowsAsync<ArgumentOutOfRangeException>(() =>
            client.GetResponseAsync("Hi", new ChatOptions { Temperature = float.NaN }));
        Assert.ThrowsAsync<ArgumentException>(() => client.GetResponseAsync(Array.Empty<AIChatMessage>()));
    }

    [Test]
    public void CancellationThrowsOperationCanceled()
    {
        var c = ApiFixture.Cases[0];
        using IChatClient client = new Qwen3ChatClient(_model);
        using var cts = new CancellationTokenSource();
        int received = 0;
        Assert.CatchAsync<OperationCanceledException>(async () =>
        {
            await foreach (var _ in client.GetStreamingResponseAsync(Messages(c), Greedy(200), cts.Token))
                if (++received == 2)
                    cts.Cancel();
        });
    }
}
