using Qwen3Native.Chat;

namespace Qwen3Native.Tests.Chat;

public class ChatOutputParserTests
{
    [Test]
    public void SplitsThinkBlockFromAnswer()
    {
        var o = ChatOutputParser.Parse("<think>\nLet me see.\nOK.\n</think>\n\nThe answer is 4.<|im_end|>");
        Assert.That(o.Reasoning, Is.EqualTo("Let me see.\nOK."));
        Assert.That(o.ReasoningClosed, Is.True);
        Assert.That(o.Content, Is.EqualTo("The answer is 4."));
        Assert.That(o.ToolCalls, Is.Empty);
        Assert.That(o.ToolCallErrors, Is.Empty);
    }

    [Test]
    public void NoThinkBlock()
    {
        var o = ChatOutputParser.Parse("Just an answer.\nTwo lines.");
        Assert.That(o.Reasoning, Is.Null);
        Assert.That(o.Content, Is.EqualTo("Just an answer.\nTwo lines."));
    }

    [Test]
    public void EmptyThinkBlockFromDisabledThinking()
    {
        var o = ChatOutputParser.Parse("<think>\n\n</think>\n\nHi");
        Assert.That(o.Reasoning, Is.EqualTo(""));
        Assert.That(o.Content, Is.EqualTo("Hi"));
    }

    [Test]
    public void UnclosedThinkBlockIsAllReasoning()
    {
        var o = ChatOutputParser.Parse("<think>\nstill going <tool_call>{\"name\":\"x\"}</tool_call>");
        Assert.That(o.Reasoning, Is.EqualTo("still going <tool_call>{\"name\":\"x\"}</tool_call>"));
        Assert.That(o.ReasoningClosed, Is.False);
        Assert.That(o.Content, Is.EqualTo(""));
        Assert.That(o.ToolCalls, Is.Empty);
    }

    [Test]
    public void ThinkOpenedByThePrompt()
    {
        var o = ChatOutputParser.Parse("reasoning here\n</think>\n\nanswer", promptOpenedThinking: true);
        Assert.That(o.Reasoning, Is.EqualTo("reasoning here"));
        Assert.That(o.Content, Is.EqualTo("answer"));

        var open = ChatOutputParser.Parse("cut off mid-thought", promptOpenedThinking: true);
        Assert.That(open.Reasoning, Is.EqualTo("cut off mid-thought"));
        Assert.That(open.ReasoningClosed, Is.False);
        Assert.That(open.Content, Is.EqualTo(""));
    }

    [Test]
    public void LoneClosingTagMeansThePromptOpenedTheBlock()
    {
        var o = ChatOutputParser.Parse("thoughts</think>\n\nanswer");
        Assert.That(o.Reasoning, Is.EqualTo("thoughts"));
        Assert.That(o.Content, Is.EqualTo("answer"));
    }

    [Test]
    public void ThinkTagsInsideTheAnswerAreText()
    {
        var o = ChatOutputParser.Parse("Use <think> and </think> tags.");
        Assert.That(o.Reasoning, Is.Null);
        Assert.That(o.Content, Is.EqualTo("Use <think> and </think> tags."));
    }

    [Test]
    public void MultipleToolCalls()
    {
        string text = "<think>\nneed two\n</think>\n\nChecking.\n" +
                      "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>\n" +
                      "<tool_call>\n{\"name\": \"search\", \"arguments\": {\"q\": \"é\", \"n\": 2, \"f\": {\"x\": [1, 2.5]}}}\n</tool_call><|im_end|>\n";
        var o = ChatOutputParser.Parse(text);
        Assert.That(o.Reasoning, Is.EqualTo("need two"));
        Assert.That(o.Content, Is.EqualTo("Checking."));
        Assert.That(o.ToolCallErrors, Is.Empty);
        Assert.That(o.ToolCalls.Select(c => c.Name), Is.EqualTo(new[] { "get_weather", "search" }));
        Assert.That(o.ToolCalls[0].Arguments.GetProperty("city").GetString(), Is.EqualTo("Paris"));
        Assert.That(o.ToolCalls[1].Arguments.GetProperty("f").GetProperty("x")[1].GetDouble(), Is.EqualTo(2.5));
        Assert.That(o.ToolCalls[1].RawText, Is.EqualTo("\n{\"name\": \"search\", \"arguments\": {\"q\": \"é\", \"n\": 2, \"f\": {\"x\": [1, 2.5]}}}\n"));
    }

