using System.Text;

namespace Qwen3Native.Chat;

/// <summary>The Qwen3 chat template variants, each rendered exactly as its Jinja source does.</summary>
public enum Qwen3TemplateKind
{
    /// <summary>The original Qwen3 hybrid template (Qwen3-0.6B … 235B-A22B): thinking switched by enable_thinking.</summary>
    Qwen3Hybrid,

    /// <summary>Qwen3-*-Instruct-2507: never thinks; assistant history is rendered as given.</summary>
    Qwen3Instruct2507,

    /// <summary>Qwen3-*-Thinking-2507: always thinks; the generation prompt already opens the &lt;think&gt; block.</summary>
    Qwen3Thinking2507,

    /// <summary>
    /// Qwen3-VL-*-Instruct (<c>qwen3_vl.jinja</c>): content may be a list of text, image and video parts; no thinking;
    /// system messages after the first are not rendered.
    /// </summary>
    Qwen3VL,
}

/// <summary>The template variables besides messages and tools.</summary>
public sealed record ChatTemplateOptions
{
    /// <summary>Append the header of the assistant turn the model is to write.</summary>
    public bool AddGenerationPrompt { get; init; } = true;

    /// <summary>
    /// Qwen3Hybrid only: false pre-fills an empty think block so the model answers directly; null leaves the
    /// variable undefined, which the template treats like true. The 2507 templates ignore it.
    /// </summary>
    public bool? EnableThinking { get; init; }

    /// <summary>
    /// Qwen3VL only (<c>add_vision_id</c>): write "Picture N: " / "Video N: " before each image or video, numbered
    /// across the conversation.
    /// </summary>
    public bool AddVisionId { get; init; }
}

/// <summary>
/// Renders a conversation into the prompt text of a Qwen3 chat template, byte for byte what transformers'
/// <c>apply_chat_template(..., tokenize=False)</c> returns for the same messages, tools and options.
/// </summary>
public sealed class Qwen3ChatTemplate
{
    private const string ImStart = "<|im_start|>";
    private const string ImEnd = "<|im_end|>";

    /// <summary>What the Qwen3-VL template writes for an image part; the processor expands the pad (spec §4.5).</summary>
    public const string ImagePlaceholder = "<|vision_start|><|image_pad|><|vision_end|>";

    /// <summary>What the Qwen3-VL template writes for a video part; the processor replaces the whole triple.</summary>
    public const string VideoPlaceholder = "<|vision_start|><|video_pad|><|vision_end|>";

    private const string ToolsPreamble =
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n" +
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>";

    private const string ToolsPostamble =
        "\n</tools>\n\nFor each function call, return a json object with function name and arguments within " +
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n" +
        "</tool_call><|im_end|>\n";

    private Qwen3ChatTemplate(Qwen3TemplateKind kind) => Kind = kind;

    public static Qwen3ChatTemplate Hybrid { get; } = new(Qwen3TemplateKind.Qwen3Hybrid);

    public static Qwen3ChatTemplate Instruct2507 { get; } = new(Qwen3TemplateKind.Qwen3Instruct2507);

    public static Qwen3ChatTemplate Thinking2507 { get; } = new(Qwen3TemplateKind.Qwen3Thinking2507);

    public static Qwen3ChatTemplate VL { get; } = new(Qwen3TemplateKind.Qwen3VL);

    public Qwen3TemplateKind Kind { get; }

    public static Qwen3ChatTemplate For(Qwen3TemplateKind kind) => kind switch
    {
        Qwen3TemplateKind.Qwen3Hybrid => Hybrid,
        Qwen3TemplateKind.Qwen3Instruct2507 => Instruct2507,
        Qwen3TemplateKind.Qwen3Thinking2507 => Thinking2507,
        Qwen3TemplateKind.Qwen3VL => VL,
        _ => throw new ArgumentOutOfRangeException(nameof(kind), kind, null),
    };

