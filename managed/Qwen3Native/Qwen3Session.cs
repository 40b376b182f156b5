using System.Collections.ObjectModel;
using System.Runtime.CompilerServices;
using Qwen3Native.Chat;
using Qwen3Native.Generation;
using Qwen3Native.Tokenization;

namespace Qwen3Native;

/// <summary>
/// A conversation with a model. It keeps the messages and a live native sequence whose KV cache holds the tokens of
/// the previous turns, so that each turn renders the whole conversation with the chat template, keeps the longest
/// prefix the sequence already has, and processes only the rest.
/// </summary>
/// <remarks>
/// <para>One turn at a time: starting a turn while another is running throws <see cref="InvalidOperationException"/>.</para>
/// <para>
/// A turn that does not run to its end — cancelled (<see cref="GenerationCanceledException"/>, an
/// <see cref="OperationCanceledException"/>), abandoned by the consumer of the stream, or failed — leaves the conversation
/// as it was before the call, and frees the native sequence at once, returning its KV blocks to the model; the next
/// turn creates a new one and processes the whole conversation again.
/// </para>
/// </remarks>
public sealed class Qwen3Session : IDisposable
{
    private readonly Qwen3Model _model;
    private readonly Qwen3Tokenizer _tokenizer;
    // Replaced, never changed in place, so that readers on other threads always see a whole conversation.
    private ChatMessage[] _messages;
    private readonly string? _systemPrompt;
    private NativeSequence? _sequence;
    private IReadOnlyList<ToolDefinition>? _tools;
    private int _busy;
    private int _disposed;

    internal Qwen3Session(Qwen3Model model, SessionOptions options)
    {
        _model = model;
        _tokenizer = model.Tokenizer;
        ChatTemplate = options.ChatTemplate ?? model.ChatTemplate;
        EnableThinking = options.EnableThinking;
        Tools = options.Tools;
        DefaultSampling = options.Sampling;
        _systemPrompt = options.SystemPrompt;
        _messages = InitialMessages();
    }

    public Qwen3Model Model => _model;

    public Qwen3ChatTemplate ChatTemplate { get; }

    /// <summary>The conversation so far; completed turns only.</summary>
    public IReadOnlyList<ChatMessage> Messages => new ReadOnlyCollection<ChatMessage>(Volatile.Read(ref _messages));

    /// <summary>See <see cref="SessionOptions.EnableThinking"/>; takes effect on the next turn.</summary>
    public bool EnableThinking { get; set; }

    /// <summary>See <see cref="SessionOptions.Tools"/>; takes effect on the next turn.</summary>
    public IReadOnlyList<ToolDefinition>? Tools
    {
        get => _tools;
        set => _tools = value?.ToArray();
    }

    /// <summary>Sampling for turns that pass none; null = the model's <see cref="Qwen3Model.GenerationDefaults"/>.</summary>
    public SamplingOptions? DefaultSampling { get; set; }

    /// <summary>Tokens of this session whose keys and values are in the KV cache (0 when no sequence is live).</summary>
    public int CachedTokenCount
    {
        get
        {
            ThrowIfDisposed();
            var sequence = Volatile.Read(ref _sequence);
            return sequence is null || sequence.IsClosed ? 0 : sequence.CachedLength;
        }
    }

    /// <summary>The tokens in the live sequence (processed and queued): the last prompt and its answer. Empty when none is live.</summary>
    public IReadOnlyList<int> GetTokens()
    {
        ThrowIfDisposed();
        var sequence = Volatile.Read(ref _sequence);
        return sequence is null || sequence.IsClosed ? Array.Empty<int>() : sequence.GetTokens();
    }

    /// <summary>Adds a message without generating (tool results, or history from elsewhere); the next turn renders it.</summary>
    public void AddMessage(ChatMessage message)
    {
        ArgumentNullException.ThrowIfNull(message);
        ThrowIfDisposed();
        ThrowIfBusy();
        Volatile.Write(ref _messages, [.. _messages, message]);
    }

    /// <summary>Forgets the conversation except the system prompt. The cached tokens stay, so a shared prefix is reused.</summary>
    public void Reset()
    {
        ThrowIfDisposed();
        ThrowIfBusy();
        Volatile.Write(ref _messages, InitialMessages());
    }

