namespace Qwen3Native.Vision;

/// <summary>One decoded frame of a video and the time it is shown, in seconds from the start of the video.</summary>
public sealed class VideoFrame
{
    public VideoFrame(Qwen3Image image, double timestampSeconds)
    {
        ArgumentNullException.ThrowIfNull(image);
        // Checked here so that the timestamp text the prompt carries can never read "NaN" or go negative.
        if (!double.IsFinite(timestampSeconds) || timestampSeconds < 0)
            throw new VideoInputException($"A frame timestamp must be a finite number of seconds, at least 0; got {timestampSeconds}.");
        Image = image;
        TimestampSeconds = timestampSeconds;
    }

    public Qwen3Image Image { get; }

    public double TimestampSeconds { get; }

    /// <summary>A frame from raw RGB8 pixels (interleaved R, G, B, row-major, no padding); the pixels are copied.</summary>
    public static VideoFrame FromRgb(ReadOnlySpan<byte> rgb, int width, int height, double timestampSeconds) =>
        new(Qwen3Image.FromRgb(rgb, width, height), timestampSeconds);
}