    /// <summary>
    /// Recognises which variant a checkpoint's Jinja <c>chat_template</c> is, from the fragments that tell them
    /// apart; null for a template that is none of them.
    /// </summary>
    public static Qwen3ChatTemplate? Detect(string? jinjaTemplate)
    {
        if (string.IsNullOrEmpty(jinjaTemplate)
            || !jinjaTemplate.Contains("<|im_start|>", StringComparison.Ordinal)
            || !jinjaTemplate.Contains("<tool_response>", StringComparison.Ordinal))
            return null;
        if (jinjaTemplate.Contains("<|vision_start|>", StringComparison.Ordinal))
        {
            // The Qwen3-VL Thinking templates were never read (spec §9); better unknown than rendered as Instruct.
            return jinjaTemplate.Contains("<think>", StringComparison.Ordinal) ? null : VL;
        }
        if (jinjaTemplate.Contains("enable_thinking", StringComparison.Ordinal))
            return Hybrid;
        if (jinjaTemplate.Contains("'<|im_start|>assistant\\n<think>\\n'", StringComparison.Ordinal))
            return Thinking2507;
        if (!jinjaTemplate.Contains("reasoning_content", StringComparison.Ordinal))
            return Instruct2507;
        return null;
    }

    /// <summary>
    /// Whether the prompt leaves a &lt;think&gt; block open, so that the generated text starts inside the reasoning
    /// and only the closing tag appears in it. Pass the result to <see cref="ChatOutputParser.Parse"/>.
    /// </summary>
    public bool PromptOpensThinking(ChatTemplateOptions? options = null) =>
        Kind == Qwen3TemplateKind.Qwen3Thinking2507 && (options ?? new ChatTemplateOptions()).AddGenerationPrompt;

    /// <summary>
    /// The prompt text. Images and videos become <see cref="ImagePlaceholder"/> / <see cref="VideoPlaceholder"/>
    /// (Qwen3VL only; <see cref="RenderPrompt"/> also lists them in order). A multipart message without images or
    /// videos renders as its joined text under every variant, where the text-only Jinja templates would render ''.
    /// </summary>
    /// <exception cref="NotSupportedException">An image or video in a conversation rendered by a text-only variant.</exception>
    public string Render(IReadOnlyList<ChatMessage> messages, IReadOnlyList<ToolDefinition>? tools = null,
        ChatTemplateOptions? options = null) => RenderCore(messages, tools, options, media: null);

    /// <summary>
    /// The prompt text with the images and videos its placeholders stand for, in prompt order: the input of
    /// <see cref="MultimodalPromptBuilder"/>. Media in system and assistant messages are not rendered by the Qwen3-VL
    /// template and are not listed.
    /// </summary>
    /// <inheritdoc cref="Render" path="/exception"/>
    public ChatPrompt RenderPrompt(IReadOnlyList<ChatMessage> messages, IReadOnlyList<ToolDefinition>? tools = null,
        ChatTemplateOptions? options = null)
    {
        var media = new List<ChatContentPart>();
        string text = RenderCore(messages, tools, options, media);
        return new ChatPrompt(text, media);
    }

    private string RenderCore(IReadOnlyList<ChatMessage> messages, IReadOnlyList<ToolDefinition>? tools,
        ChatTemplateOptions? options, List<ChatContentPart>? media)
    {
        ArgumentNullException.ThrowIfNull(messages);
        // Every variant reads messages[0].role first; Jinja fails there on an empty list.
        if (messages.Count == 0)
            throw new ArgumentException("A conversation needs at least one message.", nameof(messages));
        options ??= new ChatTemplateOptions();
        if (Kind == Qwen3TemplateKind.Qwen3VL)
            return RenderVL(messages, tools, options, media);
        foreach (var m in messages)
        {
            if (m is null)
                throw new ArgumentException("A message is null.", nameof(messages));
            if (m.HasMedia)
                throw new NotSupportedException(
                    $"The {Kind} chat template has no place for images or videos (a {m.RoleName} message has them); only a " +
                    "Qwen3-VL model's template (Qwen3ChatTemplate.VL) renders them.");
        }

        var sb = new StringBuilder();
        RenderSystemAndTools(sb, messages, tools);

        // Assistant turns after the last real user query are "current": only they keep their reasoning.
        int lastQueryIndex = Kind == Qwen3TemplateKind.Qwen3Instruct2507 ? -1 : LastQueryIndex(messages);

        for (int i = 0; i < messages.Count; i++)
        {
            var m = messages[i];
            bool last = i == messages.Count - 1;
            switch (m.Role)
            {
                case ChatRole.User:
                    AppendTurn(sb, m.RoleName, m.Content);
                    break;
                case ChatRole.System:
                    if (i != 0)
                        AppendTurn(sb, m.RoleName, m.Content);
                    break;
                case ChatRole.Assistant:
                    RenderAssistant(sb, m, i, last, lastQueryIndex);
                    break;
                case ChatRole.Tool:
                    // Consecutive tool results share one user turn.
                    if (i == 0 || messages[i - 1].Role != ChatRole.Tool)
                        sb.Append(ImStart).Append("user");
                    sb.Append("\n<tool_response>\n").Append(m.Content).Append("\n</tool_response>");
                    if (last || messages[i + 1].Role != ChatRole.Tool)
                        sb.Append(ImEnd).Append('\n');
                    break;
            }
        }

        if (options.AddGenerationPrompt)
        {
            sb.Append(ImStart).Append("assistant\n");
            if (Kind == Qwen3TemplateKind.Qwen3Thinking2507)
                sb.Append("<think>\n");
            else if (Kind == Qwen3TemplateKind.Qwen3Hybrid && options.EnableThinking == false)
                sb.Append("<think>\n\n</think>\n\n");
        }
        return sb.ToString();
    }

