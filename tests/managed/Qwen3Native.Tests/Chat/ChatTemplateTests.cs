using System.Text.Json;
using Qwen3Native.Chat;

namespace Qwen3Native.Tests.Chat;

/// <summary>Cases checked by hand against the Jinja sources in tests/fixtures/chat/templates.</summary>
public class ChatTemplateTests
{
    private static readonly ChatTemplateOptions Gen = new() { AddGenerationPrompt = true };
    private static readonly ChatTemplateOptions NoGen = new() { AddGenerationPrompt = false };

    private static JsonElement Json(string s)
    {
        using var doc = JsonDocument.Parse(s);
        return doc.RootElement.Clone();
    }

    [Test]
    public void GenerationPromptPerVariant()
    {
        var msgs = new[] { ChatMessage.User("Hello!") };
        const string head = "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n";
        Assert.That(Qwen3ChatTemplate.Hybrid.Render(msgs, null, Gen), Is.EqualTo(head));
        Assert.That(Qwen3ChatTemplate.Hybrid.Render(msgs, null, Gen with { EnableThinking = true }), Is.EqualTo(head));
        Assert.That(Qwen3ChatTemplate.Hybrid.Render(msgs, null, Gen with { EnableThinking = false }),
            Is.EqualTo(head + "<think>\n\n</think>\n\n"));
        Assert.That(Qwen3ChatTemplate.Instruct2507.Render(msgs, null, Gen with { EnableThinking = false }), Is.EqualTo(head));
        Assert.That(Qwen3ChatTemplate.Thinking2507.Render(msgs, null, Gen with { EnableThinking = false }), Is.EqualTo(head + "<think>\n"));
        Assert.That(Qwen3ChatTemplate.Hybrid.Render(msgs, null, NoGen with { EnableThinking = false }),
            Is.EqualTo("<|im_start|>user\nHello!<|im_end|>\n"));
    }

    [Test]
    public void EarlierThinkingIsDroppedButCurrentTurnKeepsIt()
    {
        var msgs = new[]
        {
            ChatMessage.System("S"),
            ChatMessage.User("Q1"),
            ChatMessage.Assistant("<think>\nold\n</think>\n\nA1"),
            ChatMessage.User("Q2"),
            ChatMessage.Assistant("A2", reasoningContent: "\nnew\n"),
        };
        string expected =
            "<|im_start|>system\nS<|im_end|>\n" +
            "<|im_start|>user\nQ1<|im_end|>\n" +
            "<|im_start|>assistant\nA1<|im_end|>\n" +
            "<|im_start|>user\nQ2<|im_end|>\n" +
            "<|im_start|>assistant\n<think>\nnew\n</think>\n\nA2<|im_end|>\n";
        Assert.That(Qwen3ChatTemplate.Hybrid.Render(msgs, null, NoGen), Is.EqualTo(expected));
        Assert.That(Qwen3ChatTemplate.Thinking2507.Render(msgs, null, NoGen), Is.EqualTo(expected));
        // Instruct-2507 knows nothing of reasoning: content goes out as given, reasoning_content is ignored.
        Assert.That(Qwen3ChatTemplate.Instruct2507.Render(msgs, null, NoGen), Is.EqualTo(
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n" +
            "<|im_start|>assistant\n<think>\nold\n</think>\n\nA1<|im_end|>\n" +
            "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n"));
    }

    [Test]
    public void ToolsGoIntoTheSystemTurnAndCallsAndResultsAreFramed()
    {
        var tools = new[]
        {
            new ToolDefinition("get_weather", "Météo", Json("{\"type\":\"object\",\"properties\":{\"city\":{\"type\":\"string\"}},\"required\":[\"city\"]}")),
        };
        var msgs = new[]
        {
            ChatMessage.System("S"),
            ChatMessage.User("Q"),
            ChatMessage.Assistant("", toolCalls: new[]
            {
                ToolCall.FromJson("get_weather", Json("{\"city\":\"Zürich\",\"days\":1.0}")),
                ToolCall.FromText("get_weather", "{\"city\":\"Bern\"}"),
            }),
            ChatMessage.Tool("r1"),
            ChatMessage.Tool("r2"),
        };
        string expected =
            "<|im_start|>system\nS\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n" +
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n" +
            "{\"type\": \"function\", \"function\": {\"name\": \"get_weather\", \"description\": \"Météo\", \"parameters\": " +
            "{\"type\": \"object\", \"properties\": {\"city\": {\"type\": \"string\"}}, \"required\": [\"city\"]}}}\n</tools>\n\n" +
            "For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n" +
            "<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" +
            "<|im_start|>user\nQ<|im_end|>\n" +
            "<|im_start|>assistant\n<think>\n\n</think>\n\n" +
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\", \"days\": 1.0}}\n</tool_call>\n" +
            "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\":\"Bern\"}}\n</tool_call><|im_end|>\n" +
            "<|im_start|>user\n<tool_response>\nr1\n</tool_response>\n<tool_response>\nr2\n</tool_response><|im_end|>\n" +
            "<|im_start|>assistant\n";
        // The assistant turn is after the last query but not last and has no reasoning: no think block for it...
        string actual = Qwen3ChatTemplate.Hybrid.Render(msgs, tools, Gen);
        Assert.That(actual, Is.EqualTo(expected.Replace("<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>", "<|im_start|>assistant\n<tool_call>")));
        // ...while as the last message it gets an (empty) one.
        string lastOnly = Qwen3ChatTemplate.Hybrid.Render(msgs[..3], tools, NoGen);
        Assert.That(lastOnly, Does.EndWith("<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Zürich\", \"days\": 1.0}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\":\"Bern\"}}\n</tool_call><|im_end|>\n"));
    }

