using System.Text.Json;

namespace Qwen3Native.Chat;

/// <summary>Who speaks a chat message.</summary>
public enum ChatRole
{
    System,
    User,
    Assistant,
    Tool,
}

/// <summary>
/// One message of a conversation, shaped like the OpenAI / transformers message dictionaries that the Qwen3
/// chat templates read (<c>role</c>, <c>content</c>, <c>reasoning_content</c>, <c>tool_calls</c>).
/// </summary>
public sealed class ChatMessage
{
    private readonly ChatContentPart[]? _parts;

    public ChatMessage(ChatRole role, string? content, string? reasoningContent = null,
        IReadOnlyList<ToolCall>? toolCalls = null, string? toolCallId = null, string? name = null)
    {
        Role = role;
        // The 2507 templates render a non-string content as ''; a null here means the same thing.
        Content = content ?? string.Empty;
        ReasoningContent = reasoningContent;
        ToolCalls = toolCalls ?? Array.Empty<ToolCall>();
        ToolCallId = toolCallId;
        Name = name;
    }

    private ChatMessage(ChatRole role, ChatContentPart[] parts, string? reasoningContent, IReadOnlyList<ToolCall>? toolCalls,
        string? toolCallId, string? name)
        : this(role, string.Concat(parts.OfType<TextPart>().Select(p => p.Text)), reasoningContent, toolCalls, toolCallId, name)
    {
        _parts = parts;
        HasMedia = parts.Any(p => p is not TextPart);
    }

    public ChatRole Role { get; }

    /// <summary>The message's text; for a message made of parts, its text parts joined without separators.</summary>
    public string Content { get; }

    /// <summary>
    /// The content as parts: those given to <see cref="FromParts"/>, or for a message made from a string a single
    /// <see cref="TextPart"/> (none when the string is empty).
    /// </summary>
    public IReadOnlyList<ChatContentPart> Parts => _parts ?? (Content.Length > 0 ? [new TextPart(Content)] : []);

    /// <summary>Whether the content is a list of parts (the template's "content is not a string" case).</summary>
    public bool IsMultipart => _parts is not null;

    /// <summary>Whether any part is an image or a video.</summary>
    public bool HasMedia { get; }

    /// <summary>
    /// The assistant's reasoning kept apart from <see cref="Content"/>. When null the templates look for a
    /// <c>&lt;think&gt;…&lt;/think&gt;</c> block inside the content instead; an empty string counts as given.
    /// </summary>
    public string? ReasoningContent { get; }

    public IReadOnlyList<ToolCall> ToolCalls { get; }

    /// <summary>For tool messages: the id of the call answered. The Qwen3 templates do not render it.</summary>
    public string? ToolCallId { get; }

    /// <summary>For tool messages: the tool's name. The Qwen3 templates do not render it.</summary>
    public string? Name { get; }

    public static ChatMessage System(string content) => new(ChatRole.System, content);

    public static ChatMessage User(string content) => new(ChatRole.User, content);

    /// <summary>A user message of text, images and videos, in the order they are to appear in the prompt.</summary>
    public static ChatMessage User(params ChatContentPart[] parts) => FromParts(ChatRole.User, parts);

    /// <summary>
    /// A message whose content is a list of parts. The Qwen3-VL template renders images and videos of user and tool
    /// messages and only the text of system and assistant messages; the text-only templates refuse images and videos.
    /// </summary>
    public static ChatMessage FromParts(ChatRole role, IEnumerable<ChatContentPart> parts, string? reasoningContent = null,
        IReadOnlyList<ToolCall>? toolCalls = null, string? toolCallId = null, string? name = null)
    {
        ArgumentNullException.ThrowIfNull(parts);
        var list = parts.ToArray();
        if (Array.IndexOf(list, null) >= 0)
            throw new ArgumentException("A content part is null.", nameof(parts));
        return new ChatMessage(role, list, reasoningContent, toolCalls, toolCallId, name);
    }

    public static ChatMessage Assistant(string? content, string? reasoningContent = null, IReadOnlyList<ToolCall>? toolCalls = null) =>
        new(ChatRole.Assistant, content, reasoningContent, toolCalls);

    /// <summary>An assistant message made from parsed model output, ready to go back into the history.</summary>
    public static ChatMessage Assistant(AssistantOutput output)
    {
        ArgumentNullException.ThrowIfNull(output);
        var calls = new List<ToolCall>(output.ToolCalls.Count);
        foreach (var c in output.ToolCalls)
            calls.Add(c.ToToolCall());
        return new ChatMessage(ChatRole.Assistant, output.Content, output.Reasoning, calls);
    }

    public static ChatMessage Tool(string content, string? toolCallId = null, string? name = null) =>
        new(ChatRole.Tool, content, toolCallId: toolCallId, name: name);

    internal string RoleName => Role switch
    {
        ChatRole.System => "system",
        ChatRole.User => "user",
        ChatRole.Assistant => "assistant",
        ChatRole.Tool => "tool",
        _ => throw new ArgumentOutOfRangeException(nameof(Role), Role, null),
    };
}

/// <summary>
/// A function call made by the assistant. The arguments are either a JSON value, rendered the way transformers'
/// <c>tojson</c> filter writes it, or text kept verbatim (what the templates do when <c>arguments</c> is a string).
/// </summary>
public sealed class ToolCall
{
    private ToolCall(string name, JsonElement? arguments, string? argumentsText, string? id)
    {
        ArgumentNullException.ThrowIfNull(name);
        Name = name;
        Arguments = arguments;
        ArgumentsText = argumentsText;
        Id = id;
    }

    public string Name { get; }

    /// <summary>Structured arguments; null when the call was built from text.</summary>
    public JsonElement? Arguments { get; }

    /// <summary>Arguments given as text, rendered as is; null when the call was built from JSON.</summary>
    public string? ArgumentsText { get; }

    public string? Id { get; }

    /// <summary>
    /// A call whose arguments are a JSON value. A JSON string counts as text, as it does for the template when
    /// the message dictionary holds a Python str.
    /// </summary>
    public static ToolCall FromJson(string name, JsonElement arguments, string? id = null) =>
        arguments.ValueKind == JsonValueKind.String
            ? new ToolCall(name, null, arguments.GetString(), id)
            : new ToolCall(name, arguments.Clone(), null, id);

    /// <summary>A call whose arguments are JSON text, rendered byte for byte as given.</summary>
    public static ToolCall FromText(string name, string argumentsJson, string? id = null)
    {
        ArgumentNullException.ThrowIfNull(argumentsJson);
        return new ToolCall(name, null, argumentsJson, id);
    }
}
