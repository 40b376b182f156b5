using Qwen3Native.Vision;

namespace Qwen3Native.Tests.Multimodal;

/// <summary>Video smart_resize, grids, pixel layout and input checks (spec §4.6–4.7).</summary>
public class VideoProcessorTests
{
    internal static VideoFrame Solid(int width, int height, byte value, double seconds)
    {
        var rgb = new byte[width * height * 3];
        Array.Fill(rgb, value);
        return VideoFrame.FromRgb(rgb, width, height, seconds);
    }

    internal static VideoFrame Gradient(int width, int height, int seed, double seconds)
    {
        var rgb = new byte[width * height * 3];
        for (int i = 0; i < rgb.Length; i++) rgb[i] = (byte)((i * 7 + seed * 31) % 251);
        return VideoFrame.FromRgb(rgb, width, height, seconds);
    }

    [Test]
    public void SpecExampleClipKeepsItsSize()
    {
        // Spec §4.7: 20 frames of 720x1280 → 704x1280 (720/32 = 22.5 rounds to 22), 880 tokens per slice.
        var size = SmartResize.ComputeVideo(20, 720, 1280);
        Assert.That(size, Is.EqualTo(new ImageSize(704, 1280)));
        Assert.That(size.Height / 32 * (size.Width / 32), Is.EqualTo(880));
    }

    [Test]
    public void LongClipIsScaledIntoTheBudget()
    {
        // 768 frames of 1080x1920: 768·1088·1920 > 25165824; β = sqrt(768·1080·1920 / 25165824) = sqrt(63.28125) = 7.95495;
        // h = floor(1080/β/32)·32 = 4·32 = 128, w = floor(1920/β/32)·32 = 7·32 = 224.
        Assert.That(SmartResize.ComputeVideo(768, 1080, 1920), Is.EqualTo(new ImageSize(128, 224)));
    }

    [Test]
    public void SmallSideIsScaledUpFirst()
    {
        // 16x64: scale = max(32/16, 32/64) = 2 → 32x128; 4·32·128 = 16384 within the limits.
        Assert.That(SmartResize.ComputeVideo(4, 16, 64), Is.EqualTo(new ImageSize(32, 128)));
    }

    [Test]
    public void FrameCountRoundsHalfToEvenForTheBudget()
    {
        // 5 frames: T̄ = round(2.5)·2 = 4, so 4·32·32 = 4096 < 6000 → β = sqrt(6000/(5·1024)) = 1.0825 → 64x64.
        // (Rounding half up would give T̄ = 6, 6144 ≥ 6000, and keep 32x32.)
        Assert.That(SmartResize.ComputeVideo(5, 32, 32, minPixels: 6000), Is.EqualTo(new ImageSize(64, 64)));
    }

    [Test]
    public void ImageSmartResizeIsUnchanged()
    {
        // The spec §4.6 examples, through the shared code path.
        Assert.That(SmartResize.Compute(1080, 1920), Is.EqualTo(new ImageSize(1088, 1920)));
        Assert.That(SmartResize.Compute(100, 100), Is.EqualTo(new ImageSize(256, 256)));
        Assert.That(SmartResize.Compute(4000, 6000), Is.EqualTo(new ImageSize(3328, 4992)));
    }

    [Test]
    public void SmallSyntheticVideoGridAndPixelCount()
    {
        // 3 frames of 64x96 (multiples of 32; 4·64·96 = 24576 within limits) → no resize; gt = 2 (last frame repeated),
        // gh = 4, gw = 6; rows = 2·4·6 = 48; columns = 3·2·16·16 = 1536; tokens per slice = 24/4 = 6.
        var frames = new[] { Solid(96, 64, 0, 0), Solid(96, 64, 128, 0.5), Solid(96, 64, 255, 1.0) };
        var v = Qwen3VLVideoProcessor.Preprocess(frames);
        Assert.That(v.Grid, Is.EqualTo(new GridThw(2, 4, 6)));
        Assert.That(v.ResizedSize, Is.EqualTo(new ImageSize(64, 96)));
        Assert.That((v.Rows, v.Columns), Is.EqualTo((48, 1536)));
        Assert.That(v.PixelValues, Has.Length.EqualTo(48 * 1536));
        Assert.That(v.TokensPerSlice, Is.EqualTo(6));
        Assert.That(v.VideoTokenCount, Is.EqualTo(12));
        Assert.That(v.SliceTimestamps, Is.EqualTo(new[] { 0.25, 1.0 }));

        // Within a row: channel-major, then the temporal pair (τ), then 16x16 pixels. Slice 0 pairs frames 0 and 1,
        // slice 1 pairs frame 2 with its copy. (x − 127.5)/127.5: 0 → −1, 128 → 0.5/127.5, 255 → 1.
        float mid = (128 - 127.5f) / 127.5f;
        var s0 = v.SlicePixelValues(0).Span;
        var s1 = v.SlicePixelValues(1).Span;
        Assert.That(s0.Length, Is.EqualTo(24 * 1536));
        for (int row = 0; row < 24; row++)
        for (int c = 0; c < 3; c++)
        {
            int b = row * 1536 + c * 512;
            Assert.That(s0[b], Is.EqualTo(-1f));
            Assert.That(s0[b + 255], Is.EqualTo(-1f));
            Assert.That(s0[b + 256], Is.EqualTo(mid).Within(1e-7f));
            Assert.That(s0[b + 511], Is.EqualTo(mid).Within(1e-7f));
            Assert.That(s1[b], Is.EqualTo(1f));
            Assert.That(s1[b + 511], Is.EqualTo(1f));
        }
    }

