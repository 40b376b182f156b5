using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;

namespace Qwen3Native.Vision;

/// <summary>
/// Antialiased bicubic resize of interleaved 8-bit images, bit-compatible in intent with what
/// transformers' Qwen2VLImageProcessorFast gets from torchvision on the CPU: <c>F.resize(uint8, bicubic,
/// antialias=True)</c> takes torch's native uint8 path (<c>_upsample_bicubic2d_aa</c>), a separable Keys cubic
/// (a = −0.5) whose support widens by the scale when shrinking, weights normalised per output pixel then quantised to
/// int16 with a precision chosen from the largest weight, horizontal pass first with a uint8 intermediate, then the
/// vertical pass. That is the Pillow-SIMD design, so it also agrees with PIL BICUBIC (the slow processor) to within
/// one 8-bit step. A processor run on CUDA resizes in float and rounds once, which can also differ by one step.
/// </summary>
internal static class BicubicResampler
{
    private const double CubicA = -0.5;
    private const double Support = 2.0; // bicubic interp_size 4 / 2

    /// <summary>Per-axis filter taps: for output i, <c>Count[i]</c> weights starting at input index <c>Start[i]</c>.</summary>
    private sealed class Taps
    {
        public required int[] Start { get; init; }
        public required int[] Count { get; init; }
        public required short[] Weights { get; init; } // [outSize * KernelSize]
        public required int KernelSize { get; init; }
        public required int Precision { get; init; }
    }

    public static unsafe byte[] Resize(ReadOnlySpan<byte> src, int srcWidth, int srcHeight, int channels, int dstWidth, int dstHeight)
    {
        // Rows are resized horizontally first into an 8-bit buffer, exactly as torch does, so rounding happens twice.
        byte[] horizontal;
        if (dstWidth == srcWidth)
        {
            horizontal = src.ToArray(); // a same-size cubic pass is the identity; skip it as torch does
        }
        else
        {
            var tx = ComputeTaps(srcWidth, dstWidth);
            horizontal = new byte[checked((long)dstWidth * srcHeight * channels)];
            for (int y = 0; y < srcHeight; y++)
            {
                var srcRow = src.Slice(y * srcWidth * channels, srcWidth * channels);
                var dstRow = horizontal.AsSpan(y * dstWidth * channels, dstWidth * channels);
                for (int x = 0; x < dstWidth; x++)
                {
                    int start = tx.Start[x], count = tx.Count[x];
                    var w = tx.Weights.AsSpan(x * tx.KernelSize, count);
                    for (int c = 0; c < channels; c++)
                    {
                        int acc = 1 << (tx.Precision - 1);
                        for (int k = 0; k < count; k++) acc += srcRow[(start + k) * channels + c] * w[k];
                        dstRow[x * channels + c] = Clamp8(acc >> tx.Precision);
                    }
                }
            }
        }

        if (dstHeight == srcHeight) return horizontal;

        var ty = ComputeTaps(srcHeight, dstHeight);
        int rowLen = dstWidth * channels;
        var result = new byte[checked((long)rowLen * dstHeight)];
        unsafe
        {
            // The same integer arithmetic as before through pointers: the per-element bounds checks were most of
            // the time of a 1920x1080 image (the taps' rows always lie inside `horizontal`, see ComputeTaps).
            fixed (byte* h = horizontal)
            fixed (byte* r = result)
            fixed (short* weights = ty.Weights)
            {
                for (int y = 0; y < dstHeight; y++)
                {
                    int start = ty.Start[y], count = ty.Count[y];
                    short* w = weights + y * ty.KernelSize;
                    byte* dstRow = r + (long)y * rowLen;
                    byte* first = h + (long)start * rowLen;
                    int i = 0;
                    if (Avx2.IsSupported)
                    {
                        // Eight columns at a time, the same int32 sums, shift and clamp as the scalar loop.
                        var round = Vector256.Create(1 << (ty.Precision - 1));
                        var zero = Vector256<int>.Zero;
                        var max = Vector256.Create(255);
                        int* lanes = stackalloc int[8];
                        for (; i + 8 <= rowLen; i += 8)
                        {
                            var acc = round;
                            byte* column = first + i;
                            for (int k = 0; k < count; k++)
                                acc = Avx2.Add(acc, Avx2.MultiplyLow(Avx2.ConvertToVector256Int32(column + (long)k * rowLen), Vector256.Create((int)w[k])));
                            var v = Avx2.Min(Avx2.Max(Avx2.ShiftRightArithmetic(acc, (byte)ty.Precision), zero), max);
                            v.Store(lanes);
                            for (int j = 0; j < 8; j++) dstRow[i + j] = (byte)lanes[j];
                        }
                    }
                    for (; i < rowLen; i++)
                    {
                        int acc = 1 << (ty.Precision - 1);
                        byte* column = first + i;
                        for (int k = 0; k < count; k++) acc += column[(long)k * rowLen] * w[k];
                        dstRow[i] = Clamp8(acc >> ty.Precision);
                    }
                }
            }
        }
        return result;
    }

