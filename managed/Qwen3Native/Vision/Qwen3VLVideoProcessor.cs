namespace Qwen3Native.Vision;

/// <summary>
/// Settings of <see cref="Qwen3VLVideoProcessor"/>; the defaults are the released Qwen3-VL
/// <c>video_preprocessor_config.json</c> values (spec §4.7).
/// </summary>
public sealed record Qwen3VLVideoProcessorOptions
{
    public int PatchSize { get; init; } = Qwen3VLImageDefaults.PatchSize;
    public int TemporalPatchSize { get; init; } = Qwen3VLImageDefaults.TemporalPatchSize;
    public int MergeSize { get; init; } = Qwen3VLImageDefaults.MergeSize;

    /// <summary>Least pixels of a whole clip, counted as T̄·h̄·w̄ (<c>size.shortest_edge</c>).</summary>
    public long MinPixels { get; init; } = Qwen3VLVideoDefaults.MinPixels;

    /// <summary>Most pixels of a whole clip, counted as T̄·h̄·w̄ (<c>size.longest_edge</c>).</summary>
    public long MaxPixels { get; init; } = Qwen3VLVideoDefaults.MaxPixels;

    public float[] ImageMean { get; init; } = [Qwen3VLImageDefaults.ImageMean, Qwen3VLImageDefaults.ImageMean, Qwen3VLImageDefaults.ImageMean];
    public float[] ImageStd { get; init; } = [Qwen3VLImageDefaults.ImageStd, Qwen3VLImageDefaults.ImageStd, Qwen3VLImageDefaults.ImageStd];

    /// <summary>Frames sampled per second of a video file. Ignored when <see cref="NumFrames"/> is set.</summary>
    public double Fps { get; init; } = Qwen3VLVideoDefaults.Fps;

    /// <summary>
    /// Sample exactly this many frames, evenly spread, instead of <see cref="Fps"/>; not clamped to
    /// <see cref="MinFrames"/>/<see cref="MaxFrames"/> (transformers' <c>num_frames</c>).
    /// </summary>
    public int? NumFrames { get; init; }

    public int MinFrames { get; init; } = Qwen3VLVideoDefaults.MinFrames;
    public int MaxFrames { get; init; } = Qwen3VLVideoDefaults.MaxFrames;

    /// <summary>
    /// transformers' <c>cap_pixels_per_frame</c> (qwen-vl-utils' behaviour): each frame gets at most 768 tokens' worth of
    /// pixels or its share of <see cref="MaxPixels"/>, at least 1.05·<see cref="MinPixels"/>. Off by default, as in
    /// transformers today, where a short clip may spend the whole budget on few frames.
    /// </summary>
    public bool CapPixelsPerFrame { get; init; }

    /// <summary>Largest frame (width × height) accepted; checked before a file's frames are decoded.</summary>
    public long MaxInputPixels { get; init; } = Qwen3VLImageDefaults.MaxInputPixels;

    /// <summary>The ffmpeg program that decodes video files: a name looked up on PATH, or a path.</summary>
    public string FfmpegPath { get; init; } = "ffmpeg";

    /// <summary>The ffprobe program that reads a file's frame rate and frame count; when it cannot be run, ffmpeg does it.</summary>
    public string FfprobePath { get; init; } = "ffprobe";

    public static Qwen3VLVideoProcessorOptions Default { get; } = new();
}

/// <summary>
/// Qwen3-VL video preprocessing (transformers' <c>Qwen3VLVideoProcessor</c>, spec §4.7): frame sampling, one
/// <c>smart_resize</c> for the whole clip, then per frame the image path's bicubic resize and normalisation
/// (<see cref="Qwen3VLImageProcessor"/>), the last frame repeated up to a whole temporal patch, and the image path's
/// patchify. Frames are resized as they arrive, so a decoded clip never has to be held at its source resolution.
/// </summary>
public static class Qwen3VLVideoProcessor
{
    private const int Channels = 3;

