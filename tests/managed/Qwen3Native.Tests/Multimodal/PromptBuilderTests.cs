using Qwen3Native.Chat;
using Qwen3Native.Tests.Tokenization;
using Qwen3Native.Vision;

namespace Qwen3Native.Tests.Multimodal;

/// <summary>
/// The segment list of a prepared Qwen3-VL prompt, against the processor's expansion written out by hand (spec §4.5)
/// and tokenised in one piece.
/// </summary>
public class PromptBuilderTests
{
    private const int VisionStart = 151652, VisionEnd = 151653, ImagePad = 151655, VideoPad = 151656;

    private static MultimodalPromptBuilder Builder() => new(TokenizerFixture.Tokenizer);

    private static VideoPart FourFrameVideo() => VideoPart.FromFrames(
        new[] { 0.0, 0.5, 1.0, 1.5 }.Select((t, i) => VideoProcessorTests.Gradient(64, 64, i, t)));

    [Test]
    public void SpecialTokenIdsComeFromTheTokenizer()
    {
        var b = Builder();
        Assert.That((b.VisionStartTokenId, b.VisionEndTokenId, b.ImagePadTokenId, b.VideoPadTokenId),
            Is.EqualTo((VisionStart, VisionEnd, ImagePad, VideoPad)));
    }

    [Test]
    public void ImageAndVideoSegmentsInOrder()
    {
        var image = ImagePart.FromRgb(new byte[64 * 64 * 3], 64, 64);
        var video = FourFrameVideo();
        var prompt = Qwen3ChatTemplate.VL.RenderPrompt([ChatMessage.User(image, "Describe.", video)]);
        var built = Builder().Build(prompt);
        var tok = TokenizerFixture.Tokenizer;

        // Image 64x64 → smart_resize 256x256 (min_pixels) → grid (1, 16, 16) → 64 pads.
        // Video: 4 frames 64x64, 4·64·64 = 16384 in [4096, 25165824] → grid (2, 4, 4) → 2 slices of 4 pads,
        // times (0 + 0.5)/2 = 0.25 → "<0.2 seconds>" and (1 + 1.5)/2 = 1.25 → "<1.2 seconds>".
        var s = built.Segments;
        Assert.That(s, Has.Count.EqualTo(7));
        Assert.That(((TokenSegment)s[0]).TokenIds, Is.EqualTo(tok.Encode("<|im_start|>user\n").Append(VisionStart)));
        var img = (VisionSegment)s[1];
        Assert.That((img.Kind, img.Grid, img.TokenCount, img.PadTokenId), Is.EqualTo((VisionKind.Image, new GridThw(1, 16, 16), 64, ImagePad)));
        Assert.That(img.PixelValues.Length, Is.EqualTo(256 * 1536));
        Assert.That(((TokenSegment)s[2]).TokenIds,
            Is.EqualTo(new[] { VisionEnd }.Concat(tok.Encode("Describe.<0.2 seconds>")).Append(VisionStart)));
        var v0 = (VisionSegment)s[3];
        Assert.That((v0.Kind, v0.Grid, v0.TokenCount, v0.PadTokenId, v0.SliceIndex), Is.EqualTo((VisionKind.Video, new GridThw(1, 4, 4), 4, VideoPad, 0)));
        Assert.That(v0.TimestampSeconds, Is.EqualTo(0.25));
        Assert.That(v0.PixelValues.Length, Is.EqualTo(16 * 1536));
        Assert.That(((TokenSegment)s[4]).TokenIds, Is.EqualTo(new[] { VisionEnd }.Concat(tok.Encode("<1.2 seconds>")).Append(VisionStart)));
        var v1 = (VisionSegment)s[5];
        Assert.That((v1.Grid, v1.SliceIndex, v1.TimestampSeconds), Is.EqualTo((new GridThw(1, 4, 4), 1, (double?)1.25)));
        Assert.That(((TokenSegment)s[6]).TokenIds, Is.EqualTo(new[] { VisionEnd }.Concat(tok.Encode("<|im_end|>\n<|im_start|>assistant\n"))));

        // The slices are consecutive windows of the video's processor output.
        var video0 = built.Videos[0];
        Assert.That(v0.PixelValues.ToArray(), Is.EqualTo(video0.PixelValues.AsSpan(0, 16 * 1536).ToArray()));
        Assert.That(v1.PixelValues.ToArray(), Is.EqualTo(video0.PixelValues.AsSpan(16 * 1536).ToArray()));

        string expanded = "<|im_start|>user\n<|vision_start|>" + string.Concat(Enumerable.Repeat("<|image_pad|>", 64)) +
            "<|vision_end|>Describe.<0.2 seconds><|vision_start|>" + string.Concat(Enumerable.Repeat("<|video_pad|>", 4)) +
            "<|vision_end|><1.2 seconds><|vision_start|>" + string.Concat(Enumerable.Repeat("<|video_pad|>", 4)) +
            "<|vision_end|><|im_end|>\n<|im_start|>assistant\n";
        Assert.That(built.ToExpandedTokenIds(), Is.EqualTo(tok.Encode(expanded)));
        Assert.That(built.TokenCount, Is.EqualTo(tok.Encode(expanded).Length));
        Assert.That(built.ToExpandedTokenIds().Count(id => id == ImagePad), Is.EqualTo(64));
        Assert.That(built.ToExpandedTokenIds().Count(id => id == VideoPad), Is.EqualTo(8));
    }

    [Test]
    public void TimestampSharesItsRunWithTheTextBefore()
    {
        // "x<0.2 seconds>" as one run: its ids are those of the whole string, not of "x" and "<0.2 seconds>" joined.
        var prompt = Qwen3ChatTemplate.VL.RenderPrompt([ChatMessage.User("x", FourFrameVideo())], options: new ChatTemplateOptions { AddGenerationPrompt = false });
        var built = Builder().Build(prompt);
        var tok = TokenizerFixture.Tokenizer;
        Assert.That(((TokenSegment)built.Segments[0]).TokenIds, Is.EqualTo(tok.Encode("<|im_start|>user\nx<0.2 seconds>").Append(VisionStart)));
    }

    [Test]
    public void PlaceholderAndMediaCountsMustMatch()
    {
        var b = Builder();
        var image = ImagePart.FromRgb(new byte[32 * 32 * 3], 32, 32);
        Assert.Throws<ArgumentException>(() => b.Build(Qwen3ChatTemplate.ImagePlaceholder, []));
        Assert.Throws<ArgumentException>(() => b.Build("no placeholder", [image]));
        Assert.Throws<ArgumentException>(() => b.Build(Qwen3ChatTemplate.VideoPlaceholder, [image]), "kind mismatch");
    }

    [Test]
    public void StrayPadTokensInTextAreRefused()
    {
        var ex = Assert.Throws<ArgumentException>(() => Builder().Build("look: <|image_pad|>", []));
        Assert.That(ex!.Message, Does.Contain("<|image_pad|>"));
    }

    [Test]
    public void TextOnlyPromptIsOneTokenSegment()
    {
        var built = Builder().Build("<|im_start|>user\nhi<|im_end|>\n", []);
        Assert.That(built.Segments, Has.Count.EqualTo(1));
        Assert.That(built.ToExpandedTokenIds(), Is.EqualTo(TokenizerFixture.Tokenizer.Encode("<|im_start|>user\nhi<|im_end|>\n")));
    }
}
