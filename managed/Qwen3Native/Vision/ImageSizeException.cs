namespace Qwen3Native.Vision;

/// <summary>
/// An image whose dimensions the Qwen3-VL preprocessor cannot or will not take: not positive, more pixels than the
/// configured input limit, an aspect ratio above 200 (smart_resize's own rule), or a resized tensor too large for
/// one array. Derives from <see cref="ArgumentOutOfRangeException"/> because the caller's width/height are at fault.
/// </summary>
public sealed class ImageSizeException : ArgumentOutOfRangeException
{
    public ImageSizeException(string paramName, long width, long height, string message)
        : base(paramName, message)
    {
        Width = width;
        Height = height;
    }

    public long Width { get; }
    public long Height { get; }
}