    /// <summary>
    /// Which source frames to use (transformers' <c>sample_frames</c>): <c>n = int(total / sourceFps · fps)</c> clamped to
    /// [MinFrames, MaxFrames] and to the frame count, spread as <c>round(linspace(0, total − 1, n))</c> with ties to even.
    /// </summary>
    /// <param name="totalFrames">Frames in the video.</param>
    /// <param name="sourceFps">The video's frame rate; null when unknown, which the processor reads as 24.</param>
    /// <param name="options">Sampling settings; null for the released values.</param>
    public static int[] SampleFrameIndices(int totalFrames, double? sourceFps, Qwen3VLVideoProcessorOptions? options = null)
    {
        options ??= Qwen3VLVideoProcessorOptions.Default;
        if (totalFrames <= 0)
            throw new VideoInputException($"The video has no frames (frame count {totalFrames}).", nameof(totalFrames));
        if (sourceFps is { } sf && !(double.IsFinite(sf) && sf > 0))
            throw new ArgumentOutOfRangeException(nameof(sourceFps), sf, "The source frame rate must be positive.");
        int n;
        if (options.NumFrames is { } fixedCount)
        {
            ArgumentOutOfRangeException.ThrowIfLessThan(fixedCount, 1, nameof(options.NumFrames));
            n = fixedCount;
        }
        else
        {
            if (!(double.IsFinite(options.Fps) && options.Fps > 0))
                throw new ArgumentOutOfRangeException(nameof(options), options.Fps, "Fps must be positive.");
            double wanted = totalFrames / (sourceFps ?? Qwen3VLVideoDefaults.FallbackSourceFps) * options.Fps;
            n = wanted >= int.MaxValue ? int.MaxValue : (int)wanted; // Python's int() truncates toward zero
            n = Math.Min(Math.Min(Math.Max(n, options.MinFrames), options.MaxFrames), totalFrames);
        }

        var indices = new int[n];
        if (n == 1)
            return indices;
        // numpy's linspace: i·step with step = (stop − start)/(n − 1), and the last value set to stop exactly.
        double step = (double)(totalFrames - 1) / (n - 1);
        for (int i = 0; i < n - 1; i++)
            indices[i] = (int)Math.Round(i * step, MidpointRounding.ToEven);
        indices[n - 1] = totalFrames - 1;
        return indices;
    }

    /// <summary>
    /// Preprocesses frames that are already sampled (transformers with <c>do_sample_frames=False</c>): all frames are
    /// used, their own timestamps give the prompt's time text.
    /// </summary>
    /// <exception cref="VideoInputException">No frames, fewer than one temporal patch, frames of different sizes, or
    /// timestamps out of order.</exception>
    /// <exception cref="VideoSizeException">More than MaxFrames frames, frames above MaxInputPixels, or a result too
    /// large for one array.</exception>
    /// <exception cref="ImageSizeException">An aspect ratio above 200.</exception>
    public static PreprocessedVideo Preprocess(IReadOnlyList<VideoFrame> frames, Qwen3VLVideoProcessorOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(frames);
        options ??= Qwen3VLVideoProcessorOptions.Default;
        Validate(options);
        if (frames.Count == 0)
            throw new VideoInputException("The video has no frames.", nameof(frames));
        if (frames.Count > options.MaxFrames)
            throw new VideoSizeException(nameof(frames), frames.Count, frames[0].Image.Width, frames[0].Image.Height,
                $"The video has {frames.Count} frames, more than MaxFrames = {options.MaxFrames}; sample it first " +
                "(Qwen3VLVideoProcessor.SampleFrameIndices).");
        int width = frames[0].Image.Width, height = frames[0].Image.Height;
        var seconds = new double[frames.Count];
        for (int i = 0; i < frames.Count; i++)
        {
            var f = frames[i] ?? throw new VideoInputException($"Frame {i} is null.", nameof(frames));
            if (f.Image.Width != width || f.Image.Height != height)
                throw new VideoInputException(
                    $"All frames of a video must have one size: frame 0 is {width}x{height}, frame {i} is {f.Image.Width}x{f.Image.Height} (width x height).",
                    nameof(frames));
            if (i > 0 && f.TimestampSeconds < seconds[i - 1])
                throw new VideoInputException(
                    $"Frame timestamps must not decrease: frame {i} is at {f.TimestampSeconds} s, after frame {i - 1} at {seconds[i - 1]} s.",
                    nameof(frames));
            seconds[i] = f.TimestampSeconds;
        }
        CheckFrameSize(options, frames.Count, width, height);
        return Run(frames.Select(f => f.Image.Rgb), frames.Count, width, height, seconds, options);
    }