    private static byte Clamp8(int v) => (byte)(v < 0 ? 0 : v > 255 ? 255 : v);

    internal static double Filter(double x)
    {
        x = Math.Abs(x);
        // Written in torch's cubic_convolution1/2 forms: a different but equivalent polynomial can move a weight by
        // one ulp, and that can flip an int16 rounding.
        if (x < 1.0) return ((CubicA + 2) * x - (CubicA + 3)) * x * x + 1;
        if (x < 2.0) return ((CubicA * x - 5 * CubicA) * x + 8 * CubicA) * x - 4 * CubicA;
        return 0.0;
    }

    private static Taps ComputeTaps(int inSize, int outSize)
    {
        double scale = (double)inSize / outSize;
        double support = scale >= 1.0 ? Support * scale : Support;
        double invScale = scale >= 1.0 ? 1.0 / scale : 1.0;
        int kernelSize = (int)Math.Ceiling(support) * 2 + 1;

        var start = new int[outSize];
        var count = new int[outSize];
        var weights = new double[(long)outSize * kernelSize];
        double wMax = 0.0;
        for (int i = 0; i < outSize; i++)
        {
            double center = scale * (i + 0.5);
            // (long) truncates toward zero like the C++ static_cast, which matters for the negative left edge.
            int xmin = (int)Math.Max((long)(center - support + 0.5), 0L);
            int xsize = (int)Math.Min((long)(center + support + 0.5), inSize) - xmin;
            xsize = Math.Min(xsize, kernelSize);
            double total = 0.0;
            var row = weights.AsSpan(i * kernelSize, kernelSize);
            for (int j = 0; j < xsize; j++)
            {
                double w = Filter((j + xmin - center + 0.5) * invScale);
                row[j] = w;
                total += w;
            }
            if (total != 0.0)
            {
                for (int j = 0; j < xsize; j++)
                {
                    row[j] /= total;
                    wMax = Math.Max(wMax, row[j]);
                }
            }
            start[i] = xmin;
            count[i] = xsize;
        }

        // The largest precision (< 22 bits) at which the largest weight still fits an int16 with a spare bit.
        int precision;
        for (precision = 0; precision < 22; precision++)
        {
            int next = (int)(0.5 + wMax * (1 << (precision + 1)));
            if (next >= (1 << 15)) break;
        }
        precision = Math.Max(precision, 1);

        var quantised = new short[weights.Length];
        for (long j = 0; j < weights.Length; j++)
        {
            double v = weights[j] * (1 << precision);
            quantised[j] = (short)(int)(v < 0 ? v - 0.5 : v + 0.5);
        }
        return new Taps { Start = start, Count = count, Weights = quantised, KernelSize = kernelSize, Precision = precision };
    }
}
