namespace Qwen3Native.Generation;

/// <summary>One of the most likely tokens at a position, with its log-probability.</summary>
/// <param name="TokenId">The token's id.</param>
/// <param name="Text">The token decoded on its own; a fragment of a UTF-8 character shows as U+FFFD. Empty when the model has no tokenizer.</param>
/// <param name="Logprob">Natural log of its probability under the model (log-softmax of the raw fp32 logits).</param>
public sealed record TopLogprob(int TokenId, string Text, float Logprob);

/// <summary>
/// The log-probability of one token, generated or from the prompt, with the most likely alternatives at its position.
/// The distribution is the model's own: log-softmax of the raw fp32 logits, before penalties, temperature and filters.
/// </summary>
public sealed record TokenLogprob
{
    internal TokenLogprob(int tokenId, string text, float logprob, IReadOnlyList<TopLogprob> topLogprobs)
    {
        TokenId = tokenId;
        Text = text;
        Logprob = logprob;
        TopLogprobs = topLogprobs;
    }

    public int TokenId { get; }

    /// <summary>The token decoded on its own; a fragment of a UTF-8 character shows as U+FFFD. Empty when the model has no tokenizer.</summary>
    public string Text { get; }

    /// <summary>Natural log of the token's probability; exp(Logprob) is its probability.</summary>
    public float Logprob { get; }

    /// <summary>
    /// The <see cref="SamplingOptions.TopLogprobs"/> most likely tokens at this position, most likely first (equal
    /// log-probabilities: lower id first). The token itself is among them only when it is that likely.
    /// </summary>
    public IReadOnlyList<TopLogprob> TopLogprobs { get; }

    public override string ToString() => $"{TokenId} {Logprob:0.####}";
}

/// <summary>
/// Figures of one request as the engine measured them (<c>q3n_sequence_get_stats</c>): token counts, which agree with
/// <see cref="GenerationUsage"/>, and timings.
/// </summary>
public sealed record GenerationStats
{
    /// <summary>All zero: a request that never sampled a token.</summary>
    public static GenerationStats Empty { get; } = new();

    /// <summary>Tokens of the whole prompt, including those reused from the cache (as <see cref="GenerationUsage.PromptTokens"/>).</summary>
    public int PromptTokens { get; init; }

    /// <summary>Prompt tokens that were already in the KV cache when the request began.</summary>
    public int CachedPromptTokens { get; init; }

    /// <summary>Prompt tokens this request ran through the model.</summary>
    public int PrefilledTokens => PromptTokens - CachedPromptTokens;

    /// <summary>Tokens sampled, the stop token included.</summary>
    public int GeneratedTokens { get; init; }

    /// <summary>From the request's first step to its first sampled token: the prefill plus one sample.</summary>
    public TimeSpan TimeToFirstToken { get; init; }

    /// <summary>Time spent in steps before the first sample.</summary>
    public TimeSpan PrefillTime { get; init; }

    /// <summary>Generated tokens after the first, per second between the first and the last sample; 0 with fewer than two.</summary>
    public double DecodeTokensPerSecond { get; init; }

    /// <summary>Prefilled tokens per second of <see cref="PrefillTime"/>; 0 when nothing was timed.</summary>
    public double PrefillTokensPerSecond => PrefillTime > TimeSpan.Zero ? PrefilledTokens / PrefillTime.TotalSeconds : 0;
}