    /// <summary>
    /// Samples, decodes and preprocesses a video file through the <c>ffmpeg</c> program (and <c>ffprobe</c> for its
    /// frame rate and frame count). Frames are taken by index at the sampled positions; times are index / frame rate.
    /// </summary>
    /// <exception cref="FfmpegNotFoundException">ffmpeg cannot be run.</exception>
    /// <exception cref="VideoDecodeException">ffmpeg cannot read the file, or it yields fewer frames than announced.</exception>
    /// <exception cref="FileNotFoundException">The file does not exist.</exception>
    /// <inheritdoc cref="Preprocess(IReadOnlyList{VideoFrame}, Qwen3VLVideoProcessorOptions?)" path="/exception"/>
    public static PreprocessedVideo PreprocessFile(string path, Qwen3VLVideoProcessorOptions? options = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        options ??= Qwen3VLVideoProcessorOptions.Default;
        Validate(options);
        // Before the file: a missing ffmpeg is the error to report on a machine without it, whatever the path.
        var reader = FfmpegVideoReader.Open(options.FfmpegPath, options.FfprobePath, cancellationToken);
        if (!File.Exists(path))
            throw new FileNotFoundException("The video file does not exist.", path);
        var info = reader.Probe(path, cancellationToken);
        CheckFrameSize(options, 0, info.Width, info.Height);
        int[] indices = SampleFrameIndices(info.FrameCount, info.Fps, options);
        double fps = info.Fps ?? Qwen3VLVideoDefaults.FallbackSourceFps;
        var seconds = indices.Select(i => i / fps).ToArray();
        var distinct = indices.Distinct().ToArray();
        var decoded = reader.ReadFrames(path, distinct, info.Width, info.Height, cancellationToken);
        return Run(Expand(decoded, indices), indices.Length, info.Width, info.Height, seconds, options);
    }

    /// <summary>Repeats a decoded frame where the index list names it more than once (NumFrames above the frame count).</summary>
    private static IEnumerable<ReadOnlyMemory<byte>> Expand(IEnumerable<byte[]> distinctFrames, int[] indices)
    {
        using var e = distinctFrames.GetEnumerator();
        byte[]? current = null;
        for (int i = 0; i < indices.Length; i++)
        {
            if (i == 0 || indices[i] != indices[i - 1])
            {
                if (!e.MoveNext()) yield break; // the reader has already reported a short stream
                current = e.Current;
            }
            yield return current!;
        }
    }

