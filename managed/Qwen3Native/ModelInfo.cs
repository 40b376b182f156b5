namespace Qwen3Native;

/// <summary>What a loaded model is and how it was loaded (a snapshot of <c>q3n_model_info</c>).</summary>
public sealed record ModelInfo
{
    /// <summary>The config's architecture, e.g. "Qwen3ForCausalLM".</summary>
    public required string Architecture { get; init; }

    /// <summary>BF16, or Fp8E4M3 for block-FP8 checkpoints.</summary>
    public required Qwen3DataType WeightDtype { get; init; }

    /// <summary>Where the model runs (never Auto).</summary>
    public required Qwen3Device Device { get; init; }

    public required Qwen3DataType KvCacheDtype { get; init; }

    public required int VocabSize { get; init; }

    public required int HiddenSize { get; init; }

    public required int IntermediateSize { get; init; }

    public required int NumLayers { get; init; }

    public required int NumAttentionHeads { get; init; }

    public required int NumKeyValueHeads { get; init; }

    public required int HeadDim { get; init; }

    public required int MaxPositionEmbeddings { get; init; }

    /// <summary>The longest sequence (prompt plus output) as loaded.</summary>
    public required int ContextLength { get; init; }

    /// <summary>KV-cache capacity in tokens, shared by every sequence of the model.</summary>
    public required long KvCacheTokens { get; init; }

    public required int KvBlockSize { get; init; }

    /// <summary>Null when the config has none.</summary>
    public required int? BosTokenId { get; init; }

    /// <summary>Every end-of-sequence id (config.json, then generation_config.json, de-duplicated). Generation stops at any of them.</summary>
    public required IReadOnlyList<int> EosTokenIds { get; init; }

    public required long ParameterCount { get; init; }

    public required long WeightBytes { get; init; }

    // Vision (Qwen3-VL). Not `required`, unlike the members above: they came later, and code that builds a ModelInfo
    // (test doubles) keeps compiling, describing a model without vision.

    /// <summary>True when the model has a vision tower and takes images and videos (Qwen3-VL).</summary>
    public bool HasVision { get; init; }

    /// <summary>Pixels per patch side (16 for Qwen3-VL); 0 without vision.</summary>
    public int PatchSize { get; init; }

    /// <summary>Frames per patch (2; a still image is its frame twice); 0 without vision.</summary>
    public int TemporalPatchSize { get; init; }

    /// <summary>Patches per merged token side (2): a grid's height and width are multiples of it; 0 without vision.</summary>
    public int SpatialMergeSize { get; init; }

    /// <summary>&lt;|image_pad|&gt;, the placeholder the engine writes for each image token; null without vision.</summary>
    public int? ImageTokenId { get; init; }

    /// <summary>&lt;|video_pad|&gt;; null without vision.</summary>
    public int? VideoTokenId { get; init; }

    /// <summary>&lt;|vision_start|&gt;, written before each image or video slice; null without vision.</summary>
    public int? VisionStartTokenId { get; init; }

    /// <summary>&lt;|vision_end|&gt;, written after each image or video slice; null without vision.</summary>
    public int? VisionEndTokenId { get; init; }
}
