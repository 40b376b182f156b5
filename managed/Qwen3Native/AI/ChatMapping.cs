using System.Text;
using System.Text.Json;
using Microsoft.Extensions.AI;
using Qwen3Native.Chat;
using Qwen3Native.Generation;
using AIChatMessage = Microsoft.Extensions.AI.ChatMessage;
using AIChatRole = Microsoft.Extensions.AI.ChatRole;
using Q3ChatMessage = Qwen3Native.Chat.ChatMessage;

namespace Qwen3Native.AI;

/// <summary>Translates between Microsoft.Extensions.AI's chat types and the Qwen3 template's messages.</summary>
internal static class ChatMapping
{
    public static List<Q3ChatMessage> ToConversation(IEnumerable<AIChatMessage> messages, string? instructions)
    {
        ArgumentNullException.ThrowIfNull(messages);
        var conversation = new List<Q3ChatMessage>();
        foreach (var message in messages)
        {
            if (message is null)
                throw new ArgumentException("A message is null.", nameof(messages));
            AddMessage(conversation, message);
        }

        if (!string.IsNullOrEmpty(instructions))
        {
            // The Qwen3 templates give the first system message its special place (before the tools); keep one there.
            if (conversation.Count > 0 && conversation[0].Role == Chat.ChatRole.System)
                conversation[0] = Q3ChatMessage.System(conversation[0].Content + "\n\n" + instructions);
            else
                conversation.Insert(0, Q3ChatMessage.System(instructions));
        }
        if (conversation.Count == 0)
            throw new ArgumentException("The request has no messages.", nameof(messages));
        return conversation;
    }

    private static void AddMessage(List<Q3ChatMessage> conversation, AIChatMessage message)
    {
        var text = new StringBuilder();
        // Text and media in order; only used when the message has an image or a video.
        var parts = new List<ChatContentPart>();
        int textInParts = 0;
        StringBuilder? reasoning = null;
        var calls = new List<ToolCall>();
        var results = new List<Q3ChatMessage>();
        foreach (var content in message.Contents)
        {
            switch (content)
            {
                case TextContent t:
                    text.Append(t.Text);
                    break;
                case TextReasoningContent r:
                    (reasoning ??= new StringBuilder()).Append(r.Text);
                    break;
                case FunctionCallContent call:
                    calls.Add(ToolCall.FromJson(call.Name, ArgumentsToJson(call.Arguments), call.CallId));
                    break;
                case FunctionResultContent result:
                    results.Add(Q3ChatMessage.Tool(ResultToText(result), result.CallId));
                    break;
                case UsageContent:
                    break; // bookkeeping, not conversation
                case DataContent or UriContent:
                    if (text.Length > textInParts)
                        parts.Add(new TextPart(text.ToString(textInParts, text.Length - textInParts)));
                    textInParts = text.Length;
                    parts.Add(MediaContentMapping.ToPart(content)!);
                    break;
                default:
                    throw new NotSupportedException(
                        $"Qwen3 models take text, images, videos, reasoning, function calls and function results; a {content.GetType().Name} " +
                        $"in a {message.Role} message cannot be rendered.");
            }
        }

        bool hasMedia = parts.Count > 0;
        if (hasMedia && text.Length > textInParts)
            parts.Add(new TextPart(text.ToString(textInParts, text.Length - textInParts)));

        var role = message.Role;
        if (role == AIChatRole.Tool)
        {
            // Each result becomes one tool message; the template wraps each in its own <tool_response>.
            if (hasMedia)
                results.Insert(0, Q3ChatMessage.FromParts(Chat.ChatRole.Tool, parts));
            else if (text.Length > 0)
                results.Insert(0, Q3ChatMessage.Tool(text.ToString()));
            conversation.AddRange(results);
            return;
        }
        if (role == AIChatRole.Assistant)
        {
            // The Qwen3-VL template renders only an assistant message's text; the parts are kept all the same.
            conversation.Add(hasMedia
                ? Q3ChatMessage.FromParts(Chat.ChatRole.Assistant, parts, reasoning?.ToString(), calls)
                : Q3ChatMessage.Assistant(text.ToString(), reasoning?.ToString(), calls));
            conversation.AddRange(results);
            return;
        }
        if (calls.Count > 0)
            throw new NotSupportedException($"Function calls can only come from the assistant, not from a {role} message.");
        if (role == AIChatRole.System)
        {
            conversation.Add(hasMedia ? Q3ChatMessage.FromParts(Chat.ChatRole.System, parts) : Q3ChatMessage.System(text.ToString()));
            conversation.AddRange(results);
            return;
        }
        if (role == AIChatRole.User)
        {
            // Results sent in a user message go before its text, in the order given.
            conversation.AddRange(results);
            if (hasMedia)
                conversation.Add(Q3ChatMessage.FromParts(Chat.ChatRole.User, parts));
            else if (text.Length > 0 || results.Count == 0)
                conversation.Add(Q3ChatMessage.User(text.ToString()));
            return;
        }
        throw new NotSupportedException($"The chat role '{role}' has no place in a Qwen3 conversation (system, user, assistant, tool).");
    }

    private static JsonElement ArgumentsToJson(IDictionary<string, object?>? arguments) =>
        // Through AIJsonUtilities' options, whose source-generated contract covers the usual argument values (AOT-safe).
        JsonSerializer.SerializeToElement(arguments ?? new Dictionary<string, object?>(),
            AIJsonUtilities.DefaultOptions.GetTypeInfo(typeof(IDictionary<string, object?>)));

