namespace Qwen3Native.Vision;

/// <summary>
/// Video frames the Qwen3-VL video processor cannot take as given: none at all, fewer than one temporal patch,
/// frames of different sizes, or timestamps that are not finite, negative or out of order.
/// </summary>
public sealed class VideoInputException : ArgumentException
{
    public VideoInputException(string message, string? paramName = null)
        : base(message, paramName) { }
}
