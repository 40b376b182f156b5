namespace Qwen3Native.Vision;

/// <summary>
/// ffmpeg (or ffprobe) could not read a video file: not a video, corrupt or truncated, a stream ffmpeg cannot decode,
/// or fewer frames than the file's header announced. <see cref="ToolOutput"/> keeps the end of the tool's error output.
/// </summary>
public sealed class VideoDecodeException : IOException
{
    public VideoDecodeException(string path, string message, string? toolOutput = null, Exception? innerException = null)
        : base(message, innerException)
    {
        Path = path;
        ToolOutput = toolOutput;
    }

    public string Path { get; }

    public string? ToolOutput { get; }
}
