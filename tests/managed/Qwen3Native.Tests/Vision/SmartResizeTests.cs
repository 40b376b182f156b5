using Qwen3Native.Vision;

namespace Qwen3Native.Tests.Vision;

/// <summary>smart_resize against cases worked by hand from the formula of spec §4.6.</summary>
public sealed class SmartResizeTests
{
    [TestCase(1024, 1024, 1024, 1024)]
    [TestCase(480, 640, 480, 640)]
    [TestCase(1080, 1920, 1088, 1920)] // 33.75 → 34
    [TestCase(100, 100, 256, 256)]     // min_pixels branch: β = 2.56, ceil(8) = 8
    [TestCase(4000, 6000, 3328, 4992)] // max_pixels branch: 187.5 rounds to even 188 first, then floor after β
    [TestCase(720, 1280, 704, 1280)]   // 22.5 rounds half-to-even down to 22
    [TestCase(1, 1, 256, 256)]         // tiny: both sides round to 0, then the min branch scales up
    [TestCase(2400, 12, 3648, 32)]     // short side 12 rounds to 0: the min_pixels branch scales it up (transformers 5.17)
    [TestCase(2000, 28, 2176, 32)]     // 62.5 ties to 62 → 1984·32 < min_pixels → β = 1.0818 → ceil 68, ceil 1
    public void SpecCases(int h, int w, int eh, int ew)
    {
        Assert.That(SmartResize.Compute(h, w), Is.EqualTo(new ImageSize(eh, ew)));
    }

    [Test]
    public void TokenCountsOfSpecExamples()
    {
        static long Tokens(ImageSize s) => (long)s.Height * s.Width / (32 * 32);
        Assert.Multiple(() =>
        {
            Assert.That(Tokens(SmartResize.Compute(1080, 1920)), Is.EqualTo(2040));
            Assert.That(Tokens(SmartResize.Compute(4000, 6000)), Is.EqualTo(16224));
            Assert.That(Tokens(SmartResize.Compute(100, 100)), Is.EqualTo(64));
        });
    }

    [Test]
    public void AspectRatioAbove200IsRefused()
    {
        Assert.That(() => SmartResize.Compute(1, 20000), Throws.TypeOf<ImageSizeException>().With.Message.Contains("aspect ratio"));
        Assert.That(() => SmartResize.Compute(201, 1), Throws.TypeOf<ImageSizeException>());
        Assert.That(SmartResize.Compute(200, 1), Is.EqualTo(new ImageSize(3648, 32))); // exactly 200 is allowed
    }

    [Test]
    public void NonPositiveSidesAreRefused()
    {
        Assert.That(() => SmartResize.Compute(0, 10), Throws.TypeOf<ImageSizeException>());
        Assert.That(() => SmartResize.Compute(10, -1), Throws.TypeOf<ImageSizeException>());
    }

    [Test]
    public void ResultIsAlwaysWithinLimitsAndAligned()
    {
        var rng = new Random(1234);
        for (int i = 0; i < 2000; i++)
        {
            int h = rng.Next(1, 9000), w = Math.Clamp(rng.Next(1, 9000), (h + 199) / 200, h * 200);
            var s = SmartResize.Compute(h, w);
            Assert.That(s.Height % 32 == 0 && s.Width % 32 == 0, $"{h}x{w} → {s}");
            long px = (long)s.Height * s.Width;
            Assert.That(px, Is.LessThanOrEqualTo(Qwen3VLImageDefaults.MaxPixels), $"{h}x{w} → {s}");
        }
    }
}
