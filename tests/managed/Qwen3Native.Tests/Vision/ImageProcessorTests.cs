using Qwen3Native.Vision;

namespace Qwen3Native.Tests.Vision;

public sealed class ImageProcessorTests
{
    /// <summary>
    /// Every input value encodes its (t, c, y, x); the expected matrix is built by walking the spec's 9-D view and
    /// permutation literally (generic strides), independent of the processor's own index arithmetic.
    /// </summary>
    [Test]
    public void PatchifyFollowsTheSpecPermutationElementByElement()
    {
        const int T = 4, C = 3, H = 64, W = 96, P = 16, TP = 2, M = 2;
        var frames = new float[T * C * H * W];
        for (int t = 0; t < T; t++) for (int c = 0; c < C; c++) for (int y = 0; y < H; y++) for (int x = 0; x < W; x++)
            frames[((t * C + c) * H + y) * W + x] = t * 1_000_000 + c * 100_000 + y * 1000 + x; // exact in float32

        float[] got = Qwen3VLImageProcessor.Patchify(frames, T, C * H * W, C, H, W, P, TP, M);

        int gt = T / TP, gh = H / P, gw = W / P;
        int[] viewShape = [gt, TP, C, gh / M, M, P, gw / M, M, P];
        int[] viewStrides = new int[9];
        viewStrides[8] = 1;
        for (int d = 7; d >= 0; d--) viewStrides[d] = viewStrides[d + 1] * viewShape[d + 1];
        int[] perm = [0, 3, 6, 4, 7, 2, 1, 5, 8];
        var expected = new float[frames.Length];
        var idx = new int[9];
        for (int o = 0; o < expected.Length; o++)
        {
            int rem = o;
            for (int d = 8; d >= 0; d--) { idx[d] = rem % viewShape[perm[d]]; rem /= viewShape[perm[d]]; }
            int src = 0;
            for (int d = 0; d < 9; d++) src += idx[d] * viewStrides[perm[d]];
            expected[o] = frames[src];
        }

        Assert.That(got.Length, Is.EqualTo(gt * gh * gw * C * TP * P * P));
        for (int i = 0; i < expected.Length; i++)
            if (got[i] != expected[i])
                Assert.Fail($"element {i} (row {i / (C * TP * P * P)}, col {i % (C * TP * P * P)}): got {got[i]}, expected {expected[i]}");

        // Spot-check the meaning, too: row 1 is the top-right patch of the first 2x2 merge block (mw = 1),
        // row 2 its bottom-left (mh = 1); within a row, channel outermost, then frame, then py, px.
        int cols = C * TP * P * P;
        Assert.That(got[1 * cols + 0], Is.EqualTo(0 * 1_000_000 + 0 + 0 * 1000 + 16));
        Assert.That(got[2 * cols + 0], Is.EqualTo(16 * 1000));
        Assert.That(got[0 * cols + P * P], Is.EqualTo(1_000_000)); // τ = 1 comes before c = 1
        Assert.That(got[0 * cols + TP * P * P], Is.EqualTo(100_000));
        Assert.That(got[4 * cols], Is.EqualTo(32)); // row 4: next merge block to the right
    }

    [Test]
    public void NormalisationMapsBytesToMinusOneOne()
    {
        byte[] rgb = [0, 128, 255, 255, 0, 51];
        float[] planar = Qwen3VLImageProcessor.NormalizeToPlanar(rgb, 2, 1, [0.5f, 0.5f, 0.5f], [0.5f, 0.5f, 0.5f]);
        // Planar [C, H, W]: R of both pixels, then G, then B; values are float32 (x − 127.5) / 127.5.
        Assert.That(planar, Is.EqualTo(new[] { -1f, 1f, 0.5f / 127.5f, -1f, 1f, (51 - 127.5f) / 127.5f }));
        Assert.That(planar[4], Is.EqualTo(1f));
    }

    [Test]
    public void SingleImageGivesDuplicatedFramesGridAndTokenCount()
    {
        const int w = 37, h = 91;
        var rgb = MakeImage(w, h);
        var r = Qwen3VLImageProcessor.Preprocess(rgb, w, h);
        // 91x37 → round: 3·32 = 96, 1·32 = 32 → 3072 < min → β = sqrt(65536/3367) = 4.4118 → ceil(12.55)=13, ceil(5.10)=6
        Assert.That(r.ResizedSize, Is.EqualTo(new ImageSize(416, 192)));
        Assert.That(r.Grid, Is.EqualTo(new GridThw(1, 26, 12)));
        Assert.That(r.Rows, Is.EqualTo(26 * 12));
        Assert.That(r.Columns, Is.EqualTo(1536));
        Assert.That(r.ImageTokenCount, Is.EqualTo(26 * 12 / 4));
        Assert.That(r.PixelValues, Has.Length.EqualTo(r.Rows * r.Columns));
        // Frames τ = 0 and τ = 1 of every channel are the same still image.
        for (int row = 0; row < r.Rows; row += 17)
            for (int c = 0; c < 3; c++)
                for (int k = 0; k < 256; k++)
                    Assert.That(r.PixelValues[row * 1536 + (c * 2 + 1) * 256 + k], Is.EqualTo(r.PixelValues[row * 1536 + c * 2 * 256 + k]));
        Assert.That(r.PixelValues.All(v => v >= -1f && v <= 1f));
    }

