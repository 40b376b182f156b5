namespace Qwen3Native.Vision;

/// <summary>
/// The released Qwen3-VL <c>video_preprocessor_config.json</c> values (spec §4.7). Patch, temporal patch, merge size,
/// mean and std are the image ones (<see cref="Qwen3VLImageDefaults"/>).
/// </summary>
public static class Qwen3VLVideoDefaults
{
    /// <summary><c>size.shortest_edge</c>: the least T̄·h̄·w̄ pixels of a whole clip.</summary>
    public const long MinPixels = 4_096;

    /// <summary><c>size.longest_edge</c>: the most T̄·h̄·w̄ pixels of a whole clip (24576 tokens × 32²).</summary>
    public const long MaxPixels = 25_165_824;

    /// <summary>Frames sampled per second of video.</summary>
    public const double Fps = 2.0;

    public const int MinFrames = 4;
    public const int MaxFrames = 768;

    /// <summary>The source frame rate the processor assumes when a video does not state one.</summary>
    public const double FallbackSourceFps = 24.0;
}
