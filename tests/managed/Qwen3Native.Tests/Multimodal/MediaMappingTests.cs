using Microsoft.Extensions.AI;
using Qwen3Native.AI;
using Qwen3Native.Chat;
using AIChatMessage = Microsoft.Extensions.AI.ChatMessage;
using AIChatRole = Microsoft.Extensions.AI.ChatRole;

namespace Qwen3Native.Tests.Multimodal;

/// <summary>DataContent and UriContent to content parts (IChatClient mapping); no engine needed.</summary>
public class MediaMappingTests
{
    private static Qwen3Native.Chat.ChatMessage Single(params AIContent[] contents) =>
        ChatMapping.ToConversation([new AIChatMessage(AIChatRole.User, contents)], null).Single();

    [Test]
    public void ImageDataBecomesAnImagePartInOrder()
    {
        var m = Single(new TextContent("What is "), new DataContent(new byte[] { 1, 2, 3 }, "image/png"), new TextContent("?"));
        Assert.That(m.IsMultipart && m.HasMedia, Is.True);
        Assert.That(m.Parts, Has.Count.EqualTo(3));
        Assert.That(((TextPart)m.Parts[0]).Text, Is.EqualTo("What is "));
        var image = (ImagePart)m.Parts[1];
        Assert.That(image.SourceKind, Is.EqualTo(ImageSourceKind.EncodedBytes));
        Assert.That(((TextPart)m.Parts[2]).Text, Is.EqualTo("?"));
        Assert.That(Qwen3ChatTemplate.VL.Render([m], options: new ChatTemplateOptions { AddGenerationPrompt = false }),
            Is.EqualTo("<|im_start|>user\nWhat is " + Qwen3ChatTemplate.ImagePlaceholder + "?<|im_end|>\n"));
    }

    [Test]
    public void VideoDataBecomesAVideoPart()
    {
        var m = Single(new DataContent(new byte[] { 0, 0, 0, 24 }, "video/mp4"));
        Assert.That(((VideoPart)m.Parts.Single()).SourceKind, Is.EqualTo(VideoSourceKind.EncodedBytes));
    }

    [Test]
    public void FileUrisAndPathsBecomeFileParts()
    {
        var fromUri = Single(new UriContent(new Uri("file:///data/cat%20photo.jpg"), "image/jpeg"));
        Assert.That(((ImagePart)fromUri.Parts.Single()).Path, Is.EqualTo("/data/cat photo.jpg"));
        var fromPath = Single(new UriContent(new Uri("/data/clip.mp4"), "video/mp4"));
        Assert.That(((VideoPart)fromPath.Parts.Single()).Path, Is.EqualTo("/data/clip.mp4"));
        var relative = Single(new UriContent(new Uri("frames/a.png", UriKind.Relative), "image/png"));
        Assert.That(((ImagePart)relative.Parts.Single()).Path, Is.EqualTo("frames/a.png"));
    }

    [TestCase("https://example.com/cat.png?token=secret", "https")]
    [TestCase("http://example.com/cat.png", "http")]
    [TestCase("ftp://example.com/cat.png", "ftp")]
    [TestCase("file://server/share/cat.png", "file")]
    public void OtherUrisNameTheirSchemeAndFetchNothing(string uri, string scheme)
    {
        var ex = Assert.Throws<UnsupportedUriSchemeException>(() => Single(new UriContent(new Uri(uri), "image/png")));
        Assert.That(ex!.Scheme, Is.EqualTo(scheme));
        Assert.That(ex.Message, Does.Contain("'" + scheme + "'"));
        Assert.That(ex.Message, Does.Not.Contain("secret"));
        Assert.That(ex, Is.InstanceOf<NotSupportedException>());
    }

    [Test]
    public void OtherMediaTypesAreNotSupported()
    {
        Assert.Throws<NotSupportedException>(() => Single(new DataContent(new byte[] { 1 }, "audio/wav")));
        Assert.Throws<NotSupportedException>(() => Single(new UriContent(new Uri("file:///a.pdf"), "application/pdf")));
    }

    [Test]
    public void ToolMessagesKeepTheirImages()
    {
        var conversation = ChatMapping.ToConversation(
            [new AIChatMessage(AIChatRole.Tool, [new TextContent("shot: "), new DataContent(new byte[] { 9 }, "image/jpeg")])], null);
        var m = conversation.Single();
        Assert.That(m.Role, Is.EqualTo(Qwen3Native.Chat.ChatRole.Tool));
        Assert.That(m.Parts.Select(p => p.GetType()), Is.EqualTo(new[] { typeof(TextPart), typeof(ImagePart) }));
    }

    [Test]
    public void TextOnlyMessagesAreUnchanged()
    {
        var m = Single(new TextContent("a"), new TextContent("b"));
        Assert.That(m.IsMultipart, Is.False);
        Assert.That(m.Content, Is.EqualTo("ab"));
    }
}
