namespace Qwen3Native.Vision;

/// <summary>A resized image size in pixels.</summary>
public readonly record struct ImageSize(int Height, int Width);

/// <summary>
/// Qwen-VL's <c>smart_resize</c> (spec §4.6): the target size whose sides are multiples of <c>factor</c>, whose pixel
/// count lies in [minPixels, maxPixels] and whose aspect ratio is as close as possible to the input's.
/// </summary>
public static class SmartResize
{
    /// <summary>
    /// Computes the resized (height, width). Arithmetic mirrors the Python reference step by step (true division in
    /// double, round half-to-even, floor/ceil of the same double expressions) so that boundary cases land on the
    /// same multiple of <paramref name="factor"/>.
    /// </summary>
    /// <exception cref="ImageSizeException">A side is not positive, or the aspect ratio exceeds 200.</exception>
    public static ImageSize Compute(
        int height,
        int width,
        int factor = Qwen3VLImageDefaults.Factor,
        long minPixels = Qwen3VLImageDefaults.MinPixels,
        long maxPixels = Qwen3VLImageDefaults.MaxPixels)
    {
        if (height <= 0 || width <= 0)
            throw new ImageSizeException(height <= 0 ? nameof(height) : nameof(width), width, height,
                $"Image dimensions must be positive, got {width}x{height} (width x height).");
        ArgumentOutOfRangeException.ThrowIfLessThan(factor, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(minPixels, 0);
        ArgumentOutOfRangeException.ThrowIfLessThan(maxPixels, Math.Max(minPixels, (long)factor * factor));

        double ratio = (double)Math.Max(height, width) / Math.Min(height, width);
        if (ratio > Qwen3VLImageDefaults.MaxAspectRatio)
            throw new ImageSizeException(nameof(width), width, height,
                $"Absolute aspect ratio must be at most {Qwen3VLImageDefaults.MaxAspectRatio}, got {ratio} for {width}x{height} (width x height).");

        // No lower clamp here, as in transformers 5.17 (tests/fixtures/vision/gold.json, case 12x2400): a side under
        // factor/2 rounds to 0, so the image always takes the min_pixels branch and is scaled up as a whole.
        long hBar = (long)Math.Round((double)height / factor, MidpointRounding.ToEven) * factor;
        long wBar = (long)Math.Round((double)width / factor, MidpointRounding.ToEven) * factor;
        long area = (long)height * width; // exact: both sides are int

        if (hBar * wBar > maxPixels)
        {
            double beta = Math.Sqrt((double)area / maxPixels);
            hBar = Math.Max(factor, (long)Math.Floor(height / beta / factor) * factor);
            wBar = Math.Max(factor, (long)Math.Floor(width / beta / factor) * factor);
        }
        else if (hBar * wBar < minPixels)
        {
            double beta = Math.Sqrt((double)minPixels / area);
            hBar = (long)Math.Ceiling(height * beta / factor) * factor;
            wBar = (long)Math.Ceiling(width * beta / factor) * factor;
        }

        if (hBar > int.MaxValue || wBar > int.MaxValue)
            throw new ImageSizeException(nameof(minPixels), width, height,
                $"Resized size {wBar}x{hBar} does not fit the pixel limits' range.");
        return new ImageSize((int)hBar, (int)wBar);
    }
}
