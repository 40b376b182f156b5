namespace Qwen3Native.Generation;

/// <summary>
/// How tokens are chosen and when generation stops. Values are checked when set, so a bad value fails where it is
/// written (<see cref="ArgumentOutOfRangeException"/>), not later inside a generation. The defaults are greedy decoding
/// with no penalties; <see cref="Qwen3Model.GenerationDefaults"/> holds what the checkpoint recommends.
/// </summary>
/// <remarks>Penalties and filters apply in the order of transformers and vLLM: penalties, temperature, top-k, top-p, min-p.</remarks>
public sealed record SamplingOptions
{
    private readonly float _temperature;
    private readonly int _topK;
    private readonly float _topP = 1f;
    private readonly float _minP;
    private readonly float _repetitionPenalty = 1f;
    private readonly float _presencePenalty;
    private readonly float _frequencyPenalty;
    private readonly int? _maxTokens;
    private readonly IReadOnlyList<string> _stopStrings = Array.Empty<string>();
    private readonly IReadOnlyList<int> _stopTokenIds = Array.Empty<int>();
    private readonly int _topLogprobs;

    /// <summary>The most alternatives <see cref="TopLogprobs"/> may ask for (the engine's <c>Q3N_MAX_TOP_LOGPROBS</c>).</summary>
    public const int MaxTopLogprobs = 20;

    /// <summary>Always the most likely token; no randomness, no penalties.</summary>
    public static SamplingOptions Greedy { get; } = new();

    /// <summary>0 = greedy (argmax; top-k, top-p and min-p are then ignored). Finite and &gt;= 0.</summary>
    public float Temperature
    {
        get => _temperature;
        init => _temperature = float.IsFinite(value) && value >= 0f ? value
            : throw OutOfRange(nameof(Temperature), value, "finite and >= 0 (0 = greedy)");
    }

    /// <summary>Keep only the k most likely tokens; 0 = off.</summary>
    public int TopK
    {
        get => _topK;
        init => _topK = value >= 0 ? value : throw OutOfRange(nameof(TopK), value, ">= 0 (0 = off)");
    }

    /// <summary>Nucleus sampling: the smallest set of tokens whose probabilities reach p. In (0, 1]; 1 = off.</summary>
    public float TopP
    {
        get => _topP;
        init => _topP = value > 0f && value <= 1f ? value : throw OutOfRange(nameof(TopP), value, "in (0, 1] (1 = off)");
    }

    /// <summary>Drop tokens less likely than min_p times the most likely one. In [0, 1]; 0 = off.</summary>
    public float MinP
    {
        get => _minP;
        init => _minP = value >= 0f && value <= 1f ? value : throw OutOfRange(nameof(MinP), value, "in [0, 1] (0 = off)");
    }

    /// <summary>transformers' rule, on every token of the sequence (prompt included). Finite and &gt; 0; 1 = off.</summary>
    public float RepetitionPenalty
    {
        get => _repetitionPenalty;
        init => _repetitionPenalty = float.IsFinite(value) && value > 0f ? value
            : throw OutOfRange(nameof(RepetitionPenalty), value, "finite and > 0 (1 = off)");
    }

    /// <summary>OpenAI/vLLM rule, on this request's output tokens. In [-2, 2]; 0 = off.</summary>
    public float PresencePenalty
    {
        get => _presencePenalty;
        init => _presencePenalty = value >= -2f && value <= 2f ? value
            : throw OutOfRange(nameof(PresencePenalty), value, "in [-2, 2] (0 = off)");
    }

    /// <summary>OpenAI/vLLM rule, on this request's output tokens. In [-2, 2]; 0 = off.</summary>
    public float FrequencyPenalty
    {
        get => _frequencyPenalty;
        init => _frequencyPenalty = value >= -2f && value <= 2f ? value
            : throw OutOfRange(nameof(FrequencyPenalty), value, "in [-2, 2] (0 = off)");
    }

    /// <summary>
    /// The same seed, prompt and options give the same tokens on the same build and device. Null = a fresh random seed
    /// for every request.
    /// </summary>
    public ulong? Seed { get; init; }

    /// <summary>Most tokens to generate (the stop token included); null = until a stop or the end of the context.</summary>
    public int? MaxTokens
    {
        get => _maxTokens;
        init => _maxTokens = value is null or > 0 ? value : throw OutOfRange(nameof(MaxTokens), value, "> 0, or null for no limit");
    }

    /// <summary>
    /// Generation stops when the text contains one of these; the stop string and anything after it are left out of the
    /// returned text. Needs the model's tokenizer.
    /// </summary>
    public IReadOnlyList<string> StopStrings
    {
        get => _stopStrings;
        init
        {
            ArgumentNullException.ThrowIfNull(value, nameof(StopStrings));
            foreach (var s in value)
                if (string.IsNullOrEmpty(s))
                    throw new ArgumentException("A stop string may not be null or empty.", nameof(StopStrings));
            _stopStrings = value.ToArray(); // a copy: later changes to the caller's list must not change these options
        }
    }

    /// <summary>Token ids that end generation in addition to the model's end-of-sequence ids. The stop token is not part of the text.</summary>
    public IReadOnlyList<int> StopTokenIds
    {
        get => _stopTokenIds;
        init
        {
            ArgumentNullException.ThrowIfNull(value, nameof(StopTokenIds));
            foreach (int id in value)
                if (id < 0)
                    throw OutOfRange(nameof(StopTokenIds), id, "token ids >= 0");
            _stopTokenIds = value.ToArray();
        }
    }

    /// <summary>
    /// Keep going past the model's end-of-sequence ids (<see cref="ModelInfo.EosTokenIds"/>), even where
    /// <see cref="StopTokenIds"/> lists them, as <see cref="Qwen3Model.GenerationDefaults"/> does; other stop ids still
    /// apply. For benchmarks and reference runs.
    /// </summary>
    public bool IgnoreEos { get; init; }

    /// <summary>
    /// Report each generated token's log-probability (<see cref="GenerationUpdate.Logprob"/>,
    /// <see cref="GenerationResult.Logprobs"/>). It is the model's own distribution, log-softmax of the raw logits, before
    /// penalties, temperature and filters, so it does not depend on how the token was chosen.
    /// </summary>
    public bool Logprobs { get; init; }

    /// <summary>
    /// How many of the most likely alternatives to report with each log-probability (generated tokens with
    /// <see cref="Logprobs"/>, prompt tokens with <see cref="PromptLogprobs"/>), in 0..<see cref="MaxTopLogprobs"/>.
    /// </summary>
    public int TopLogprobs
    {
        get => _topLogprobs;
        init => _topLogprobs = value is >= 0 and <= MaxTopLogprobs ? value
            : throw OutOfRange(nameof(TopLogprobs), value, $"in 0..{MaxTopLogprobs}");
    }

    /// <summary>
    /// Report the log-probability of each prompt token the request processes, given the tokens before it
    /// (<see cref="GenerationResult.PromptLogprobs"/>). The first token of a sequence has none, and a session turn that
    /// reuses cached tokens reports only the tokens it processed.
    /// </summary>
    public bool PromptLogprobs { get; init; }

    /// <summary>True when the choice is argmax (temperature 0).</summary>
    public bool IsGreedy => Temperature == 0f;

    private static ArgumentOutOfRangeException OutOfRange(string name, object? value, string rule) =>
        new(name, value, $"SamplingOptions.{name} must be {rule}; got {value}.");
}
