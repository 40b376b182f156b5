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
}
