using Qwen3Native.Generation;
using Qwen3Native.Tokenization;

namespace Qwen3Native.Tests.Api;

[TestFixture]
public class OutputKindTrackerTests
{
    private static readonly Lazy<Qwen3Tokenizer> s_tokenizer =
        new(() => Qwen3Tokenizer.FromFile(Path.Combine(ApiFixture.Directory, "tokenizer.json")));

    private static List<(string Text, OutputKind Kind)> Classify(string generated, bool startsInReasoning)
    {
        var tokenizer = s_tokenizer.Value;
        var tracker = new OutputKindTracker(tokenizer, startsInReasoning);
        return tokenizer.Encode(generated).Select(id => (tokenizer.Decode(id), tracker.Classify(id))).ToList();
    }

    private static string Joined(List<(string Text, OutputKind Kind)> pieces, OutputKind kind) =>
        string.Concat(pieces.Where(p => p.Kind == kind).Select(p => p.Text));

    [Test]
    public void SplitsReasoningAnswerAndToolCalls()
    {
        var pieces = Classify("\n<think>\nLet me look.\n</think>\n\nIt is sunny.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>", false);

        Assert.That(Joined(pieces, OutputKind.Reasoning), Is.EqualTo("\nLet me look.\n"));
        Assert.That(Joined(pieces, OutputKind.Content), Is.EqualTo("\n\n\nIt is sunny.\n"));
        Assert.That(Joined(pieces, OutputKind.ToolCall), Is.EqualTo("\n{\"name\": \"f\", \"arguments\": {}}\n"));
        Assert.That(Joined(pieces, OutputKind.Markup), Is.EqualTo("<think></think><tool_call></tool_call>"));
    }

    [Test]
    public void ThinkTagAfterTheAnswerStartedIsPlainText()
    {
        var pieces = Classify("Answer <think>not reasoning</think>", false);
        Assert.That(pieces.Select(p => p.Kind), Has.All.EqualTo(OutputKind.Content));
    }

    [Test]
    public void PromptThatOpensThinkingStartsInReasoning()
    {
        // Thinking-2507: the prompt ends with "<think>\n", so the output has only the closing tag.
        var pieces = Classify("step one</think>\n\nDone.", true);
        Assert.That(Joined(pieces, OutputKind.Reasoning), Is.EqualTo("step one"));
        Assert.That(Joined(pieces, OutputKind.Content), Is.EqualTo("\n\nDone."));
    }
}
