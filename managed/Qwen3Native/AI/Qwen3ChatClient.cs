using System.Runtime.CompilerServices;
using Microsoft.Extensions.AI;
using Qwen3Native.Chat;
using Qwen3Native.Generation;
using AIChatMessage = Microsoft.Extensions.AI.ChatMessage;
using AIChatRole = Microsoft.Extensions.AI.ChatRole;
using Q3ChatMessage = Qwen3Native.Chat.ChatMessage;

namespace Qwen3Native.AI;

/// <summary>
/// A <see cref="Qwen3Model"/> as a Microsoft.Extensions.AI <see cref="IChatClient"/>. Each request carries the whole
/// conversation, as the interface wants; the client keeps an idle <see cref="Qwen3Session"/> whose KV cache holds the
/// previous request, so a request that extends the previous conversation only processes its new tokens.
/// </summary>
/// <remarks>
/// <para>
/// Mapping: system/user/assistant/tool messages with <see cref="TextContent"/>, <see cref="TextReasoningContent"/>
/// (assistant reasoning), <see cref="FunctionCallContent"/> and <see cref="FunctionResultContent"/>; images and videos as
/// <see cref="DataContent"/> (image/*, video/*) or <see cref="UriContent"/> naming a local file are mapped to content parts
/// (other URI schemes throw <see cref="UnsupportedUriSchemeException"/>) and go to the model's vision tower; a model
/// without one refuses them with <see cref="UnsupportedInputException"/> before any work. Other contents throw
/// <see cref="NotSupportedException"/>. <see cref="ChatOptions"/>: Temperature, TopP, TopK, MaxOutputTokens, Seed,
/// StopSequences, FrequencyPenalty, PresencePenalty, Instructions (joined to the system message), Tools (function
/// declarations; ToolMode None drops them), Reasoning (Effort None disables thinking on hybrid models), and the
/// additional properties <c>enable_thinking</c>, <c>min_p</c>, <c>repetition_penalty</c>, <c>logprobs</c> (bool),
/// <c>top_logprobs</c> (0..20, turns <c>logprobs</c> on) and <c>prompt_logprobs</c> (bool).
/// </para>
/// <para>
/// Responses (the last update when streaming) carry <see cref="UsageDetails"/> with the cached prompt tokens, and in
/// <c>AdditionalProperties</c> of the response and of its message (of the last update when streaming, which
/// <c>ToChatResponse</c> moves to the message): <c>time_to_first_token_ms</c>, <c>decode_tokens_per_s</c> and
/// <c>prefill_tokens_per_s</c> (doubles), and when asked for <c>logprobs</c> (one <see cref="TokenLogprob"/> per
/// generated token, the end-of-turn token included) and <c>prompt_logprobs</c> (per prompt token processed).
/// </para>
/// <para>
/// Cancellation throws <see cref="OperationCanceledException"/> (a <see cref="GenerationCanceledException"/>).
/// Concurrent requests are allowed: one reuses the idle session, the others get sessions of their own, and the
/// engine interleaves their steps.
/// </para>
/// </remarks>
public sealed class Qwen3ChatClient : IChatClient
{
    private readonly Qwen3Model _model;
    private readonly Qwen3ChatClientOptions _options;
    private readonly ChatClientMetadata _metadata;
    private Qwen3Session? _idle;
    private int _disposed;

    /// <exception cref="FileNotFoundException">The model has no tokenizer.json.</exception>
    public Qwen3ChatClient(Qwen3Model model, Qwen3ChatClientOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(model);
        model.ThrowIfDisposed();
        _ = model.Tokenizer; // a chat client without a tokenizer could never answer; say so now
        _model = model;
        _options = options ?? new Qwen3ChatClientOptions();
        string modelId = _options.ModelId ?? Path.GetFileName(model.Directory.TrimEnd(Path.DirectorySeparatorChar, Path.AltDirectorySeparatorChar));
        _metadata = new ChatClientMetadata("qwen3native", null, modelId);
    }

    public Qwen3Model Model => _model;

    public ChatClientMetadata Metadata => _metadata;

    public async Task<ChatResponse> GetResponseAsync(IEnumerable<AIChatMessage> messages, ChatOptions? options = null,
        CancellationToken cancellationToken = default)
    {
        var request = Prepare(messages, options);
        var session = RentSession();
        try
        {
            var result = await session.CollectAsync(request.Conversation, replaceHistory: true, request.Tools, request.EnableThinking, request.Sampling,
                cancellationToken).ConfigureAwait(false);
            var message = new AIChatMessage(AIChatRole.Assistant, ToContents(result))
            {
                MessageId = request.MessageId,
                CreatedAt = request.CreatedAt,
                // Also on the message, because that is where ToChatResponse puts a streamed update's properties: the
                // same code then reads them from either kind of response. Two dictionaries: a caller may change one.
                AdditionalProperties = ChatMapping.ToAdditionalProperties(result),
                RawRepresentation = result,
            };
            return new ChatResponse(message)
            {
                ResponseId = request.ResponseId,
                ModelId = _metadata.DefaultModelId,
                CreatedAt = request.CreatedAt,
                FinishReason = ChatMapping.ToFinishReason(result),
                Usage = ChatMapping.ToUsage(result.Usage),
                AdditionalProperties = ChatMapping.ToAdditionalProperties(result),
                RawRepresentation = result,
            };
        }
        finally
        {
            ReturnSession(session);
        }
    }

