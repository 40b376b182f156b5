using Qwen3Native.Chat;

namespace Qwen3Native.Generation;

/// <summary>Why a generation ended.</summary>
public enum FinishReason
{
    /// <summary>An end-of-sequence or stop token id, or a stop string.</summary>
    Stop,

    /// <summary><see cref="SamplingOptions.MaxTokens"/> or the model's context length was reached.</summary>
    Length,

    /// <summary>
    /// The caller cancelled. The APIs never return this; they throw <see cref="GenerationCanceledException"/>, whose
    /// <see cref="GenerationCanceledException.Partial"/> result carries it.
    /// </summary>
    Cancelled,
}

/// <summary>Which part of a Qwen3 chat answer a piece of streamed text belongs to.</summary>
public enum OutputKind
{
    /// <summary>The answer itself (all text of a raw, untemplated generation).</summary>
    Content,

    /// <summary>Text inside the &lt;think&gt; … &lt;/think&gt; block.</summary>
    Reasoning,

    /// <summary>The JSON inside a &lt;tool_call&gt; … &lt;/tool_call&gt; block; the parsed calls are in <see cref="ChatResult.ToolCalls"/>.</summary>
    ToolCall,

    /// <summary>One of the tags themselves (&lt;think&gt;, &lt;/think&gt;, &lt;tool_call&gt;, &lt;/tool_call&gt;).</summary>
    Markup,
}

/// <summary>Token counts of one request.</summary>
/// <param name="PromptTokens">Tokens of the whole prompt, including those reused from the cache.</param>
/// <param name="CachedPromptTokens">Prompt tokens whose keys and values were already in the cache from an earlier turn.</param>
/// <param name="GeneratedTokens">Tokens sampled, the stop token included.</param>
public sealed record GenerationUsage(int PromptTokens, int CachedPromptTokens, int GeneratedTokens)
{
    /// <summary>Prompt tokens that this request had to process.</summary>
    public int PrefilledTokens => PromptTokens - CachedPromptTokens;

    public int TotalTokens => PromptTokens + GeneratedTokens;
}

/// <summary>
/// One step of a streamed generation: the text that the newest token completes. Concatenating every
/// <see cref="Text"/> gives the whole generated text; text is never cut inside a UTF-8 character, and text that might
/// begin a stop string is held back until that is decided.
/// </summary>
public sealed class GenerationUpdate
{
    internal GenerationUpdate(string text, int tokenId, OutputKind kind, FinishReason? finishReason, GenerationUsage? usage,
        GenerationStats? stats = null, IReadOnlyList<TokenLogprob>? promptLogprobs = null)
    {
        Text = text;
        TokenId = tokenId;
        Kind = kind;
        FinishReason = finishReason;
        Usage = usage;
        Stats = stats;
        PromptLogprobs = promptLogprobs;
    }

    /// <summary>New text; may be empty (bytes of an unfinished character, or text held back for a stop string).</summary>
    public string Text { get; }

    /// <summary>The token this update came from; -1 for an update that only releases held-back text.</summary>
    public int TokenId { get; }

    public OutputKind Kind { get; }

    /// <summary>
    /// With <see cref="SamplingOptions.Logprobs"/>: the log-probability of the token sampled at this step. Each sampled
    /// token's is carried by exactly one update, the last one that token produced (normally the one whose
    /// <see cref="TokenId"/> it is), so collecting them gives one per generated token, in order. Null otherwise.
    /// </summary>
    public TokenLogprob? Logprob { get; private init; }

    /// <summary>Set on the last update only.</summary>
    public FinishReason? FinishReason { get; }

    /// <summary>Token counts; set on the last update only.</summary>
    public GenerationUsage? Usage { get; }

    /// <summary>The engine's counts and timings of the request; set on the last update only.</summary>
    public GenerationStats? Stats { get; }

    /// <summary>With <see cref="SamplingOptions.PromptLogprobs"/>: the prompt tokens' log-probabilities, on the last update only.</summary>
    public IReadOnlyList<TokenLogprob>? PromptLogprobs { get; }

    public bool IsFinal => FinishReason is not null;

    internal GenerationUpdate WithLogprob(TokenLogprob logprob) =>
        new(Text, TokenId, Kind, FinishReason, Usage, Stats, PromptLogprobs) { Logprob = logprob };

