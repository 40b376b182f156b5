using Qwen3Native.Chat;

namespace Qwen3Native.Tests.Multimodal;

/// <summary>
/// The Qwen3-VL template's handling of content parts (spec §7.3, qwen3_vl.jinja): expected strings written by hand
/// from the template's rules.
/// </summary>
public class VisionTemplateTests
{
    private const string Img = "<|vision_start|><|image_pad|><|vision_end|>";
    private const string Vid = "<|vision_start|><|video_pad|><|vision_end|>";

    private static ImagePart Image() => ImagePart.FromRgb(new byte[2 * 2 * 3], 2, 2);

    private static VideoPart Video() => VideoPart.FromFile("/nonexistent/clip.mp4");

    [Test]
    public void ImageThenTextRendersTheSpecExample()
    {
        var msgs = new[] { ChatMessage.User(Image(), "Describe this.") };
        Assert.That(Qwen3ChatTemplate.VL.Render(msgs),
            Is.EqualTo("<|im_start|>user\n" + Img + "Describe this.<|im_end|>\n<|im_start|>assistant\n"));
    }

    [Test]
    public void PartsRenderInOrderWithoutSeparators()
    {
        var msgs = new[] { ChatMessage.User("Compare ", Image(), " and ", Video(), "!") };
        Assert.That(Qwen3ChatTemplate.VL.Render(msgs, options: new ChatTemplateOptions { AddGenerationPrompt = false }),
            Is.EqualTo("<|im_start|>user\nCompare " + Img + " and " + Vid + "!<|im_end|>\n"));
    }

    [Test]
    public void VisionIdsCountAcrossTheConversation()
    {
        var msgs = new[]
        {
            ChatMessage.User(Image(), Video(), "a"),
            ChatMessage.Assistant("ok"),
            ChatMessage.User(Image(), Video(), Image()),
        };
        var options = new ChatTemplateOptions { AddVisionId = true };
        Assert.That(Qwen3ChatTemplate.VL.Render(msgs, options: options), Is.EqualTo(
            "<|im_start|>user\nPicture 1: " + Img + "Video 1: " + Vid + "a<|im_end|>\n" +
            "<|im_start|>assistant\nok<|im_end|>\n" +
            "<|im_start|>user\nPicture 2: " + Img + "Video 2: " + Vid + "Picture 3: " + Img + "<|im_end|>\n" +
            "<|im_start|>assistant\n"));
    }

    [Test]
    public void ToolResponsesCarryImages()
    {
        var msgs = new[]
        {
            ChatMessage.User("Take a picture."),
            ChatMessage.Assistant("", toolCalls: [ToolCall.FromText("camera", "{}")]),
            ChatMessage.FromParts(ChatRole.Tool, [Image()]),
            ChatMessage.Tool("done"),
        };
        Assert.That(Qwen3ChatTemplate.VL.Render(msgs), Is.EqualTo(
            "<|im_start|>user\nTake a picture.<|im_end|>\n" +
            "<|im_start|>assistant\n<tool_call>\n{\"name\": \"camera\", \"arguments\": {}}\n</tool_call><|im_end|>\n" +
            "<|im_start|>user\n<tool_response>\n" + Img + "\n</tool_response>\n<tool_response>\ndone\n</tool_response><|im_end|>\n" +
            "<|im_start|>assistant\n"));
    }