    private static string ResultToText(FunctionResultContent result) => result.Result switch
    {
        null => result.Exception is { } e ? "Error: " + e.Message : string.Empty,
        string s => s,
        JsonElement { ValueKind: JsonValueKind.String } j => j.GetString() ?? string.Empty,
        JsonElement j => j.GetRawText(),
        var other => JsonSerializer.Serialize(other, AIJsonUtilities.DefaultOptions.GetTypeInfo(other.GetType())),
    };

    public static Dictionary<string, object?> ArgumentsFromJson(JsonElement arguments)
    {
        var result = new Dictionary<string, object?>();
        if (arguments.ValueKind == JsonValueKind.Object)
            foreach (var p in arguments.EnumerateObject())
                result[p.Name] = p.Value.Clone();
        return result;
    }

    public static IReadOnlyList<ToolDefinition>? ToTools(ChatOptions? options)
    {
        if (options?.Tools is not { Count: > 0 } tools || options.ToolMode is NoneChatToolMode)
            return null;
        var definitions = new List<ToolDefinition>();
        foreach (var tool in tools)
        {
            // Only functions can be described to the model; hosted tools (web search, code interpreter) have no Qwen3 form.
            if (tool is AIFunctionDeclaration f)
            {
                JsonElement? schema = f.JsonSchema.ValueKind == JsonValueKind.Undefined ? null : f.JsonSchema;
                definitions.Add(new ToolDefinition(f.Name, string.IsNullOrEmpty(f.Description) ? null : f.Description, schema));
            }
        }
        return definitions.Count > 0 ? definitions : null;
    }

    public static bool EnableThinking(ChatOptions? options, bool fallback)
    {
        if (options?.AdditionalProperties is { } extra && extra.TryGetValue("enable_thinking", out bool flag))
            return flag;
        if (options?.Reasoning is { } reasoning)
            return reasoning.Effort != ReasoningEffort.None;
        return fallback;
    }

    public static SamplingOptions ToSampling(ChatOptions? options, SamplingOptions baseline)
    {
        if (options is null)
            return baseline;
        var s = baseline with
        {
            Temperature = options.Temperature ?? baseline.Temperature,
            TopP = options.TopP ?? baseline.TopP,
            TopK = options.TopK ?? baseline.TopK,
            MaxTokens = options.MaxOutputTokens ?? baseline.MaxTokens,
            Seed = options.Seed is long seed ? unchecked((ulong)seed) : baseline.Seed,
            FrequencyPenalty = options.FrequencyPenalty ?? baseline.FrequencyPenalty,
            PresencePenalty = options.PresencePenalty ?? baseline.PresencePenalty,
            StopStrings = options.StopSequences is { } stops ? stops.ToArray() : baseline.StopStrings,
        };
        if (options.AdditionalProperties is { } extra)
        {
            // Names as vLLM's OpenAI server accepts them, for the knobs ChatOptions has no property for.
            if (extra.TryGetValue("min_p", out float minP))
                s = s with { MinP = minP };
            if (extra.TryGetValue("repetition_penalty", out float repetition))
                s = s with { RepetitionPenalty = repetition };
            // OpenAI's names; asking for alternatives asks for the log-probabilities too, rather than for nothing.
            if (extra.TryGetValue("logprobs", out bool logprobs))
                s = s with { Logprobs = logprobs };
            if (extra.TryGetValue("top_logprobs", out int top))
                s = s with { TopLogprobs = top, Logprobs = s.Logprobs || top > 0 };
            if (extra.TryGetValue("prompt_logprobs", out bool promptLogprobs))
                s = s with { PromptLogprobs = promptLogprobs };
        }
        return s;
    }

    /// <summary>Keys of the figures and log-probabilities a response carries in its <c>AdditionalProperties</c>.</summary>
    public const string LogprobsKey = "logprobs";
    public const string PromptLogprobsKey = "prompt_logprobs";
    public const string TimeToFirstTokenKey = "time_to_first_token_ms";
    public const string DecodeTokensPerSecondKey = "decode_tokens_per_s";
    public const string PrefillTokensPerSecondKey = "prefill_tokens_per_s";

    /// <summary>The timings, and the log-probabilities when the request asked for them.</summary>
    public static AdditionalPropertiesDictionary ToAdditionalProperties(ChatResult result)
    {
        var extra = new AdditionalPropertiesDictionary
        {
            [TimeToFirstTokenKey] = result.Stats.TimeToFirstToken.TotalMilliseconds,
            [DecodeTokensPerSecondKey] = result.Stats.DecodeTokensPerSecond,
            [PrefillTokensPerSecondKey] = result.Stats.PrefillTokensPerSecond,
        };
        if (result.Logprobs is { } logprobs)
            extra[LogprobsKey] = logprobs;
        if (result.PromptLogprobs is { } promptLogprobs)
            extra[PromptLogprobsKey] = promptLogprobs;
        return extra;
    }

    public static ChatFinishReason ToFinishReason(ChatResult result) =>
        result.ToolCalls.Count > 0 ? ChatFinishReason.ToolCalls
        : result.FinishReason == FinishReason.Length ? ChatFinishReason.Length
        : ChatFinishReason.Stop;

    public static UsageDetails ToUsage(GenerationUsage usage) => new()
    {
        InputTokenCount = usage.PromptTokens,
        CachedInputTokenCount = usage.CachedPromptTokens,
        OutputTokenCount = usage.GeneratedTokens,
        TotalTokenCount = usage.TotalTokens,
    };

    public static string NewCallId() => "call_" + Guid.NewGuid().ToString("N")[..24];
}
