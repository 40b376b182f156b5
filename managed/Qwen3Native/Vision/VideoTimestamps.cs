using System.Globalization;
using System.Numerics;
using System.Text;

namespace Qwen3Native.Vision;

/// <summary>
/// The time text Qwen3-VL writes before each temporal patch of a video (spec §4.5): one time per patch, the mean of
/// its first and last frame, printed as Python's <c>f"&lt;{t:.1f} seconds&gt;"</c>.
/// </summary>
public static class VideoTimestamps
{
    /// <summary>
    /// Pads the frame times to whole temporal patches by repeating the last one, then averages the first and last time
    /// of each patch.
    /// </summary>
    public static double[] PerSlice(IReadOnlyList<double> frameSeconds, int temporalPatchSize = Qwen3VLImageDefaults.TemporalPatchSize)
    {
        ArgumentNullException.ThrowIfNull(frameSeconds);
        ArgumentOutOfRangeException.ThrowIfLessThan(temporalPatchSize, 1);
        if (frameSeconds.Count == 0)
            throw new VideoInputException("A video needs at least one frame.", nameof(frameSeconds));
        int slices = (frameSeconds.Count + temporalPatchSize - 1) / temporalPatchSize;
        var result = new double[slices];
        for (int s = 0; s < slices; s++)
        {
            double first = frameSeconds[s * temporalPatchSize];
            double last = frameSeconds[Math.Min(s * temporalPatchSize + temporalPatchSize - 1, frameSeconds.Count - 1)];
            result[s] = (first + last) / 2;
        }
        return result;
    }

    /// <summary>"&lt;{seconds:.1f} seconds&gt;", rounded as Python rounds it.</summary>
    public static string Format(double seconds) => "<" + FormatFixed(seconds, 1) + " seconds>";

    /// <summary>
    /// Python's <c>format(value, f".{decimals}f")</c>: the exact binary value rounded half to even. .NET's "F1" rounds
    /// the midpoint away from zero, so 0.25 would print as 0.3 where Python (and the model's training data) has 0.2.
    /// </summary>
    internal static string FormatFixed(double value, int decimals)
    {
        if (!double.IsFinite(value))
            throw new ArgumentOutOfRangeException(nameof(value), value, "Only finite values have a fixed-point form.");
        ArgumentOutOfRangeException.ThrowIfNegative(decimals);
        bool negative = double.IsNegative(value);
        long bits = BitConverter.DoubleToInt64Bits(Math.Abs(value));
        int biased = (int)(bits >> 52) & 0x7FF;
        long fraction = bits & 0xF_FFFF_FFFF_FFFFL;
        // value = mantissa · 2^exponent exactly.
        BigInteger mantissa = biased == 0 ? fraction : fraction | (1L << 52);
        int exponent = (biased == 0 ? 1 : biased) - 1075;

        BigInteger scaled = mantissa * BigInteger.Pow(10, decimals);
        BigInteger q;
        if (exponent >= 0)
        {
            q = scaled << exponent;
        }
        else
        {
            BigInteger den = BigInteger.One << -exponent;
            q = BigInteger.DivRem(scaled, den, out var r);
            int cmp = (r * 2).CompareTo(den);
            if (cmp > 0 || (cmp == 0 && !q.IsEven))
                q += 1;
        }

        string digits = q.ToString(CultureInfo.InvariantCulture).PadLeft(decimals + 1, '0');
        var sb = new StringBuilder(digits.Length + 2);
        if (negative) sb.Append('-');
        sb.Append(digits, 0, digits.Length - decimals);
        if (decimals > 0) sb.Append('.').Append(digits, digits.Length - decimals, decimals);
        return sb.ToString();
    }
}
