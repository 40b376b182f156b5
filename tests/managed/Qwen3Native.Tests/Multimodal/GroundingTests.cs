using Qwen3Native.Vision;

namespace Qwen3Native.Tests.Multimodal;

/// <summary>Qwen3-VL box answers (0–1000 normalised coordinates) read leniently and mapped to pixels; hand-computed.</summary>
public class GroundingTests
{
    [Test]
    public void FencedJsonListIsParsedAndMapped()
    {
        const string answer = "```json\n[\n  {\"bbox_2d\": [100, 200, 500, 750], \"label\": \"cat\"},\n" +
                              "  {\"bbox_2d\": [0, 0, 1000, 1000], \"label\": \"the \\\"whole\\\" image\"}\n]\n```";
        var boxes = Qwen3VLGrounding.Parse(answer);
        Assert.That(boxes, Is.EqualTo(new[]
        {
            new GroundingBox("cat", 100, 200, 500, 750),
            new GroundingBox("the \"whole\" image", 0, 0, 1000, 1000),
        }));
        // 640x480: x · 640/1000, y · 480/1000 → 64, 96, 320, 360.
        var px = Qwen3VLGrounding.Parse(answer, 640, 480);
        Assert.That(px[0], Is.EqualTo(new GroundingBox("cat", 64, 96, 320, 360)));
        Assert.That(px[1], Is.EqualTo(new GroundingBox("the \"whole\" image", 0, 0, 640, 480)));
        Assert.That(px[0].Width, Is.EqualTo(256));
    }

    [Test]
    public void LabelBeforeTheBoxAndSingleQuotes()
    {
        var boxes = Qwen3VLGrounding.Parse("Found: {'label': 'dog', 'bbox_2d': [10.5, 20, 30, 40.25]} and more text.");
        Assert.That(boxes, Is.EqualTo(new[] { new GroundingBox("dog", 10.5, 20, 30, 40.25) }));
    }

    [Test]
    public void TruncatedAnswerKeepsTheCompleteBoxes()
    {
        // The second object is cut off after its array; the third never got its numbers.
        const string answer = "[{\"bbox_2d\": [1, 2, 3, 4], \"label\": \"a\"}, {\"label\": \"b\", \"bbox_2d\": [5, 6, 7, 8]}, {\"bbox_2d\": [9, 10";
        var boxes = Qwen3VLGrounding.Parse(answer);
        Assert.That(boxes, Is.EqualTo(new[] { new GroundingBox("a", 1, 2, 3, 4), new GroundingBox("b", 5, 6, 7, 8) }));
    }

    [Test]
    public void LabelsDoNotLeakBetweenObjects()
    {
        var boxes = Qwen3VLGrounding.Parse("{\"bbox_2d\": [1, 2, 3, 4]} {\"bbox_2d\": [5, 6, 7, 8], \"label\": \"second\"}");
        Assert.That(boxes.Select(b => b.Label), Is.EqualTo(new[] { null, "second" }));
    }

    [Test]
    public void SwappedCornersAreOrderedAndOvershootIsClamped()
    {
        var box = Qwen3VLGrounding.Parse("{\"bbox_2d\": [900, 800, 100, 1010]}", 200, 100).Single();
        // Ordered: (100, 800)–(900, 1010); pixels: 20, 80, 180, 101 → y2 clamped to 100.
        Assert.That(box, Is.EqualTo(new GroundingBox(null, 20, 80, 180, 100)));
    }

    [Test]
    public void AnswerWithoutBoxesGivesNone()
    {
        Assert.That(Qwen3VLGrounding.Parse("There is no cat in this picture."), Is.Empty);
        Assert.Throws<ArgumentOutOfRangeException>(() => Qwen3VLGrounding.Parse("{\"bbox_2d\": [1, 2, 3, 4]}", 0, 10));
    }
}