    public override string ToString() => IsFinal ? $"[{FinishReason}] {Text}" : Text;
}

/// <summary>The outcome of a raw generation from token ids.</summary>
public sealed class GenerationResult
{
    internal GenerationResult(IReadOnlyList<int> tokenIds, string text, FinishReason finishReason, GenerationUsage usage,
        GenerationStats? stats = null, IReadOnlyList<TokenLogprob>? logprobs = null, IReadOnlyList<TokenLogprob>? promptLogprobs = null)
    {
        TokenIds = tokenIds;
        Text = text;
        FinishReason = finishReason;
        Usage = usage;
        Stats = stats ?? GenerationStats.Empty;
        Logprobs = logprobs;
        PromptLogprobs = promptLogprobs;
    }

    /// <summary>Every sampled token, the stop token included.</summary>
    public IReadOnlyList<int> TokenIds { get; }

    /// <summary>The decoded text without the stop token or stop string; empty when the model has no tokenizer.</summary>
    public string Text { get; }

    public FinishReason FinishReason { get; }

    public GenerationUsage Usage { get; }

    /// <summary>The engine's counts and timings (time to first token, decode speed); all zero if no token was sampled.</summary>
    public GenerationStats Stats { get; }

    /// <summary>With <see cref="SamplingOptions.Logprobs"/>: one entry per token of <see cref="TokenIds"/>; null otherwise.</summary>
    public IReadOnlyList<TokenLogprob>? Logprobs { get; }

    /// <summary>
    /// With <see cref="SamplingOptions.PromptLogprobs"/>: one entry per prompt token the request processed, except the
    /// sequence's first token, which has no predecessor; null otherwise.
    /// </summary>
    public IReadOnlyList<TokenLogprob>? PromptLogprobs { get; }
}

/// <summary>The outcome of one chat turn, split into answer, reasoning and tool calls.</summary>
public sealed class ChatResult
{
    internal ChatResult(AssistantOutput output, ChatMessage message, string rawText, GenerationResult generation)
    {
        Text = output.Content;
        Reasoning = output.Reasoning;
        ToolCalls = output.ToolCalls;
        ToolCallErrors = output.ToolCallErrors;
        Message = message;
        RawText = rawText;
        TokenIds = generation.TokenIds;
        FinishReason = generation.FinishReason;
        Usage = generation.Usage;
        Stats = generation.Stats;
        Logprobs = generation.Logprobs;
        PromptLogprobs = generation.PromptLogprobs;
    }

    /// <summary>The answer: the text after the think block with the tool-call blocks taken out.</summary>
    public string Text { get; }

    /// <summary>The think block's text; null when the model did not think (or thinking was disabled).</summary>
    public string? Reasoning { get; }

    public IReadOnlyList<ParsedToolCall> ToolCalls { get; }

    /// <summary>&lt;tool_call&gt; blocks that could not be parsed, kept so that nothing is lost silently.</summary>
    public IReadOnlyList<ToolCallParseError> ToolCallErrors { get; }

    /// <summary>The assistant message that was added to the session's history.</summary>
    public ChatMessage Message { get; }

    /// <summary>Everything generated, tags included, without the end-of-turn token or stop string (the concatenated stream).</summary>
    public string RawText { get; }

    /// <summary>Every sampled token, the stop token included.</summary>
    public IReadOnlyList<int> TokenIds { get; }

    public FinishReason FinishReason { get; }

    public GenerationUsage Usage { get; }

    /// <summary>The engine's counts and timings of the turn (time to first token, decode speed).</summary>
    public GenerationStats Stats { get; }

    /// <summary>With <see cref="SamplingOptions.Logprobs"/>: one entry per token of <see cref="TokenIds"/>; null otherwise.</summary>
    public IReadOnlyList<TokenLogprob>? Logprobs { get; }

    /// <summary>
    /// With <see cref="SamplingOptions.PromptLogprobs"/>: the log-probabilities of the prompt tokens this turn processed
    /// (those reused from the session's cache have none); null otherwise.
    /// </summary>
    public IReadOnlyList<TokenLogprob>? PromptLogprobs { get; }
}