    private static void RenderSystemAndTools(StringBuilder sb, IReadOnlyList<ChatMessage> messages, IReadOnlyList<ToolDefinition>? tools)
    {
        bool firstIsSystem = messages[0].Role == ChatRole.System;
        if (tools is { Count: > 0 })
        {
            sb.Append(ImStart).Append("system\n");
            if (firstIsSystem)
                sb.Append(messages[0].Content).Append("\n\n");
            sb.Append(ToolsPreamble);
            foreach (var tool in tools)
            {
                sb.Append('\n');
                tool.WriteTo(sb);
            }
            sb.Append(ToolsPostamble);
        }
        else if (firstIsSystem)
        {
            AppendTurn(sb, "system", messages[0].Content);
        }
    }

    private static int LastQueryIndex(IReadOnlyList<ChatMessage> messages)
    {
        // A user message that merely wraps tool output does not count as a query.
        for (int i = messages.Count - 1; i >= 0; i--)
        {
            var m = messages[i];
            if (m.Role == ChatRole.User
                && !(m.Content.StartsWith("<tool_response>", StringComparison.Ordinal)
                     && m.Content.EndsWith("</tool_response>", StringComparison.Ordinal)))
                return i;
        }
        return messages.Count - 1;
    }

    private void RenderAssistant(StringBuilder sb, ChatMessage m, int index, bool last, int lastQueryIndex)
    {
        string content = m.Content;
        if (Kind == Qwen3TemplateKind.Qwen3Instruct2507)
        {
            sb.Append(ImStart).Append("assistant\n").Append(content);
        }
        else
        {
            string reasoning = string.Empty;
            if (m.ReasoningContent is not null)
            {
                reasoning = m.ReasoningContent;
            }
            else if (content.Contains("</think>", StringComparison.Ordinal))
            {
                // content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') and split(...)[-1].lstrip('\n')
                string beforeClose = content.Substring(0, content.IndexOf("</think>", StringComparison.Ordinal));
                beforeClose = PyStr.RStrip(beforeClose, '\n');
                int open = beforeClose.LastIndexOf("<think>", StringComparison.Ordinal);
                reasoning = PyStr.LStrip(open >= 0 ? beforeClose.Substring(open + "<think>".Length) : beforeClose, '\n');
                int lastClose = content.LastIndexOf("</think>", StringComparison.Ordinal);
                content = PyStr.LStrip(content.Substring(lastClose + "</think>".Length), '\n');
            }

            if (index > lastQueryIndex && (last || reasoning.Length > 0))
            {
                sb.Append(ImStart).Append("assistant\n<think>\n").Append(PyStr.Strip(reasoning, '\n'))
                  .Append("\n</think>\n\n").Append(PyStr.LStrip(content, '\n'));
            }
            else
            {
                sb.Append(ImStart).Append("assistant\n").Append(content);
            }
        }

        // The separator test reads the content variable, not the lstripped text that was written.
        AppendToolCalls(sb, m, content.Length > 0);
        sb.Append(ImEnd).Append('\n');
    }

