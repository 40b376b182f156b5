using System.Text.Json;

namespace Qwen3Native.Chat;

/// <summary>A tool call read from generated text.</summary>
public sealed class ParsedToolCall
{
    internal ParsedToolCall(string name, JsonElement arguments, string rawText)
    {
        Name = name;
        Arguments = arguments;
        RawText = rawText;
    }

    public string Name { get; }

    /// <summary>The arguments object (a detached element, safe to keep).</summary>
    public JsonElement Arguments { get; }

    /// <summary>The text between &lt;tool_call&gt; and &lt;/tool_call&gt;, as generated.</summary>
    public string RawText { get; }

    /// <summary>The call as it goes back into the history of the next request.</summary>
    public ToolCall ToToolCall(string? id = null) => ToolCall.FromJson(Name, Arguments, id);
}

/// <summary>A &lt;tool_call&gt; block that could not be turned into a call; kept so that nothing is lost silently.</summary>
public sealed class ToolCallParseError
{
    internal ToolCallParseError(string rawText, string message)
    {
        RawText = rawText;
        Message = message;
    }

    /// <summary>The text of the block (for an unterminated block: everything after the opening tag).</summary>
    public string RawText { get; }

    public string Message { get; }

    public override string ToString() => $"{Message}: {RawText}";
}

/// <summary>Generated assistant text split into reasoning, answer and tool calls.</summary>
public sealed class AssistantOutput
{
    internal AssistantOutput(string? reasoning, bool reasoningClosed, string content,
        IReadOnlyList<ParsedToolCall> toolCalls, IReadOnlyList<ToolCallParseError> errors)
    {
        Reasoning = reasoning;
        ReasoningClosed = reasoningClosed;
        Content = content;
        ToolCalls = toolCalls;
        ToolCallErrors = errors;
    }

    /// <summary>The think block's text without its tags and surrounding newlines; null when there was none.</summary>
    public string? Reasoning { get; }

    /// <summary>False when a think block was opened but generation stopped before &lt;/think&gt;.</summary>
    public bool ReasoningClosed { get; }

    /// <summary>The answer: text after the think block, with the tool-call blocks taken out.</summary>
    public string Content { get; }

    public IReadOnlyList<ParsedToolCall> ToolCalls { get; }

    public IReadOnlyList<ToolCallParseError> ToolCallErrors { get; }
}

/// <summary>Reads what a Qwen3 model generated for an assistant turn.</summary>
public static class ChatOutputParser
{
    private const string ThinkOpen = "<think>";
    private const string ThinkClose = "</think>";
    private const string CallOpen = "<tool_call>";
    private const string CallClose = "</tool_call>";

    /// <param name="generated">The decoded continuation of the prompt (special tokens may be left in).</param>
    /// <param name="promptOpenedThinking">
    /// True when the prompt ended inside an opened &lt;think&gt; block (see
    /// <see cref="Qwen3ChatTemplate.PromptOpensThinking"/>): the text then starts with reasoning.
    /// </param>
    public static AssistantOutput Parse(string generated, bool promptOpenedThinking = false)
    {
        ArgumentNullException.ThrowIfNull(generated);
        string text = CutAtEndOfTurn(generated);

        string? reasoning = null;
        bool closed = true;
        string rest = text;

        int start = 0;
        if (!promptOpenedThinking)
        {
            // A think block counts only at the start of the turn; elsewhere the tags are ordinary answer text.
            int p = 0;
            while (p < text.Length && char.IsWhiteSpace(text[p]))
                p++;
            if (string.CompareOrdinal(text, p, ThinkOpen, 0, ThinkOpen.Length) == 0)
            {
                start = p + ThinkOpen.Length;
            }
            else
            {
                // A Thinking-2507 prompt opens the block itself, so a caller that did not say so still gets
                // "reasoning</think>answer"; a closing tag with no opening tag before it can only mean that.
                int close = text.IndexOf(ThinkClose, StringComparison.Ordinal);
                bool opened = close >= 0 && text.IndexOf(ThinkOpen, 0, close, StringComparison.Ordinal) >= 0;
                start = close >= 0 && !opened ? 0 : -1;
            }
        }

        if (start >= 0)
        {
            int close = text.IndexOf(ThinkClose, start, StringComparison.Ordinal);
            if (close < 0)
            {
                reasoning = text.Substring(start);
                closed = false;
                rest = string.Empty;
            }
            else
            {
                reasoning = text.Substring(start, close - start);
                rest = text.Substring(close + ThinkClose.Length);
            }
            reasoning = PyStr.Strip(reasoning, '\n');
        }

        var calls = new List<ParsedToolCall>();
        var errors = new List<ToolCallParseError>();
        string content = ExtractToolCalls(rest, calls, errors);
        return new AssistantOutput(reasoning, closed, content, calls, errors);
    }

