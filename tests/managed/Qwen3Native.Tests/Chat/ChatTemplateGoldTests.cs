using Qwen3Native.Chat;

namespace Qwen3Native.Tests.Chat;

/// <summary>Every case of gold.json, rendered by transformers' apply_chat_template, must come out byte for byte.</summary>
public class ChatTemplateGoldTests
{
    public static IEnumerable<TestCaseData> GoldCases()
    {
        var cases = ChatGold.Load();
        if (cases is null)
        {
            yield return new TestCaseData(-1).SetArgDisplayNames("gold.json missing");
            yield break;
        }
        foreach (var c in cases)
            yield return new TestCaseData(c.Index).SetArgDisplayNames(c.ToString());
    }

    private static ChatGold.Case Get(int index)
    {
        var cases = ChatGold.Load();
        if (cases is null || index < 0)
            Assert.Fail(ChatGold.MissingMessage);
        return cases![index];
    }

    [TestCaseSource(nameof(GoldCases))]
    public void RendersLikeTransformers_TypedTools(int index)
    {
        var c = Get(index);
        string actual = c.Renderer.Render(c.Messages, c.TypedTools(), c.Options);
        Assert.That(actual == c.Rendered, Is.True, () => ChatGold.Diff(c.Rendered, actual));
    }

    [TestCaseSource(nameof(GoldCases))]
    public void RendersLikeTransformers_JsonTools(int index)
    {
        var c = Get(index);
        string actual = c.Renderer.Render(c.Messages, c.JsonTools(), c.Options);
        Assert.That(actual == c.Rendered, Is.True, () => ChatGold.Diff(c.Rendered, actual));
    }

    [Test]
    public void GoldCoversEveryTemplateAndOption()
    {
        var cases = ChatGold.Load();
        if (cases is null)
            Assert.Fail(ChatGold.MissingMessage);
        foreach (var t in new[] { "qwen3", "qwen3_instruct_2507", "qwen3_thinking_2507" })
        {
            Assert.That(cases!.Any(c => c.Template == t && c.EnableThinking == false && c.AddGenerationPrompt), t);
            Assert.That(cases!.Any(c => c.Template == t && c.EnableThinking is null && !c.AddGenerationPrompt), t);
            Assert.That(cases!.Any(c => c.Template == t && c.Messages.Any(m => m.ToolCalls.Count > 0)), t);
        }
    }
}