    /// <summary>Adds a user message and streams the assistant's answer.</summary>
    /// <exception cref="GenerationCanceledException">The token was cancelled; the conversation is unchanged.</exception>
    /// <exception cref="ContextOverflowException">The conversation no longer fits the context.</exception>
    public IAsyncEnumerable<GenerationUpdate> ChatStreamAsync(string userMessage, SamplingOptions? sampling = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(userMessage);
        return ChatStreamAsync([ChatMessage.User(userMessage)], sampling, cancellationToken);
    }

    /// <summary>
    /// Adds messages (user messages, tool results) and streams the assistant's answer. <paramref name="newMessages"/> may be
    /// empty when the history already ends with something to answer (tool results added with <see cref="AddMessage"/>).
    /// </summary>
    public IAsyncEnumerable<GenerationUpdate> ChatStreamAsync(IEnumerable<ChatMessage> newMessages, SamplingOptions? sampling = null,
        CancellationToken cancellationToken = default)
    {
        var added = CheckNewMessages(newMessages);
        return RunTurnAsync(added, replaceHistory: false, Tools, EnableThinking, sampling ?? DefaultSampling ?? _model.GenerationDefaults, null,
            cancellationToken);
    }

    /// <summary>Adds a user message and returns the assistant's answer, parsed into text, reasoning and tool calls.</summary>
    /// <exception cref="GenerationCanceledException">The token was cancelled; the conversation is unchanged.</exception>
    public Task<ChatResult> ChatAsync(string userMessage, SamplingOptions? sampling = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(userMessage);
        return ChatAsync([ChatMessage.User(userMessage)], sampling, cancellationToken);
    }

    /// <summary>Adds messages (user messages, tool results; possibly none) and returns the assistant's parsed answer.</summary>
    public Task<ChatResult> ChatAsync(IEnumerable<ChatMessage> newMessages, SamplingOptions? sampling = null,
        CancellationToken cancellationToken = default)
    {
        var added = CheckNewMessages(newMessages);
        return CollectAsync(added, replaceHistory: false, Tools, EnableThinking, sampling ?? DefaultSampling ?? _model.GenerationDefaults,
            cancellationToken);
    }

