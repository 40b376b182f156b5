using Qwen3Native.Vision;

namespace Qwen3Native.Chat;

/// <summary>Where a <see cref="VideoPart"/>'s frames come from.</summary>
public enum VideoSourceKind
{
    /// <summary>Frames given by the caller, taken as already sampled.</summary>
    Frames,

    /// <summary>A video file, sampled and decoded through ffmpeg when the prompt is prepared.</summary>
    File,

    /// <summary>An encoded video in memory, written to a temporary file and decoded like <see cref="File"/>.</summary>
    EncodedBytes,
}

/// <summary>
/// A video inside a message: either frames with their timestamps, used as given (as transformers does with
/// <c>do_sample_frames=False</c>), or an encoded video that is sampled at <see cref="SampleFps"/> (the processor's
/// <c>fps</c>, 2 by default) and decoded through the <c>ffmpeg</c> program.
/// </summary>
public sealed class VideoPart : ChatContentPart
{
    private readonly VideoFrame[]? _frames;
    private readonly byte[]? _encoded;

    private VideoPart(VideoSourceKind kind, VideoFrame[]? frames, string? path, byte[]? encoded, double? sampleFps)
    {
        SourceKind = kind;
        _frames = frames;
        Path = path;
        _encoded = encoded;
        SampleFps = sampleFps;
    }

    public VideoSourceKind SourceKind { get; }

    /// <summary>The file for <see cref="VideoSourceKind.File"/>; null otherwise.</summary>
    public string? Path { get; }

    /// <summary>Frames per second to sample from a file; null for the processor's setting. Unused for given frames.</summary>
    public double? SampleFps { get; }

    /// <summary>The given frames; empty for a file.</summary>
    public IReadOnlyList<VideoFrame> Frames => _frames ?? [];

    /// <summary>
    /// Already sampled frames, in order, each with the time it shows. Checks are made when the prompt is prepared
    /// (<see cref="Qwen3VLVideoProcessor.Preprocess(IReadOnlyList{VideoFrame}, Qwen3VLVideoProcessorOptions?)"/>).
    /// </summary>
    public static VideoPart FromFrames(IEnumerable<VideoFrame> frames)
    {
        ArgumentNullException.ThrowIfNull(frames);
        var list = frames.ToArray();
        if (Array.IndexOf(list, null) >= 0)
            throw new ArgumentException("A frame is null.", nameof(frames));
        return new VideoPart(VideoSourceKind.Frames, list, null, null, null);
    }

    /// <summary>A video file, decoded through ffmpeg when the prompt is prepared.</summary>
    /// <param name="path">Any container and codec that the installed ffmpeg reads.</param>
    /// <param name="sampleFps">Frames per second to sample; null for the processor's setting (2).</param>
    public static VideoPart FromFile(string path, double? sampleFps = null)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        CheckFps(sampleFps);
        return new VideoPart(VideoSourceKind.File, null, path, null, sampleFps);
    }

    /// <summary>An encoded video (MP4, WebM, …) held in memory; the bytes are copied.</summary>
    public static VideoPart FromBytes(ReadOnlySpan<byte> encoded, double? sampleFps = null)
    {
        if (encoded.IsEmpty)
            throw new VideoInputException("The encoded video is empty.", nameof(encoded));
        CheckFps(sampleFps);
        return new VideoPart(VideoSourceKind.EncodedBytes, null, null, encoded.ToArray(), sampleFps);
    }

    /// <summary>Samples, decodes and preprocesses the video (spec §4.7).</summary>
    public PreprocessedVideo Preprocess(Qwen3VLVideoProcessorOptions? options = null, CancellationToken cancellationToken = default)
    {
        options ??= Qwen3VLVideoProcessorOptions.Default;
        if (SampleFps is { } fps)
            options = options with { Fps = fps };
        switch (SourceKind)
        {
            case VideoSourceKind.Frames:
                return Qwen3VLVideoProcessor.Preprocess(_frames!, options);
            case VideoSourceKind.File:
                return Qwen3VLVideoProcessor.PreprocessFile(Path!, options, cancellationToken);
            default:
                // A file rather than a pipe: MP4s often keep their index at the end, which ffmpeg cannot seek to on a pipe.
                string temp = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "qwen3native-video-" + Guid.NewGuid().ToString("N"));
                try
                {
                    using (var file = new FileStream(temp, FileMode.CreateNew, FileAccess.Write, FileShare.None))
                        file.Write(_encoded!);
                    return Qwen3VLVideoProcessor.PreprocessFile(temp, options, cancellationToken);
                }
                finally
                {
                    File.Delete(temp);
                }
        }
    }

    private static void CheckFps(double? fps)
    {
        if (fps is { } f && !(double.IsFinite(f) && f > 0))
            throw new ArgumentOutOfRangeException(nameof(fps), f, "The sampling rate must be a positive number of frames per second.");
    }

    public override string ToString() => SourceKind switch
    {
        VideoSourceKind.Frames => $"video: {_frames!.Length} frames",
        VideoSourceKind.File => "video: " + Path,
        _ => $"video: {_encoded!.Length} encoded bytes",
    };
}