    private static void Validate(Qwen3VLVideoProcessorOptions o)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(o.PatchSize, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(o.TemporalPatchSize, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(o.MergeSize, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(o.MinFrames, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(o.MaxFrames, o.MinFrames);
        ArgumentOutOfRangeException.ThrowIfLessThan(o.MaxInputPixels, 1);
        if (o.ImageMean.Length != Channels || o.ImageStd.Length != Channels)
            throw new ArgumentException("ImageMean and ImageStd need one value per RGB channel.", nameof(o));
    }

    private static void CheckFrameSize(Qwen3VLVideoProcessorOptions options, long frames, int width, int height)
    {
        if (width <= 0 || height <= 0)
            throw new VideoSizeException(nameof(width), frames, width, height, $"Frame dimensions must be positive, got {width}x{height}.");
        long pixels = (long)width * height;
        if (pixels > options.MaxInputPixels)
            throw new VideoSizeException(nameof(width), frames, width, height,
                $"Frames of {width}x{height} = {pixels} pixels exceed the input limit of {options.MaxInputPixels} pixels.");
    }

    private static PreprocessedVideo Run(IEnumerable<ReadOnlyMemory<byte>> frames, int frameCount, int width, int height,
        double[] frameSeconds, Qwen3VLVideoProcessorOptions o)
    {
        int factor = o.PatchSize * o.MergeSize;
        long maxPixels = o.MaxPixels;
        if (o.CapPixelsPerFrame)
        {
            long perFrame = Math.Max(Math.Min(768L * factor * factor, o.MaxPixels / frameCount), (long)(o.MinPixels * 1.05));
            maxPixels = perFrame * frameCount;
        }
        var size = SmartResize.ComputeVideo(frameCount, height, width, o.TemporalPatchSize, factor, o.MinPixels, maxPixels);

        int tp = o.TemporalPatchSize;
        int gridT = (frameCount + tp - 1) / tp;
        int gridH = size.Height / o.PatchSize, gridW = size.Width / o.PatchSize;
        long sliceRows = (long)gridH * gridW;
        long columns = (long)Channels * tp * o.PatchSize * o.PatchSize;
        long total = gridT * sliceRows * columns;
        if (total > Array.MaxLength)
            throw new VideoSizeException(nameof(o), frameCount, width, height,
                $"{frameCount} frames resized to {size.Width}x{size.Height} give {gridT * sliceRows}x{columns} pixel values, more " +
                "than one array can hold; lower MaxPixels or sample fewer frames.");

        var output = new float[total];
        int plane = size.Height * size.Width;
        int frameFloats = plane * Channels;
        var slice = new float[(long)frameFloats * tp];
        int sliceLength = checked((int)(sliceRows * columns));
        int filled = 0, t = 0;
        foreach (var rgb in frames)
        {
            if (filled + t * tp >= frameCount)
                break;
            byte[] resized = BicubicResampler.Resize(rgb.Span, width, height, Channels, size.Width, size.Height);
            Qwen3VLImageProcessor.NormalizeToPlanar(resized, size.Width, size.Height, o.ImageMean, o.ImageStd,
                slice.AsSpan(filled * frameFloats, frameFloats));
            if (++filled == tp)
            {
                Qwen3VLImageProcessor.Patchify(slice, tp, frameFloats, Channels, size.Height, size.Width, o.PatchSize, tp, o.MergeSize,
                    output.AsSpan(t * sliceLength, sliceLength));
                filled = 0;
                t++;
            }
        }
        if (t * tp + filled < frameCount)
            throw new VideoInputException($"Expected {frameCount} frames, got {t * tp + filled}.", nameof(frames));
        if (filled > 0)
        {
            // The last temporal patch is completed with copies of the last frame, as the processor pads it.
            for (int k = filled; k < tp; k++)
                slice.AsSpan((filled - 1) * frameFloats, frameFloats).CopyTo(slice.AsSpan(k * frameFloats, frameFloats));
            Qwen3VLImageProcessor.Patchify(slice, tp, frameFloats, Channels, size.Height, size.Width, o.PatchSize, tp, o.MergeSize,
                output.AsSpan(t * sliceLength, sliceLength));
            t++;
        }

        var grid = new GridThw(gridT, gridH, gridW);
        int tokensPerSlice = checked((int)(sliceRows / (o.MergeSize * o.MergeSize)));
        return new PreprocessedVideo(output, checked((int)(gridT * sliceRows)), (int)columns, grid, tokensPerSlice, size,
            frameSeconds, VideoTimestamps.PerSlice(frameSeconds, tp));
    }
}