    [Test]
    public void BadJsonIsReportedAndOtherCallsSurvive()
    {
        string text = "<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": }\n</tool_call>\n" +
                      "<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>";
        var o = ChatOutputParser.Parse(text);
        Assert.That(o.ToolCalls.Select(c => c.Name), Is.EqualTo(new[] { "b" }));
        Assert.That(o.ToolCallErrors, Has.Count.EqualTo(1));
        Assert.That(o.ToolCallErrors[0].RawText, Is.EqualTo("\n{\"name\": \"a\", \"arguments\": {\"x\": }\n"));
        Assert.That(o.ToolCallErrors[0].Message, Does.StartWith("invalid JSON"));
        Assert.That(o.Content, Is.EqualTo(""));
    }

    [Test]
    public void UnterminatedToolCallIsReported()
    {
        var o = ChatOutputParser.Parse("ok\n<tool_call>\n{\"name\": \"a\", \"argu");
        Assert.That(o.Content, Is.EqualTo("ok"));
        Assert.That(o.ToolCalls, Is.Empty);
        Assert.That(o.ToolCallErrors.Single().RawText, Is.EqualTo("\n{\"name\": \"a\", \"argu"));
        Assert.That(o.ToolCallErrors.Single().Message, Does.Contain("unterminated"));
    }

    [TestCase("[1,2]", "not a JSON object")]
    [TestCase("{\"arguments\": {}}", "no \"name\"")]
    [TestCase("{\"name\": \"f\", \"arguments\": [1]}", "\"arguments\" is not a JSON object")]
    [TestCase("{\"name\": \"f\", \"arguments\": \"{oops\"}", "\"arguments\" string is not valid JSON")]
    public void MalformedCallsAreReported(string body, string message)
    {
        var o = ChatOutputParser.Parse("<tool_call>" + body + "</tool_call>");
        Assert.That(o.ToolCalls, Is.Empty);
        Assert.That(o.ToolCallErrors.Single().Message, Does.Contain(message));
        Assert.That(o.ToolCallErrors.Single().RawText, Is.EqualTo(body));
    }

    [Test]
    public void StringEncodedArgumentsAndMissingArgumentsAreAccepted()
    {
        var o = ChatOutputParser.Parse("<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": 1}\"}</tool_call><tool_call>{\"name\": \"g\"}</tool_call>");
        Assert.That(o.ToolCallErrors, Is.Empty);
        Assert.That(o.ToolCalls[0].Arguments.GetProperty("a").GetInt32(), Is.EqualTo(1));
        Assert.That(o.ToolCalls[1].Arguments.EnumerateObject(), Is.Empty);
    }

    [Test]
    public void TextAfterEndOfTurnIsIgnored()
    {
        var o = ChatOutputParser.Parse("answer<|endoftext|>garbage<tool_call>{}</tool_call>");
        Assert.That(o.Content, Is.EqualTo("answer"));
        Assert.That(o.ToolCallErrors, Is.Empty);
    }

    /// <summary>Parsing what the model wrote and putting it back into the history renders the same text.</summary>
    [Test]
    public void ParsedOutputRoundTripsThroughTheTemplate()
    {
        var noGen = new ChatTemplateOptions { AddGenerationPrompt = false };
        var history = new List<ChatMessage> { ChatMessage.User("Weather in Paris?") };
        const string generated = "<think>\nCall the tool.\n</think>\n\nLet me check.\n" +
                                 "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"days\": 2}}\n</tool_call>";

        foreach (var template in new[] { Qwen3ChatTemplate.Hybrid, Qwen3ChatTemplate.Thinking2507 })
        {
            bool opened = template.PromptOpensThinking();
            string prompt = template.Render(history);
            string output = opened ? generated.Substring("<think>\n".Length) : generated;
            var parsed = ChatOutputParser.Parse(output + "<|im_end|>", opened);
            var next = new List<ChatMessage>(history) { ChatMessage.Assistant(parsed) };
            Assert.That(template.Render(next, null, noGen), Is.EqualTo(prompt + output + "<|im_end|>\n"), template.Kind.ToString());
        }
    }
}