    [Test]
    public void SystemAndAssistantPartsRenderTheirTextOnly()
    {
        var msgs = new[]
        {
            ChatMessage.FromParts(ChatRole.System, ["Be ", Image(), "brief."]),
            ChatMessage.User("Hi"),
            ChatMessage.FromParts(ChatRole.Assistant, [Image(), "Hello"]),
        };
        var prompt = Qwen3ChatTemplate.VL.RenderPrompt(msgs, options: new ChatTemplateOptions { AddGenerationPrompt = false });
        Assert.That(prompt.Text, Is.EqualTo(
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"));
        Assert.That(prompt.Media, Is.Empty, "media the template does not render must not be fed to the model");
    }

    [Test]
    public void MultipartAssistantContentIsTruthyForTheToolCallSeparator()
    {
        // Jinja tests message.content, a non-empty list here, so a newline comes before the first call.
        var m = ChatMessage.FromParts(ChatRole.Assistant, [Image()], toolCalls: [ToolCall.FromText("f", "{}")]);
        Assert.That(Qwen3ChatTemplate.VL.Render([ChatMessage.User("q"), m], options: new ChatTemplateOptions { AddGenerationPrompt = false }),
            Does.EndWith("<|im_start|>assistant\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call><|im_end|>\n"));
    }

    [Test]
    public void LaterSystemMessagesAreDroppedAndNothingElseDiffersFromInstruct2507()
    {
        var msgs = new[] { ChatMessage.System("S"), ChatMessage.User("Q"), ChatMessage.System("late"), ChatMessage.Assistant("<think>r</think>A") };
        Assert.That(Qwen3ChatTemplate.VL.Render(msgs), Is.EqualTo(
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n<think>r</think>A<|im_end|>\n<|im_start|>assistant\n"));
        var withoutLate = new[] { msgs[0], msgs[1], msgs[3] };
        Assert.That(Qwen3ChatTemplate.VL.Render(withoutLate), Is.EqualTo(Qwen3ChatTemplate.Instruct2507.Render(withoutLate)));
    }

    [Test]
    public void RenderPromptListsMediaInPlaceholderOrder()
    {
        var a = Image();
        var v = Video();
        var b = Image();
        var prompt = Qwen3ChatTemplate.VL.RenderPrompt([ChatMessage.User(a, v), ChatMessage.User("x", b)]);
        Assert.That(prompt.Media, Is.EqualTo(new ChatContentPart[] { a, v, b }));
    }

    [Test]
    public void TextTemplatesRefuseMedia()
    {
        var msgs = new[] { ChatMessage.User(Image(), "What is this?") };
        foreach (var t in new[] { Qwen3ChatTemplate.Hybrid, Qwen3ChatTemplate.Instruct2507, Qwen3ChatTemplate.Thinking2507 })
            Assert.Throws<NotSupportedException>(() => t.Render(msgs), t.Kind.ToString());
    }

    [Test]
    public void TextOnlyPartsRenderAsTheJoinedString()
    {
        var parts = new[] { ChatMessage.User("Hello, ", "world") };
        var plain = new[] { ChatMessage.User("Hello, world") };
        Assert.That(parts[0].Content, Is.EqualTo("Hello, world"));
        Assert.That(parts[0].HasMedia, Is.False);
        foreach (var t in new[] { Qwen3ChatTemplate.Hybrid, Qwen3ChatTemplate.Instruct2507, Qwen3ChatTemplate.VL })
            Assert.That(t.Render(parts), Is.EqualTo(t.Render(plain)), t.Kind.ToString());
    }

    [Test]
    public void StringMessagesExposeOneTextPart()
    {
        var m = ChatMessage.User("hi");
        Assert.That(m.IsMultipart, Is.False);
        Assert.That(m.Parts, Has.Count.EqualTo(1));
        Assert.That(((TextPart)m.Parts[0]).Text, Is.EqualTo("hi"));
        Assert.That(ChatMessage.User("").Parts, Is.Empty);
    }

    [Test]
    public void DetectsTheVisionTemplate()
    {
        // The distinguishing fragments of qwen3_vl.jinja (spec §7.3); the Thinking variant was never read, so it is not guessed.
        const string vl = "{%- if tools %}<|im_start|>system\n{%- endif %}{%- for message in messages %}" +
            "<|vision_start|><|image_pad|><|vision_end|><tool_response>{%- endfor %}";
        Assert.That(Qwen3ChatTemplate.Detect(vl)?.Kind, Is.EqualTo(Qwen3TemplateKind.Qwen3VL));
        Assert.That(Qwen3ChatTemplate.Detect(vl + "<think>\n"), Is.Null);
        Assert.That(Qwen3ChatTemplate.For(Qwen3TemplateKind.Qwen3VL), Is.SameAs(Qwen3ChatTemplate.VL));
    }
}
