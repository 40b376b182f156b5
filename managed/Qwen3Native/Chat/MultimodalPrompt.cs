using Qwen3Native.Vision;

namespace Qwen3Native.Chat;

/// <summary>
/// A prompt ready for the engine: token runs and vision items in sequence order (<see cref="MultimodalPromptBuilder"/>).
/// Feeding it means, for each segment in turn, appending a <see cref="TokenSegment"/>'s ids or queueing a
/// <see cref="VisionSegment"/> (its kind, grid and pixel values); the vision items never need a text form.
/// </summary>
public sealed class MultimodalPrompt
{
    internal MultimodalPrompt(IReadOnlyList<PromptSegment> segments, IReadOnlyList<PreprocessedImage> images,
        IReadOnlyList<PreprocessedVideo> videos)
    {
        Segments = segments;
        Images = images;
        Videos = videos;
        long total = 0;
        foreach (var s in segments) total += s.TokenCount;
        TokenCount = checked((int)total);
    }

    public IReadOnlyList<PromptSegment> Segments { get; }

    /// <summary>The preprocessed images, in prompt order (for their original and resized sizes).</summary>
    public IReadOnlyList<PreprocessedImage> Images { get; }

    /// <summary>The preprocessed videos, in prompt order.</summary>
    public IReadOnlyList<PreprocessedVideo> Videos { get; }

    /// <summary>Sequence positions the prompt fills, pad tokens included.</summary>
    public int TokenCount { get; }

    public IEnumerable<VisionSegment> VisionItems => Segments.OfType<VisionSegment>();

    /// <summary>
    /// The token ids with every vision item written out as its pad tokens: what transformers' processor returns as
    /// <c>input_ids</c> for the same conversation.
    /// </summary>
    public int[] ToExpandedTokenIds()
    {
        var ids = new int[TokenCount];
        int at = 0;
        foreach (var segment in Segments)
        {
            switch (segment)
            {
                case TokenSegment t:
                    foreach (int id in t.TokenIds) ids[at++] = id;
                    break;
                case VisionSegment v:
                    ids.AsSpan(at, v.TokenCount).Fill(v.PadTokenId);
                    at += v.TokenCount;
                    break;
            }
        }
        return ids;
    }
}