    /// <summary>
    /// qwen3_vl.jinja: the same system/tools block and tool-response grouping as the 2507 Instruct template, no
    /// reasoning handling, parts rendered in user and tool messages, and no turn for a system message after the first.
    /// </summary>
    private static string RenderVL(IReadOnlyList<ChatMessage> messages, IReadOnlyList<ToolDefinition>? tools,
        ChatTemplateOptions options, List<ChatContentPart>? media)
    {
        foreach (var m in messages)
            if (m is null)
                throw new ArgumentException("A message is null.", nameof(messages));
        var sb = new StringBuilder();
        // A system message's parts contribute their text only, which is what Content holds.
        RenderSystemAndTools(sb, messages, tools);
        int images = 0, videos = 0;
        for (int i = 0; i < messages.Count; i++)
        {
            var m = messages[i];
            bool last = i == messages.Count - 1;
            switch (m.Role)
            {
                case ChatRole.User:
                    sb.Append(ImStart).Append("user\n");
                    AppendVisionContent(sb, m, options, media, ref images, ref videos);
                    sb.Append(ImEnd).Append('\n');
                    break;
                case ChatRole.Assistant:
                    sb.Append(ImStart).Append("assistant\n").Append(m.Content);
                    // Jinja's truth test on message.content: a non-empty list is true even when it holds no text.
                    bool contentTrue = m.IsMultipart ? m.Parts.Count > 0 : m.Content.Length > 0;
                    AppendToolCalls(sb, m, contentTrue);
                    sb.Append(ImEnd).Append('\n');
                    break;
                case ChatRole.Tool:
                    if (i == 0 || messages[i - 1].Role != ChatRole.Tool)
                        sb.Append(ImStart).Append("user");
                    sb.Append("\n<tool_response>\n");
                    AppendVisionContent(sb, m, options, media, ref images, ref videos);
                    sb.Append("\n</tool_response>");
                    if (last || messages[i + 1].Role != ChatRole.Tool)
                        sb.Append(ImEnd).Append('\n');
                    break;
            }
        }
        if (options.AddGenerationPrompt)
            sb.Append(ImStart).Append("assistant\n");
        return sb.ToString();
    }

    private static void AppendVisionContent(StringBuilder sb, ChatMessage m, ChatTemplateOptions options,
        List<ChatContentPart>? media, ref int images, ref int videos)
    {
        if (!m.IsMultipart)
        {
            sb.Append(m.Content);
            return;
        }
        foreach (var part in m.Parts)
        {
            switch (part)
            {
                case TextPart t:
                    sb.Append(t.Text);
                    break;
                case ImagePart:
                    images++;
                    if (options.AddVisionId)
                        sb.Append("Picture ").Append(images).Append(": ");
                    sb.Append(ImagePlaceholder);
                    media?.Add(part);
                    break;
                case VideoPart:
                    videos++;
                    if (options.AddVisionId)
                        sb.Append("Video ").Append(videos).Append(": ");
                    sb.Append(VideoPlaceholder);
                    media?.Add(part);
                    break;
            }
        }
    }

    private static void AppendToolCalls(StringBuilder sb, ChatMessage m, bool contentTrue)
    {
        for (int c = 0; c < m.ToolCalls.Count; c++)
        {
            if (c > 0 || contentTrue)
                sb.Append('\n');
            var call = m.ToolCalls[c];
            sb.Append("<tool_call>\n{\"name\": \"").Append(call.Name).Append("\", \"arguments\": ");
            if (call.ArgumentsText is not null)
                sb.Append(call.ArgumentsText);
            else
                PythonJson.Write(sb, call.Arguments!.Value);
            sb.Append("}\n</tool_call>");
        }
    }

    private static void AppendTurn(StringBuilder sb, string role, string content) =>
        sb.Append(ImStart).Append(role).Append('\n').Append(content).Append(ImEnd).Append('\n');
}

/// <summary>Python's str.strip/lstrip/rstrip with an explicit character, as the templates call them.</summary>
internal static class PyStr
{
    public static string Strip(string s, char c) => s.Trim(c);

    public static string LStrip(string s, char c) => s.TrimStart(c);

    public static string RStrip(string s, char c) => s.TrimEnd(c);
}