    /// <summary>Frees the native sequence. The model stays usable by its other sessions.</summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) == 0)
            DropSequence();
    }

    // ---- Turns --------------------------------------------------------------------------------------------------

    /// <summary>Runs a turn and returns its parsed answer (see <see cref="RunTurnAsync"/>).</summary>
    internal async Task<ChatResult> CollectAsync(IReadOnlyList<ChatMessage> messages, bool replaceHistory, IReadOnlyList<ToolDefinition>? tools,
        bool enableThinking, SamplingOptions sampling, CancellationToken cancellationToken)
    {
        var result = new StrongBox<ChatResult?>();
        await foreach (var _ in RunTurnAsync(messages, replaceHistory, tools, enableThinking, sampling, result, cancellationToken).ConfigureAwait(false))
        {
        }
        return result.Value!;
    }

    /// <summary>
    /// Streams a turn over the history plus <paramref name="messages"/>, or over <paramref name="messages"/> alone when
    /// <paramref name="replaceHistory"/> is set (the chat client, whose requests carry whole conversations). The
    /// conversation, with the answer, becomes the history when the turn completes; <paramref name="result"/> receives the
    /// parsed answer then.
    /// </summary>
    internal async IAsyncEnumerable<GenerationUpdate> RunTurnAsync(IReadOnlyList<ChatMessage> messages, bool replaceHistory,
        IReadOnlyList<ToolDefinition>? tools,
        bool enableThinking, SamplingOptions sampling, StrongBox<ChatResult?>? result,
        [EnumeratorCancellation] CancellationToken cancellationToken)
    {
        ThrowIfDisposed();
        _model.ThrowIfDisposed();
        if (Interlocked.Exchange(ref _busy, 1) != 0)
            throw new InvalidOperationException("A turn is already running on this session; wait for it to end before starting another.");
        bool completed = false;
        try
        {
            // The history is read once the turn owns the session, so that messages added before the enumeration count.
            var conversation = replaceHistory ? messages.ToList() : [.. Volatile.Read(ref _messages), .. messages];
            if (conversation.Count == 0)
                throw new ArgumentException("A turn needs at least one message.", nameof(messages));
            var templateOptions = new ChatTemplateOptions { EnableThinking = enableThinking };
            bool opensThinking = ChatTemplate.PromptOpensThinking(templateOptions);
            (NativeSequence Sequence, int[] Prompt, int Kept, int Cached) turn;
            try
            {
                // Rendering and encoding take milliseconds for a long conversation, and the native calls that cut the
                // sequence back wait for the model's lock while another session steps: none of it on the caller's thread.
                turn = await Task.Run(() => PrepareTurn(conversation, tools, templateOptions, sampling), cancellationToken)
                    .ConfigureAwait(false);
            }
            catch (OperationCanceledException e) when (cancellationToken.IsCancellationRequested)
            {
                throw GenerationLoop.CanceledBeforeStart(cancellationToken, e);
            }
            var (sequence, prompt, kept, cached) = turn;

            var loop = new GenerationLoop(_model, sequence, sampling, kept, cached, prompt[kept..], _tokenizer,
                new OutputKindTracker(_tokenizer, opensThinking));
            await foreach (var update in loop.RunAsync(cancellationToken).ConfigureAwait(false))
                yield return update;

            var output = ChatOutputParser.Parse(loop.Text, opensThinking);
            // A tool-call block that did not parse would vanish from the parsed message; keep the text as generated instead.
            var assistant = output.ToolCallErrors.Count > 0 ? ChatMessage.Assistant(loop.Text) : ChatMessage.Assistant(output);
            conversation.Add(assistant);
            Volatile.Write(ref _messages, conversation.ToArray());
            if (result is not null)
                result.Value = new ChatResult(output, assistant, loop.Text, loop.ToResult());
            completed = true;
        }
        finally
        {
            // The sequence's contents no longer match any conversation the session will render: free its KV blocks now.
            if (!completed)
                DropSequence();
            Volatile.Write(ref _busy, 0);
        }
    }

    private (NativeSequence, int[], int, int) PrepareTurn(List<ChatMessage> conversation, IReadOnlyList<ToolDefinition>? tools,
        ChatTemplateOptions templateOptions, SamplingOptions sampling)
    {
        int[] prompt = _tokenizer.Encode(ChatTemplate.Render(conversation, tools, templateOptions));
        _model.CheckFitsContext(prompt.Length);
        ThrowIfDisposed();
        _model.ThrowIfDisposed();
        var sequence = Volatile.Read(ref _sequence);
        if (sequence is null)
        {
            sequence = NativeSequence.Create(_model.Handle);
            Volatile.Write(ref _sequence, sequence);
        }
        var (kept, cached) = ReusablePrefix(sequence, prompt);
        sequence.SetSampling(sampling, Qwen3Model.ResolveSeed(sampling), _model.Tokenizer.VocabSize);
        return (sequence, prompt, kept, cached);
    }

    /// <summary>
    /// Cuts the sequence back to the longest prefix it shares with <paramref name="prompt"/>. Returns that length and how
    /// many of those tokens are in the KV cache (the previous turn's last sampled token is queued, not yet processed).
    /// At least one prompt token is left to process, because sampling needs the logits of the prompt's last position.
    /// </summary>
    private static (int Kept, int Cached) ReusablePrefix(NativeSequence sequence, int[] prompt)
    {
        int[] tokens = sequence.GetTokens();
        int common = tokens.AsSpan().CommonPrefixLength(prompt);
        if (common == prompt.Length)
            common--;
        if (common < tokens.Length)
            sequence.Truncate(common);
        return (common, Math.Min(common, sequence.CachedLength));
    }

    private ChatMessage[] CheckNewMessages(IEnumerable<ChatMessage> newMessages)
    {
        ArgumentNullException.ThrowIfNull(newMessages);
        ThrowIfDisposed();
        var added = newMessages.ToArray();
        foreach (var m in added)
            if (m is null)
                throw new ArgumentException("A message is null.", nameof(newMessages));
        // No new message is fine when the history ends with something to answer (tool results added with AddMessage).
        if (added.Length == 0 && Volatile.Read(ref _messages).Length == 0)
            throw new ArgumentException("A turn needs at least one message.", nameof(newMessages));
        return added;
    }

    private ChatMessage[] InitialMessages() => _systemPrompt is null ? [] : [ChatMessage.System(_systemPrompt)];

    private void DropSequence() => Interlocked.Exchange(ref _sequence, null)?.Dispose();

    private void ThrowIfBusy()
    {
        if (Volatile.Read(ref _busy) != 0)
            throw new InvalidOperationException("A turn is running on this session; the conversation cannot change until it ends.");
    }

    private void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
}
