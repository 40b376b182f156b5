using Qwen3Native.Vision;

namespace Qwen3Native.Chat;

/// <summary>Which pad token a vision item stands on, and which tower input it is.</summary>
public enum VisionKind
{
    Image = 0,
    Video = 1,
}

/// <summary>
/// One piece of a prepared multimodal prompt (<see cref="MultimodalPrompt"/>): either ordinary token ids
/// (<see cref="TokenSegment"/>) or one vision item (<see cref="VisionSegment"/>) that the engine queues as its pad
/// tokens and replaces by the vision tower's output.
/// </summary>
public abstract class PromptSegment
{
    private protected PromptSegment() { }

    /// <summary>Positions the segment takes in the sequence (token ids, or pad tokens of the item).</summary>
    public abstract int TokenCount { get; }
}

/// <summary>Token ids appended as they are (text, chat markup, &lt;|vision_start|&gt;/&lt;|vision_end|&gt;, video times).</summary>
public sealed class TokenSegment : PromptSegment
{
    internal TokenSegment(int[] tokenIds) => TokenIds = tokenIds;

    public IReadOnlyList<int> TokenIds { get; }

    public override int TokenCount => TokenIds.Count;
}

/// <summary>
/// One vision item: an image, or one temporal patch of a video (grid_t = 1), with its pixel values as a row-major
/// [Grid.T·Grid.H·Grid.W, Columns] float32 matrix in the processor's row order. It stands for
/// <see cref="TokenCount"/> = T·H·W / merge² copies of <see cref="PadTokenId"/>, which the engine writes itself.
/// </summary>
public sealed class VisionSegment : PromptSegment
{
    internal VisionSegment(VisionKind kind, GridThw grid, ReadOnlyMemory<float> pixelValues, int columns, int mergeSize, int padTokenId,
        ChatContentPart source, int sliceIndex, double? timestampSeconds)
    {
        Kind = kind;
        Grid = grid;
        PixelValues = pixelValues;
        Columns = columns;
        MergeSize = mergeSize;
        PadTokenId = padTokenId;
        Source = source;
        SliceIndex = sliceIndex;
        TimestampSeconds = timestampSeconds;
    }

    public VisionKind Kind { get; }

    public GridThw Grid { get; }

    /// <summary>Grid.PatchCount · Columns values; for a video slice, a window into the whole video's matrix.</summary>
    public ReadOnlyMemory<float> PixelValues { get; }

    /// <summary>Values per patch row: channels · temporal_patch · patch² (1536 for Qwen3-VL).</summary>
    public int Columns { get; }

    public int MergeSize { get; }

    /// <summary>&lt;|image_pad|&gt; or &lt;|video_pad|&gt;, from the tokenizer's added tokens.</summary>
    public int PadTokenId { get; }

    public override int TokenCount => checked((int)(Grid.PatchCount / (MergeSize * MergeSize)));

    /// <summary>The image or video part this item came from.</summary>
    public ChatContentPart Source { get; }

    /// <summary>Which temporal patch of its video this is (0 for an image).</summary>
    public int SliceIndex { get; }

    /// <summary>For a video slice, the time written before it; null for an image.</summary>
    public double? TimestampSeconds { get; }
}
