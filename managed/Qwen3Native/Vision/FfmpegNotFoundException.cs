namespace Qwen3Native.Vision;

/// <summary>
/// A video file was given but the <c>ffmpeg</c> program, through which video files are decoded, could not be run.
/// Frames decoded by other means can always be passed directly (<see cref="Chat.VideoPart.FromFrames"/>).
/// </summary>
public sealed class FfmpegNotFoundException : InvalidOperationException
{
    public FfmpegNotFoundException(string program, Exception? innerException = null)
        : base($"Decoding a video file needs the '{program}' program, which could not be run (install ffmpeg and put it on PATH, " +
               "or set Qwen3VLVideoProcessorOptions.FfmpegPath). Alternatively, decode the video yourself and pass its frames " +
               "with their timestamps directly (VideoPart.FromFrames).", innerException)
    {
        Program = program;
    }

    /// <summary>The program name or path that was tried.</summary>
    public string Program { get; }
}