    public async IAsyncEnumerable<ChatResponseUpdate> GetStreamingResponseAsync(IEnumerable<AIChatMessage> messages,
        ChatOptions? options = null, [EnumeratorCancellation] CancellationToken cancellationToken = default)
    {
        var request = Prepare(messages, options);
        var session = RentSession();
        try
        {
            var holder = new StrongBox<ChatResult?>();
            // The template puts "\n\n" between the think block and the answer; the parsed answer drops it, so the
            // stream does too.
            bool answerStarted = false;
            await foreach (var update in session.RunTurnAsync(request.Conversation, replaceHistory: true, request.Tools, request.EnableThinking,
                               request.Sampling, holder, cancellationToken).ConfigureAwait(false))
            {
                AIContent? content = null;
                if (update.Kind == OutputKind.Reasoning && update.Text.Length > 0)
                {
                    content = new TextReasoningContent(update.Text);
                }
                else if (update.Kind == OutputKind.Content && update.Text.Length > 0)
                {
                    string text = answerStarted ? update.Text : update.Text.TrimStart('\n');
                    if (text.Length > 0)
                    {
                        answerStarted = true;
                        content = new TextContent(text);
                    }
                }
                // Tool-call JSON and tags are not shown as text; the parsed calls come in the last update.
                if (content is not null)
                    yield return NewUpdate(request, [content]);
            }

            var result = holder.Value!;
            var last = new List<AIContent>();
            foreach (var call in result.ToolCalls)
                last.Add(new FunctionCallContent(ChatMapping.NewCallId(), call.Name, ChatMapping.ArgumentsFromJson(call.Arguments)));
            last.Add(new UsageContent(ChatMapping.ToUsage(result.Usage)));
            var final = NewUpdate(request, last);
            final.FinishReason = ChatMapping.ToFinishReason(result);
            // The whole list rather than a piece on each text update: tags and tool-call tokens produce no text update,
            // and ToChatResponse keeps the last value of a key, so per-update lists would lose all but one.
            final.AdditionalProperties = ChatMapping.ToAdditionalProperties(result);
            final.RawRepresentation = result;
            yield return final;
        }
        finally
        {
            ReturnSession(session);
        }
    }

    /// <summary>
    /// With no key: this client for <see cref="IChatClient"/> or <see cref="Qwen3ChatClient"/>, its
    /// <see cref="ChatClientMetadata"/>, the <see cref="Qwen3Model"/>, or the model's tokenizer.
    /// </summary>
    public object? GetService(Type serviceType, object? serviceKey = null)
    {
        ArgumentNullException.ThrowIfNull(serviceType);
        if (serviceKey is not null)
            return null;
        if (serviceType == typeof(ChatClientMetadata))
            return _metadata;
        if (serviceType.IsInstanceOfType(this))
            return this;
        if (serviceType.IsInstanceOfType(_model))
            return _model;
        if (_model.HasTokenizer && serviceType.IsInstanceOfType(_model.Tokenizer))
            return _model.Tokenizer;
        return null;
    }

    /// <summary>Frees the idle session; disposes the model too when <see cref="Qwen3ChatClientOptions.OwnsModel"/> is set.</summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
            return;
        Interlocked.Exchange(ref _idle, null)?.Dispose();
        if (_options.OwnsModel)
            _model.Dispose();
    }

    private sealed record Request(List<Q3ChatMessage> Conversation, IReadOnlyList<ToolDefinition>? Tools, bool EnableThinking,
        SamplingOptions Sampling, string ResponseId, string MessageId, DateTimeOffset CreatedAt);

    private Request Prepare(IEnumerable<AIChatMessage> messages, ChatOptions? options)
    {
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
        _model.ThrowIfDisposed();
        var conversation = ChatMapping.ToConversation(messages, options?.Instructions);
        if (conversation.Any(m => m.HasMedia))
        {
            // Checked here, before a session is rented, so the caller learns it without any engine work.
            _model.ThrowIfNoVision();
            if (_model.ChatTemplate.Kind != Qwen3TemplateKind.Qwen3VL)
                throw new NotSupportedException(
                    $"This model's chat template ({_model.ChatTemplate.Kind}) takes text only; images and videos (DataContent, " +
                    "UriContent) need the Qwen3-VL template.");
        }
        var sampling = ChatMapping.ToSampling(options, _options.DefaultSampling ?? _model.GenerationDefaults);
        return new Request(conversation, ChatMapping.ToTools(options), ChatMapping.EnableThinking(options, _options.EnableThinking),
            sampling, "resp_" + Guid.NewGuid().ToString("N"), "msg_" + Guid.NewGuid().ToString("N"), DateTimeOffset.UtcNow);
    }

    private ChatResponseUpdate NewUpdate(Request request, IList<AIContent> contents) => new(AIChatRole.Assistant, contents)
    {
        ResponseId = request.ResponseId,
        MessageId = request.MessageId,
        CreatedAt = request.CreatedAt,
        ModelId = _metadata.DefaultModelId,
    };

    private static List<AIContent> ToContents(ChatResult result)
    {
        var contents = new List<AIContent>();
        if (!string.IsNullOrEmpty(result.Reasoning))
            contents.Add(new TextReasoningContent(result.Reasoning));
        if (result.Text.Length > 0)
            contents.Add(new TextContent(result.Text));
        foreach (var call in result.ToolCalls)
            contents.Add(new FunctionCallContent(ChatMapping.NewCallId(), call.Name, ChatMapping.ArgumentsFromJson(call.Arguments)));
        return contents;
    }

    private Qwen3Session RentSession() => Interlocked.Exchange(ref _idle, null) ?? _model.CreateSession();

    private void ReturnSession(Qwen3Session session)
    {
        // Keep one idle session for the next request; any other is freed with its KV blocks.
        if (Volatile.Read(ref _disposed) != 0 || Interlocked.CompareExchange(ref _idle, session, null) is not null)
            session.Dispose();
        else if (Volatile.Read(ref _disposed) != 0)
            Interlocked.Exchange(ref _idle, null)?.Dispose(); // Dispose ran between the check and the exchange
    }
}