    [Test]
    public void OnePixelImageUpscalesToAConstantTile()
    {
        var r = Qwen3VLImageProcessor.Preprocess(new byte[] { 0, 255, 51 }, 1, 1);
        Assert.That(r.ResizedSize, Is.EqualTo(new ImageSize(256, 256)));
        Assert.That(r.ImageTokenCount, Is.EqualTo(64));
        float b = (51 - 127.5f) / 127.5f;
        for (int row = 0; row < r.Rows; row++)
        {
            Assert.That(r.PixelValues[row * 1536], Is.EqualTo(-1f));
            Assert.That(r.PixelValues[row * 1536 + 512], Is.EqualTo(1f));
            Assert.That(r.PixelValues[row * 1536 + 1535], Is.EqualTo(b));
        }
    }

    [Test]
    public void ResamplerIsIdentityAtSameSizeAndKeepsFlatImagesFlat()
    {
        var img = MakeImage(64, 32);
        Assert.That(BicubicResampler.Resize(img, 64, 32, 3, 64, 32), Is.EqualTo(img));
        var flat = Enumerable.Repeat((byte)200, 50 * 70 * 3).ToArray();
        foreach (var (dw, dh) in new[] { (64, 96), (17, 23), (500, 40) })
            Assert.That(BicubicResampler.Resize(flat, 50, 70, 3, dw, dh).All(v => v is >= 199 and <= 201), $"{dw}x{dh}");
        // Keys' kernel weights at the tap offsets 0, ±1, ±2 of an exact 1:1 grid.
        Assert.That(BicubicResampler.Filter(0), Is.EqualTo(1.0));
        Assert.That(BicubicResampler.Filter(1), Is.EqualTo(0.0));
        Assert.That(BicubicResampler.Filter(0.5), Is.EqualTo(0.5625));
        Assert.That(BicubicResampler.Filter(1.5), Is.EqualTo(-0.0625));
    }

    [Test]
    public void DeclaredSizeIsGuardedBeforeAllocation()
    {
        // No buffer of the declared size exists; the guard must fire on the numbers alone.
        Assert.That(() => Qwen3VLImageProcessor.Preprocess(ReadOnlySpan<byte>.Empty, int.MaxValue, int.MaxValue),
            Throws.TypeOf<ImageSizeException>().With.Message.Contains("exceeds the input limit"));
        var small = new Qwen3VLImageProcessorOptions { MaxInputPixels = 1000 };
        var ex = Assert.Throws<ImageSizeException>(() => Qwen3VLImageProcessor.Preprocess(new byte[40 * 30 * 3], 40, 30, small));
        Assert.That(ex!.Width, Is.EqualTo(40));
        Assert.That(ex.Height, Is.EqualTo(30));
        Assert.That(ex, Is.InstanceOf<ArgumentOutOfRangeException>());
        Assert.That(() => Qwen3VLImageProcessor.Preprocess(new byte[10], 2, 2), Throws.ArgumentException);
        Assert.That(() => Qwen3VLImageProcessor.Preprocess(ReadOnlySpan<byte>.Empty, 0, 5), Throws.TypeOf<ImageSizeException>());
    }

    [Test]
    public void ElongatedInputsFollowSmartResizeRules()
    {
        // 20000x1 is beyond smart_resize's 200:1 limit: refused with a clear error, not resampled.
        Assert.That(() => Qwen3VLImageProcessor.Preprocess(new byte[20000 * 3], 20000, 1),
            Throws.TypeOf<ImageSizeException>().With.Message.Contains("aspect ratio"));
        // 200x1 is allowed and becomes 32 rows of 3648 columns.
        var r = Qwen3VLImageProcessor.Preprocess(MakeImage(200, 1), 200, 1);
        Assert.That(r.ResizedSize, Is.EqualTo(new ImageSize(32, 3648)));
        Assert.That(r.Grid, Is.EqualTo(new GridThw(1, 2, 228)));
    }

    /// <summary>The synthetic image make_gold.py builds: (x·7 + y·13 + c·101 + (x·y) mod 31) mod 256, interleaved RGB.</summary>
    internal static byte[] MakeImage(int width, int height)
    {
        var rgb = new byte[width * height * 3];
        for (int y = 0; y < height; y++)
            for (int x = 0; x < width; x++)
                for (int c = 0; c < 3; c++)
                    rgb[(y * width + x) * 3 + c] = (byte)(((long)x * 7 + (long)y * 13 + c * 101 + ((long)x * y) % 31) % 256);
        return rgb;
    }
}
