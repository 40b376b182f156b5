namespace Qwen3Native.Vision;

/// <summary>
/// Encoded image data the engine cannot decode: empty, corrupt or truncated data
/// (<see cref="Qwen3Status.InvalidArgument"/>), or a format it does not read — anything but JPEG, PNG and still WebP —
/// (<see cref="Qwen3Status.Unsupported"/>). An image that decodes but is too large is an
/// <see cref="ImageSizeException"/> instead.
/// </summary>
public sealed class ImageDecodeException : Qwen3NativeException
{
    public ImageDecodeException(Qwen3Status status, string message, Exception? innerException = null)
        : base(status, message, innerException) { }
}