    [Test]
    public void TwoIdenticalFramesEqualTheImagePath()
    {
        // A still image is a temporal patch of two identical frames; at a size neither path resizes, the pixel values
        // must agree exactly, which pins the shared normalise and patchify order.
        var frame = Gradient(64, 32, 3, 0);
        var v = Qwen3VLVideoProcessor.Preprocess([frame, new VideoFrame(frame.Image, 0.5)]);
        var image = Qwen3VLImageProcessor.Preprocess(frame.Image, new Qwen3VLImageProcessorOptions { MinPixels = 2048 });
        Assert.That(image.Grid, Is.EqualTo(new GridThw(1, 2, 4)));
        Assert.That(v.Grid, Is.EqualTo(image.Grid));
        Assert.That(v.PixelValues, Is.EqualTo(image.PixelValues));
    }

    [Test]
    public void ResizedFramesMatchTheImageResize()
    {
        // 2 frames of 50x40: T̄·h̄·w̄ = 2·32·64 = 4096 → no budget change; 40x50 → 32x64 (round(40/32) = 1, round(50/32) = 2).
        // Each frame then goes through the same bicubic resize as an image resized to 32x64.
        var a = Gradient(50, 40, 1, 0);
        var b = Gradient(50, 40, 2, 1);
        var v = Qwen3VLVideoProcessor.Preprocess([a, b]);
        Assert.That(v.ResizedSize, Is.EqualTo(new ImageSize(32, 64)));
        var options = new Qwen3VLImageProcessorOptions { MinPixels = 2048 };
        var ia = Qwen3VLImageProcessor.Preprocess(a.Image, options);
        var ib = Qwen3VLImageProcessor.Preprocess(b.Image, options);
        Assert.That(ia.ResizedSize, Is.EqualTo(new ImageSize(32, 64)));
        // Column blocks per channel: [τ=0: 256 values][τ=1: 256 values]; the image path has its frame in both.
        for (int row = 0; row < v.Rows; row++)
        for (int c = 0; c < 3; c++)
        {
            int at = row * 1536 + c * 512;
            Assert.That(v.PixelValues.AsSpan(at, 256).ToArray(), Is.EqualTo(ia.PixelValues.AsSpan(at, 256).ToArray()));
            Assert.That(v.PixelValues.AsSpan(at + 256, 256).ToArray(), Is.EqualTo(ib.PixelValues.AsSpan(at + 256, 256).ToArray()));
        }
    }

    [Test]
    public void ZeroFramesAreATypedError() =>
        Assert.Throws<VideoInputException>(() => Qwen3VLVideoProcessor.Preprocess(Array.Empty<VideoFrame>()));

    [Test]
    public void OneFrameIsLessThanATemporalPatch()
    {
        var ex = Assert.Throws<VideoInputException>(() => Qwen3VLVideoProcessor.Preprocess([Solid(32, 32, 1, 0)]));
        Assert.That(ex!.Message, Does.Contain("at least 2 frames"));
    }

    [Test]
    public void MismatchedFrameSizesAreATypedError()
    {
        var ex = Assert.Throws<VideoInputException>(() =>
            Qwen3VLVideoProcessor.Preprocess([Solid(32, 32, 1, 0), Solid(32, 32, 1, 1), Solid(64, 32, 1, 2)]));
        Assert.That(ex!.Message, Does.Contain("frame 2 is 64x32"));
    }

    [Test]
    public void DecreasingTimestampsAreATypedError() =>
        Assert.Throws<VideoInputException>(() => Qwen3VLVideoProcessor.Preprocess([Solid(32, 32, 1, 1), Solid(32, 32, 1, 0.5)]));

    [Test]
    public void BadTimestampsAreRejectedOnTheFrame()
    {
        Assert.Throws<VideoInputException>(() => Solid(32, 32, 1, double.NaN));
        Assert.Throws<VideoInputException>(() => Solid(32, 32, 1, -1));
    }

    [Test]
    public void TooManyFramesIsASizeError()
    {
        var frame = Solid(32, 32, 1, 0);
        var frames = Enumerable.Range(0, 769).Select(i => new VideoFrame(frame.Image, i / 2.0)).ToArray();
        var ex = Assert.Throws<VideoSizeException>(() => Qwen3VLVideoProcessor.Preprocess(frames));
        Assert.That(ex!.Frames, Is.EqualTo(769));
    }

    [Test]
    public void OversizedFramesAreASizeError()
    {
        var options = new Qwen3VLVideoProcessorOptions { MaxInputPixels = 1000 };
        var ex = Assert.Throws<VideoSizeException>(() => Qwen3VLVideoProcessor.Preprocess([Solid(32, 32, 1, 0), Solid(32, 32, 1, 1)], options));
        Assert.That((ex!.Width, ex.Height), Is.EqualTo((32L, 32L)));
    }

    [Test]
    public void ResultTooLargeForOneArrayIsASizeError()
    {
        // A min_pixels budget that scales a 32x32 clip up to 32768x32768 (β = sqrt(2·32768² / 2048) = 1024) would need
        // 2048·2048 rows of 1536 floats, more than one array holds; the check comes before any allocation of that size.
        var options = new Qwen3VLVideoProcessorOptions { MinPixels = 2L * 32768 * 32768, MaxPixels = 4L * 32768 * 32768 };
        Assert.Throws<VideoSizeException>(() => Qwen3VLVideoProcessor.Preprocess([Solid(32, 32, 1, 0), Solid(32, 32, 1, 1)], options));
    }
}