    private static string CutAtEndOfTurn(string text)
    {
        int cut = text.Length;
        foreach (var marker in new[] { "<|im_end|>", "<|endoftext|>" })
        {
            int i = text.IndexOf(marker, StringComparison.Ordinal);
            if (i >= 0 && i < cut)
                cut = i;
        }
        return text.Substring(0, cut);
    }

    private static string ExtractToolCalls(string text, List<ParsedToolCall> calls, List<ToolCallParseError> errors)
    {
        var content = new System.Text.StringBuilder();
        int pos = 0;
        while (true)
        {
            int open = text.IndexOf(CallOpen, pos, StringComparison.Ordinal);
            if (open < 0)
            {
                content.Append(text, pos, text.Length - pos);
                break;
            }
            content.Append(text, pos, open - pos);
            int bodyStart = open + CallOpen.Length;
            int close = text.IndexOf(CallClose, bodyStart, StringComparison.Ordinal);
            if (close < 0)
            {
                errors.Add(new ToolCallParseError(text.Substring(bodyStart), "unterminated <tool_call> block"));
                break;
            }
            ParseCall(text.Substring(bodyStart, close - bodyStart), calls, errors);
            pos = close + CallClose.Length;
        }
        // The template puts a newline between the answer and each call block; those are layout, not answer.
        return PyStr.LStrip(content.ToString(), '\n').TrimEnd();
    }

    private static void ParseCall(string raw, List<ParsedToolCall> calls, List<ToolCallParseError> errors)
    {
        JsonElement root;
        try
        {
            using var doc = JsonDocument.Parse(raw.Trim());
            root = doc.RootElement.Clone();
        }
        catch (JsonException e)
        {
            errors.Add(new ToolCallParseError(raw, "invalid JSON: " + e.Message));
            return;
        }

        if (root.ValueKind != JsonValueKind.Object)
        {
            errors.Add(new ToolCallParseError(raw, "tool call is not a JSON object"));
            return;
        }
        if (!root.TryGetProperty("name", out var name) || name.ValueKind != JsonValueKind.String
            || string.IsNullOrEmpty(name.GetString()))
        {
            errors.Add(new ToolCallParseError(raw, "tool call has no \"name\" string"));
            return;
        }

        JsonElement args;
        if (!root.TryGetProperty("arguments", out args) || args.ValueKind == JsonValueKind.Null)
        {
            args = EmptyObject();
        }
        else if (args.ValueKind == JsonValueKind.String)
        {
            // Some outputs double-encode the arguments; accept them when the string holds an object.
            try
            {
                using var inner = JsonDocument.Parse(args.GetString()!);
                args = inner.RootElement.Clone();
            }
            catch (JsonException e)
            {
                errors.Add(new ToolCallParseError(raw, "\"arguments\" string is not valid JSON: " + e.Message));
                return;
            }
        }
        if (args.ValueKind != JsonValueKind.Object)
        {
            errors.Add(new ToolCallParseError(raw, "\"arguments\" is not a JSON object"));
            return;
        }
        calls.Add(new ParsedToolCall(name.GetString()!, args, raw));
    }

    private static JsonElement EmptyObject()
    {
        using var doc = JsonDocument.Parse("{}");
        return doc.RootElement.Clone();
    }
}
