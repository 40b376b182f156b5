using Qwen3Native.Vision;

namespace Qwen3Native.Tests.Multimodal;

/// <summary>Frame sampling, per-slice timestamps and their text (spec §4.5, §4.7); expected values computed by hand.</summary>
public class VideoSamplingTests
{
    [Test]
    public void TenSecondsAtThirtyFpsSampledAtTwoFps()
    {
        // n = int(300 / 30 · 2) = 20; indices = round(i · 299/19), ties to even, last = 299.
        int[] idx = Qwen3VLVideoProcessor.SampleFrameIndices(300, 30.0);
        Assert.That(idx, Is.EqualTo(new[] { 0, 16, 31, 47, 63, 79, 94, 110, 126, 142, 157, 173, 189, 205, 220, 236, 252, 268, 283, 299 }));
        var ts = VideoTimestamps.PerSlice(idx.Select(i => i / 30.0).ToArray());
        Assert.That(ts, Has.Length.EqualTo(10));
        // (0 + 16/30)/2 = 0.2667; (31/30 + 47/30)/2 = 1.3
        Assert.That(VideoTimestamps.Format(ts[0]), Is.EqualTo("<0.3 seconds>"));
        Assert.That(VideoTimestamps.Format(ts[1]), Is.EqualTo("<1.3 seconds>"));
        Assert.That(ts[9], Is.EqualTo((283 / 30.0 + 299 / 30.0) / 2).Within(1e-12));
    }

    [Test]
    public void ShortVideoIsRaisedToMinFrames()
    {
        // 1 s at 30 fps: int(30/30·2) = 2 → max(2, 4) = 4; linspace(0, 29, 4) = 0, 9.67, 19.33, 29.
        Assert.That(Qwen3VLVideoProcessor.SampleFrameIndices(30, 30.0), Is.EqualTo(new[] { 0, 10, 19, 29 }));
    }

    [Test]
    public void MinFramesNeverExceedsTheFrameCount()
    {
        // 3 frames: int(3/30·2) = 0 → 4 → min(4, 768, 3) = 3.
        Assert.That(Qwen3VLVideoProcessor.SampleFrameIndices(3, 30.0), Is.EqualTo(new[] { 0, 1, 2 }));
    }

    [Test]
    public void LongVideoIsCappedAtMaxFrames()
    {
        // 1000 s at 25 fps: int(25000/25·2) = 2000 → 768; step 24999/767 = 32.593…
        int[] idx = Qwen3VLVideoProcessor.SampleFrameIndices(25_000, 25.0);
        Assert.That(idx, Has.Length.EqualTo(768));
        Assert.That(idx[..4], Is.EqualTo(new[] { 0, 33, 65, 98 }));
        Assert.That(idx[^2..], Is.EqualTo(new[] { 24966, 24999 }));
        var custom = new Qwen3VLVideoProcessorOptions { MaxFrames = 10, Fps = 1 };
        Assert.That(Qwen3VLVideoProcessor.SampleFrameIndices(25_000, 25.0, custom), Has.Length.EqualTo(10));
    }

    [Test]
    public void UnknownSourceRateIsTakenAs24()
    {
        // 48 frames at the assumed 24 fps: int(48/24·2) = 4; linspace(0, 47, 4) = 0, 15.67, 31.33, 47.
        Assert.That(Qwen3VLVideoProcessor.SampleFrameIndices(48, null), Is.EqualTo(new[] { 0, 16, 31, 47 }));
    }

    [Test]
    public void IndicesRoundHalfToEven()
    {
        // linspace(0, 5, 3) = 0, 2.5, 5 → 2.5 rounds to 2; linspace(0, 3, 3) = 0, 1.5, 3 → 1.5 rounds to 2.
        Assert.That(Qwen3VLVideoProcessor.SampleFrameIndices(6, 30, new Qwen3VLVideoProcessorOptions { NumFrames = 3 }), Is.EqualTo(new[] { 0, 2, 5 }));
        Assert.That(Qwen3VLVideoProcessor.SampleFrameIndices(4, 30, new Qwen3VLVideoProcessorOptions { NumFrames = 3 }), Is.EqualTo(new[] { 0, 2, 3 }));
    }

    [Test]
    public void SpecTimestampExample()
    {
        // Spec §4.5: indices 0, 15, 30, 45 at 30 fps → "<0.2 seconds>", "<1.2 seconds>" (0.25 and 1.25, ties to even).
        var ts = VideoTimestamps.PerSlice(new[] { 0 / 30.0, 15 / 30.0, 30 / 30.0, 45 / 30.0 });
        Assert.That(ts, Is.EqualTo(new[] { 0.25, 1.25 }));
        Assert.That(ts.Select(VideoTimestamps.Format), Is.EqualTo(new[] { "<0.2 seconds>", "<1.2 seconds>" }));
    }

    [Test]
    public void OddFrameCountRepeatsTheLastTime()
    {
        // 0, 1, 2 → padded 0, 1, 2, 2 → means 0.5 and 2.
        Assert.That(VideoTimestamps.PerSlice(new[] { 0.0, 1.0, 2.0 }), Is.EqualTo(new[] { 0.5, 2.0 }));
    }

    [TestCase(0.25, 1, "0.2")]
    [TestCase(0.75, 1, "0.8")]
    [TestCase(0.35, 1, "0.3")] // stored as 0.34999…
    [TestCase(0.05, 1, "0.1")] // stored as 0.05000…03
    [TestCase(12345.65, 1, "12345.6")]
    [TestCase(2.5, 0, "2")]
    [TestCase(0.0, 1, "0.0")]
    [TestCase(7.0, 1, "7.0")]
    public void FixedFormatMatchesPython(double value, int decimals, string expected) =>
        Assert.That(VideoTimestamps.FormatFixed(value, decimals), Is.EqualTo(expected));

    [Test]
    public void ZeroFramesAreRejected()
    {
        Assert.Throws<VideoInputException>(() => Qwen3VLVideoProcessor.SampleFrameIndices(0, 30));
        Assert.Throws<VideoInputException>(() => VideoTimestamps.PerSlice(Array.Empty<double>()));
    }
}
