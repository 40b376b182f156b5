namespace Qwen3Native.Vision;

/// <summary>
/// A video larger than the processor's limits: more frames than <see cref="Qwen3VLVideoProcessorOptions.MaxFrames"/>,
/// frames of more than <see cref="Qwen3VLVideoProcessorOptions.MaxInputPixels"/> pixels, or a result too large for one
/// array. Raised before the frames are decoded where the size is known from the file's header.
/// </summary>
public sealed class VideoSizeException : ArgumentOutOfRangeException
{
    public VideoSizeException(string paramName, long frames, long width, long height, string message)
        : base(paramName, message)
    {
        Frames = frames;
        Width = width;
        Height = height;
    }

    public long Frames { get; }
    public long Width { get; }
    public long Height { get; }
}
