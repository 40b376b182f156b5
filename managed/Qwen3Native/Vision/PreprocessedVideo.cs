namespace Qwen3Native.Vision;

/// <summary>
/// One preprocessed video: <c>pixel_values_videos</c> as a row-major [Rows, Columns] float32 matrix in the processor's
/// row order (temporal patch by temporal patch, each one <see cref="TokensPerSlice"/>·merge² rows), its
/// <c>video_grid_thw</c>, and the timestamp of each temporal patch that the prompt writes before its pads.
/// </summary>
public sealed class PreprocessedVideo
{
    internal PreprocessedVideo(float[] pixelValues, int rows, int columns, GridThw grid, int tokensPerSlice, ImageSize resized,
        double[] frameTimestamps, double[] sliceTimestamps)
    {
        PixelValues = pixelValues;
        Rows = rows;
        Columns = columns;
        Grid = grid;
        TokensPerSlice = tokensPerSlice;
        ResizedSize = resized;
        FrameTimestamps = frameTimestamps;
        SliceTimestamps = sliceTimestamps;
    }

    public float[] PixelValues { get; }
    public int Rows { get; }
    public int Columns { get; }

    /// <summary>(grid_t, grid_h, grid_w): grid_t temporal patches of grid_h × grid_w patches.</summary>
    public GridThw Grid { get; }

    /// <summary>&lt;|video_pad|&gt; tokens per temporal patch: grid_h · grid_w / merge².</summary>
    public int TokensPerSlice { get; }

    /// <summary>All &lt;|video_pad|&gt; tokens of the video: grid_t · <see cref="TokensPerSlice"/>.</summary>
    public int VideoTokenCount => Grid.T * TokensPerSlice;

    public ImageSize ResizedSize { get; }

    /// <summary>The time of each frame used, in seconds, before padding to whole temporal patches.</summary>
    public IReadOnlyList<double> FrameTimestamps { get; }

    /// <summary>One time per temporal patch: the mean of its first and last frame's time (the padded list's).</summary>
    public IReadOnlyList<double> SliceTimestamps { get; }

    /// <summary>
    /// The rows of temporal patch <paramref name="t"/>: the pixel values of a grid (1, grid_h, grid_w) item, which is
    /// how the prompt feeds a video to the model (one vision item per temporal patch, as get_rope_index splits it).
    /// </summary>
    public ReadOnlyMemory<float> SlicePixelValues(int t)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(t);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(t, Grid.T);
        int sliceRows = Grid.H * Grid.W;
        return PixelValues.AsMemory(t * sliceRows * Columns, sliceRows * Columns);
    }

    /// <summary>The prompt text before temporal patch <paramref name="t"/>, e.g. "&lt;0.2 seconds&gt;".</summary>
    public string TimestampText(int t) => VideoTimestamps.Format(SliceTimestamps[t]);
}
