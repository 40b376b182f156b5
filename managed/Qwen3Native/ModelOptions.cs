namespace Qwen3Native;

/// <summary>Where a model runs.</summary>
public enum Qwen3Device
{
    /// <summary>CUDA when the library was built with it and a GPU is present, otherwise the CPU.</summary>
    Auto = 0,
    Cpu = 1,
    Cuda = 2,
}

/// <summary>Element types of weights and of the KV cache.</summary>
public enum Qwen3DataType
{
    /// <summary>Let the engine choose (for the KV cache: F32 on the CPU).</summary>
    Auto = 0,
    F32 = 1,
    BF16 = 2,
    F16 = 3,
    /// <summary>8-bit floating point (e4m3), as in the official block-FP8 checkpoints.</summary>
    Fp8E4M3 = 4,
}

/// <summary>Where a model's weights come from.</summary>
public enum LoadFormat
{
    /// <summary>The checkpoint's own safetensors files.</summary>
    Safetensors = 0,

    /// <summary>
    /// config.json only: seeded random weights of the real shapes and types, for benchmarking a configuration without
    /// downloading its weights. The output is noise.
    /// </summary>
    Dummy = 1,
}

/// <summary>How <see cref="Qwen3Model.Load"/> loads a checkpoint. Every property has a working default.</summary>
public sealed record ModelOptions
{
    private readonly int _deviceIndex;
    private readonly int _contextLength;
    private readonly long _kvCacheTokens;
    private readonly int _kvBlockSize;
    private readonly int _threads;

    public Qwen3Device Device { get; init; } = Qwen3Device.Auto;

    /// <summary>Which GPU when there are several (0 = the first).</summary>
    public int DeviceIndex
    {
        get => _deviceIndex;
        init => _deviceIndex = NonNegative(value, nameof(DeviceIndex));
    }

    /// <summary>
    /// The longest sequence (prompt plus output) in tokens; 0 = min(max_position_embeddings, 32768). It may not exceed the
    /// model's max_position_embeddings.
    /// </summary>
    public int ContextLength
    {
        get => _contextLength;
        init => _contextLength = NonNegative(value, nameof(ContextLength));
    }

    /// <summary>KV-cache capacity in tokens, shared by every session of the model; 0 = <see cref="ContextLength"/>.</summary>
    public long KvCacheTokens
    {
        get => _kvCacheTokens;
        init => _kvCacheTokens = value >= 0 ? value
            : throw new ArgumentOutOfRangeException(nameof(KvCacheTokens), value, "KvCacheTokens must be 0 (automatic) or positive.");
    }

    /// <summary>Tokens per KV block; 0 = the engine's default (16).</summary>
    public int KvBlockSize
    {
        get => _kvBlockSize;
        init => _kvBlockSize = NonNegative(value, nameof(KvBlockSize));
    }

    /// <summary>Element type of the KV cache: Auto, F32 or BF16.</summary>
    public Qwen3DataType KvCacheDtype { get; init; } = Qwen3DataType.Auto;

    /// <summary>CPU worker threads; 0 = every core.</summary>
    public int Threads
    {
        get => _threads;
        init => _threads = NonNegative(value, nameof(Threads));
    }

    public LoadFormat LoadFormat { get; init; } = LoadFormat.Safetensors;

    /// <summary>Seed of the random weights of <see cref="LoadFormat.Dummy"/>.</summary>
    public ulong DummySeed { get; init; }

    private static int NonNegative(int value, string name) =>
        value >= 0 ? value : throw new ArgumentOutOfRangeException(name, value, name + " must be 0 (automatic) or positive.");
}
