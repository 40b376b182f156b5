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

        // No lower clamp here, as in transformers 5.17 (tests/fixtures/vision/gold.json, case 12x2400): a side under
        // factor/2 rounds to 0, so the image always takes the min_pixels branch and is scaled up as a whole.
        return Fit(height, width, frames: 1, framesBar: 1, factor, minPixels, maxPixels);
    }

    /// <summary>
    /// The video form (Qwen3-VL <c>video_processing_qwen3_vl.smart_resize</c>, spec §4.7): one size for every frame of
    /// a clip, with the pixel budget counted over <c>T̄·h̄·w̄</c> where T̄ is the frame count rounded (half to even) to a
    /// multiple of <paramref name="temporalFactor"/>. Unlike the image form, a side shorter than
    /// <paramref name="factor"/> first scales the frame up (truncating to whole pixels) until both sides reach it.
    /// </summary>
    /// <exception cref="ImageSizeException">A side is not positive, or the aspect ratio exceeds 200.</exception>
    /// <exception cref="VideoInputException">Fewer than <paramref name="temporalFactor"/> frames.</exception>
    public static ImageSize ComputeVideo(
        int frames,
        int height,
        int width,
        int temporalFactor = Qwen3VLImageDefaults.TemporalPatchSize,
        int factor = Qwen3VLImageDefaults.Factor,
        long minPixels = Qwen3VLVideoDefaults.MinPixels,
        long maxPixels = Qwen3VLVideoDefaults.MaxPixels)
    {
        if (height <= 0 || width <= 0)
            throw new ImageSizeException(height <= 0 ? nameof(height) : nameof(width), width, height,
                $"Frame dimensions must be positive, got {width}x{height} (width x height).");
        ArgumentOutOfRangeException.ThrowIfLessThan(temporalFactor, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(factor, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(minPixels, 0);
        ArgumentOutOfRangeException.ThrowIfLessThan(maxPixels, Math.Max(minPixels, (long)factor * factor));
        if (frames < temporalFactor)
            throw new VideoInputException(
                $"A video needs at least {temporalFactor} frames (one temporal patch), got {frames}; pass a single frame as an image.",
                nameof(frames));

        long h = height, w = width;
        if (h < factor || w < factor)
        {
            double scale = Math.Max((double)factor / h, (double)factor / w);
            h = (long)(h * scale);
            w = (long)(w * scale);
        }
        long tBar = (long)Math.Round((double)frames / temporalFactor, MidpointRounding.ToEven) * temporalFactor;
        return Fit(h, w, frames, tBar, factor, minPixels, maxPixels);
    }

    /// <summary>
    /// The shared part: reject extreme aspect ratios, round both sides to the factor, then scale down or up when
    /// <c>framesBar·h̄·w̄</c> leaves [minPixels, maxPixels], with β computed from the unrounded frame count.
    /// </summary>
    private static ImageSize Fit(long height, long width, long frames, long framesBar, int factor, long minPixels, long maxPixels)
    {
        double ratio = (double)Math.Max(height, width) / Math.Min(height, width);
        if (ratio > Qwen3VLImageDefaults.MaxAspectRatio)
            throw new ImageSizeException(nameof(width), width, height,
                $"Absolute aspect ratio must be at most {Qwen3VLImageDefaults.MaxAspectRatio}, got {ratio} for {width}x{height} (width x height).");

        long hBar = (long)Math.Round((double)height / factor, MidpointRounding.ToEven) * factor;
        long wBar = (long)Math.Round((double)width / factor, MidpointRounding.ToEven) * factor;
        // Python divides the exact integer product; so does this while it stays below 2^53, which the input limits ensure.
        double volume = (double)(frames * height * width);

        if (framesBar * hBar * wBar > maxPixels)
        {
            double beta = Math.Sqrt(volume / maxPixels);
            hBar = Math.Max(factor, (long)Math.Floor(height / beta / factor) * factor);
            wBar = Math.Max(factor, (long)Math.Floor(width / beta / factor) * factor);
        }
        else if (framesBar * hBar * wBar < minPixels)
        {
            double beta = Math.Sqrt(minPixels / volume);
            hBar = (long)Math.Ceiling(height * beta / factor) * factor;
            wBar = (long)Math.Ceiling(width * beta / factor) * factor;
        }

        if (hBar > int.MaxValue || wBar > int.MaxValue)
            throw new ImageSizeException(nameof(minPixels), width, height,
                $"Resized size {wBar}x{hBar} does not fit the pixel limits' range.");
        return new ImageSize((int)hBar, (int)wBar);
    }
}
