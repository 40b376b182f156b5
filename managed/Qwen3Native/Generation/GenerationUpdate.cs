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
    internal GenerationUpdate(string text, int tokenId, OutputKind kind, FinishReason? finishReason, GenerationUsage? usage)
    {
        Text = text;
        TokenId = tokenId;
        Kind = kind;
        FinishReason = finishReason;
        Usage = usage;
    }

    /// <summary>New text; may be empty (bytes of an unfinished character, or text held back for a stop string).</summary>
    public string Text { get; }

    /// <summary>The token this update came from; -1 for an update that only releases held-back text.</summary>
    public int TokenId { get; }

    public OutputKind Kind { get; }

    /// <summary>Set on the last update only.</summary>
    public FinishReason? FinishReason { get; }

    /// <summary>Token counts; set on the last update only.</summary>
    public GenerationUsage? Usage { get; }

    public bool IsFinal => FinishReason is not null;

    public override string ToString() => IsFinal ? $"[{FinishReason}] {Text}" : Text;
}

/// <summary>The outcome of a raw generation from token ids.</summary>
public sealed class GenerationResult
{
    internal GenerationResult(IReadOnlyList<int> tokenIds, string text, FinishReason finishReason, GenerationUsage usage)
    {
        TokenIds = tokenIds;
        Text = text;
        FinishReason = finishReason;
        Usage = usage;
    }

    /// <summary>Every sampled token, the stop token included.</summary>
    public IReadOnlyList<int> TokenIds { get; }

    /// <summary>The decoded text without the stop token or stop string; empty when the model has no tokenizer.</summary>
    public string Text { get; }

    public FinishReason FinishReason { get; }

    public GenerationUsage Usage { get; }
}

/// <summary>The outcome of one chat turn, split into answer, reasoning and tool calls.</summary>
public sealed class ChatResult
{
    internal ChatResult(AssistantOutput output, ChatMessage message, string rawText, IReadOnlyList<int> tokenIds,
        FinishReason finishReason, GenerationUsage usage)
    {
        Text = output.Content;
        Reasoning = output.Reasoning;
        ToolCalls = output.ToolCalls;
        ToolCallErrors = output.ToolCallErrors;
        Message = message;
        RawText = rawText;
        TokenIds = tokenIds;
        FinishReason = finishReason;
        Usage = usage;
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
}