    [Test]
    public void ToolCallAfterTextIsSeparatedByANewline()
    {
        var msgs = new[]
        {
            ChatMessage.User("Q"),
            ChatMessage.Assistant("Let me look.", toolCalls: new[] { ToolCall.FromJson("f", Json("{}")) }),
        };
        Assert.That(Qwen3ChatTemplate.Instruct2507.Render(msgs, null, NoGen), Is.EqualTo(
            "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nLet me look.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call><|im_end|>\n"));
    }

    [Test]
    public void ToolResponseWrappedUserMessageIsNotAQuery()
    {
        var msgs = new[]
        {
            ChatMessage.User("Q"),
            ChatMessage.Assistant("<think>r</think>A"),
            ChatMessage.User("<tool_response>\nx\n</tool_response>"),
        };
        // The assistant turn stays after the last real query, but it is not last and its reasoning is kept.
        Assert.That(Qwen3ChatTemplate.Hybrid.Render(msgs, null, NoGen), Is.EqualTo(
            "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>\nr\n</think>\n\nA<|im_end|>\n" +
            "<|im_start|>user\n<tool_response>\nx\n</tool_response><|im_end|>\n"));
    }

    [Test]
    public void EmptyToolListCountsAsNoTools()
    {
        var msgs = new[] { ChatMessage.System("S"), ChatMessage.User("Q") };
        Assert.That(Qwen3ChatTemplate.Hybrid.Render(msgs, Array.Empty<ToolDefinition>(), NoGen),
            Is.EqualTo("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"));
    }

    [Test]
    public void EmptyConversationIsRejected() =>
        Assert.Throws<ArgumentException>(() => Qwen3ChatTemplate.Hybrid.Render(Array.Empty<ChatMessage>()));

    [TestCase("qwen3.jinja", Qwen3TemplateKind.Qwen3Hybrid)]
    [TestCase("qwen3_instruct_2507.jinja", Qwen3TemplateKind.Qwen3Instruct2507)]
    [TestCase("qwen3_thinking_2507.jinja", Qwen3TemplateKind.Qwen3Thinking2507)]
    public void DetectsTheShippedTemplates(string file, Qwen3TemplateKind kind)
    {
        string text = File.ReadAllText(Path.Combine(ChatGold.FixtureDir, "templates", file));
        Assert.That(Qwen3ChatTemplate.Detect(text)?.Kind, Is.EqualTo(kind));
    }

    [Test]
    public void DetectRejectsOtherTemplates()
    {
        Assert.That(Qwen3ChatTemplate.Detect(null), Is.Null);
        Assert.That(Qwen3ChatTemplate.Detect("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"), Is.Null);
    }

    [Test]
    public void OnlyThinking2507PromptOpensTheThinkBlock()
    {
        Assert.That(Qwen3ChatTemplate.Thinking2507.PromptOpensThinking(Gen), Is.True);
        Assert.That(Qwen3ChatTemplate.Thinking2507.PromptOpensThinking(NoGen), Is.False);
        Assert.That(Qwen3ChatTemplate.Hybrid.PromptOpensThinking(Gen), Is.False);
        Assert.That(Qwen3ChatTemplate.Instruct2507.PromptOpensThinking(Gen), Is.False);
    }

    [Test]
    public void JsonStringArgumentsAreRenderedVerbatim()
    {
        var call = ToolCall.FromJson("f", Json("\"{\\\"a\\\":1}\""));
        Assert.That(call.ArgumentsText, Is.EqualTo("{\"a\":1}"));
        var msgs = new[] { ChatMessage.User("Q"), ChatMessage.Assistant(null, toolCalls: new[] { call }) };
        Assert.That(Qwen3ChatTemplate.Thinking2507.Render(msgs, null, NoGen), Does.EndWith(
            "<|im_start|>assistant\n<think>\n\n</think>\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\":1}}\n</tool_call><|im_end|>\n"));
    }
}
