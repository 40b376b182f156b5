using System.Collections.ObjectModel;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Security.Cryptography;
using Qwen3Native.Chat;
using Qwen3Native.Generation;
using Qwen3Native.Tokenization;
using Qwen3Native.Vision;

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
    // The images and video slices in the live sequence, in order; read and replaced only by the turn that owns the session.
    private VisionKey[] _sequenceVision = [];
    private MultimodalPromptBuilder? _builder;
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
        ThrowIfMediaUnsupported([message]);
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
        // Before the turn owns the session: a refusal here leaves the conversation and the cached sequence as they were.
        ThrowIfMediaUnsupported(messages);
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
            PreparedTurn turn;
            try
            {
                // Rendering and encoding take milliseconds for a long conversation, and the native calls that cut the
                // sequence back wait for the model's lock while another session steps: none of it on the caller's thread.
                turn = await Task.Run(() => PrepareTurn(conversation, tools, templateOptions, sampling, cancellationToken), cancellationToken)
                    .ConfigureAwait(false);
            }
            catch (OperationCanceledException e) when (cancellationToken.IsCancellationRequested)
            {
                throw GenerationLoop.CanceledBeforeStart(cancellationToken, e);
            }
            var kinds = new OutputKindTracker(_tokenizer, opensThinking);
            var loop = turn.Segments is null
                ? new GenerationLoop(_model, turn.Sequence, sampling, turn.Kept, turn.Cached, turn.Tokens[turn.Kept..], _tokenizer, kinds)
                : new GenerationLoop(_model, turn.Sequence, sampling, turn.Kept, turn.Cached, turn.Segments, _tokenizer, kinds);
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

    /// <summary>What a turn starts from: the sequence cut back to <see cref="Kept"/> prompt tokens, and the rest of the
    /// prompt, as token ids (<see cref="Tokens"/> from <see cref="Kept"/> on) or, with images or videos, as
    /// <see cref="Segments"/>.</summary>
    private sealed record PreparedTurn(NativeSequence Sequence, int[] Tokens, IReadOnlyList<PromptSegment>? Segments, int Kept, int Cached);

    private PreparedTurn PrepareTurn(List<ChatMessage> conversation, IReadOnlyList<ToolDefinition>? tools,
        ChatTemplateOptions templateOptions, SamplingOptions sampling, CancellationToken cancellationToken)
    {
        // Only the Qwen3-VL template renders media; the others refuse them in Render, as before.
        var rendered = ChatTemplate.Kind == Qwen3TemplateKind.Qwen3VL && conversation.Any(m => m.HasMedia)
            ? ChatTemplate.RenderPrompt(conversation, tools, templateOptions)
            : null;
        if (rendered is { Media.Count: > 0 })
            return PrepareMultimodalTurn(rendered, sampling, cancellationToken);

        int[] prompt = _tokenizer.Encode(rendered?.Text ?? ChatTemplate.Render(conversation, tools, templateOptions));
        _model.CheckFitsContext(prompt.Length);
        var sequence = LiveSequence();
        var (kept, cached) = ReusablePrefix(sequence, prompt);
        // A text prompt has no pad tokens, so the kept prefix ends before the first image or video the sequence had.
        _sequenceVision = [];
        sequence.SetSampling(sampling, Qwen3Model.ResolveSeed(sampling), _model.Tokenizer.VocabSize);
        return new PreparedTurn(sequence, prompt, null, kept, cached);
    }

    private PreparedTurn PrepareMultimodalTurn(ChatPrompt rendered, SamplingOptions sampling, CancellationToken cancellationToken)
    {
        // Images are decoded and videos sampled and preprocessed here, on every turn: the pixels key the cache reuse.
        var prompt = Builder().Build(rendered, cancellationToken);
        _model.CheckFitsContext(prompt.TokenCount);
        var items = VisionKey.Of(prompt);
        var sequence = LiveSequence();
        var (kept, cached) = ReusableMultimodalPrefix(sequence, prompt.ToExpandedTokenIds(), items, _sequenceVision);
        _sequenceVision = items;
        sequence.SetSampling(sampling, Qwen3Model.ResolveSeed(sampling), _model.Tokenizer.VocabSize);
        return new PreparedTurn(sequence, [], SegmentsFrom(prompt.Segments, kept), kept, cached);
    }

    private NativeSequence LiveSequence()
    {
        ThrowIfDisposed();
        _model.ThrowIfDisposed();
        var sequence = Volatile.Read(ref _sequence);
        if (sequence is null)
        {
            sequence = NativeSequence.Create(_model.Handle);
            Volatile.Write(ref _sequence, sequence);
            _sequenceVision = [];
        }
        return sequence;
    }

    private MultimodalPromptBuilder Builder()
    {
        if (_builder is not null)
            return _builder;
        var builder = new MultimodalPromptBuilder(_tokenizer, _model.ImageProcessorOptions, _model.VideoProcessorOptions);
        var info = _model.Info;
        // The engine writes its own pad ids (config.json) and the tokenizer gives the markers around them; a checkpoint
        // whose two disagree would be read as other tokens, silently.
        if (info.ImageTokenId != builder.ImagePadTokenId || info.VideoTokenId != builder.VideoPadTokenId
            || info.VisionStartTokenId != builder.VisionStartTokenId || info.VisionEndTokenId != builder.VisionEndTokenId)
            throw new InvalidOperationException(
                $"The tokenizer's vision tokens (image {builder.ImagePadTokenId}, video {builder.VideoPadTokenId}, start " +
                $"{builder.VisionStartTokenId}, end {builder.VisionEndTokenId}) differ from config.json's (image {info.ImageTokenId}, " +
                $"video {info.VideoTokenId}, start {info.VisionStartTokenId}, end {info.VisionEndTokenId}); the checkpoint is inconsistent.");
        return _builder = builder;
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

    /// <summary>
    /// <see cref="ReusablePrefix"/> for a prompt with images and videos. Equal tokens are not enough there: two different
    /// images of the same grid are the same run of pad tokens. So each image or video slice inside the common prefix must
    /// also be the one the sequence holds at that position, compared by kind, grid and a SHA-256 of its pixel values
    /// (a hash rather than the pixels, which would keep every image of the conversation in memory); the prefix ends at
    /// the first that is not. The pixels are compared, not the <see cref="ImagePart"/> objects, because a file may change
    /// between turns and the chat client maps every request to new parts.
    /// </summary>
    private static (int Kept, int Cached) ReusableMultimodalPrefix(NativeSequence sequence, int[] prompt, VisionKey[] items,
        VisionKey[] held)
    {
        int[] tokens = sequence.GetTokens();
        int common = tokens.AsSpan().CommonPrefixLength(prompt);
        for (int i = 0; i < items.Length && items[i].Start < common; i++)
        {
            if (i >= held.Length || !items[i].Equals(held[i]))
            {
                common = items[i].Start;
                break;
            }
        }
        if (common == prompt.Length)
            common--;
        if (common < tokens.Length)
            sequence.Truncate(common);
        return (common, Math.Min(common, sequence.CachedLength));
    }

    /// <summary>The segments from sequence position <paramref name="start"/> on (never inside a vision item).</summary>
    private static List<PromptSegment> SegmentsFrom(IReadOnlyList<PromptSegment> segments, int start)
    {
        var rest = new List<PromptSegment>();
        int at = 0;
        foreach (var segment in segments)
        {
            int end = at + segment.TokenCount;
            if (end > start)
            {
                if (at >= start)
                    rest.Add(segment);
                else if (segment is TokenSegment t)
                    rest.Add(new TokenSegment(t.TokenIds.Skip(start - at).ToArray()));
                else
                    throw new InvalidOperationException("The reused prefix ends inside an image or video.");
            }
            at = end;
        }
        return rest;
    }

    /// <summary>An image or video slice at its sequence position, identified by its pixels.</summary>
    private readonly record struct VisionKey(int Start, VisionKind Kind, GridThw Grid, UInt128 HashLow, UInt128 HashHigh)
    {
        public static VisionKey[] Of(MultimodalPrompt prompt)
        {
            var keys = new List<VisionKey>();
            Span<byte> hash = stackalloc byte[SHA256.HashSizeInBytes];
            int at = 0;
            foreach (var segment in prompt.Segments)
            {
                if (segment is VisionSegment v)
                {
                    SHA256.HashData(MemoryMarshal.AsBytes(v.PixelValues.Span), hash);
                    var words = MemoryMarshal.Cast<byte, UInt128>(hash);
                    keys.Add(new VisionKey(at, v.Kind, v.Grid, words[0], words[1]));
                }
                at += segment.TokenCount;
            }
            return keys.ToArray();
        }
    }

    private void ThrowIfMediaUnsupported(IEnumerable<ChatMessage> messages)
    {
        if (!_model.Info.HasVision && messages.Any(m => m.HasMedia))
            _model.ThrowIfNoVision();
    }

    private ChatMessage[] CheckNewMessages(IEnumerable<ChatMessage> newMessages)
    {
        ArgumentNullException.ThrowIfNull(newMessages);
        ThrowIfDisposed();
        var added = newMessages.ToArray();
        foreach (var m in added)
            if (m is null)
                throw new ArgumentException("A message is null.", nameof(newMessages));
        ThrowIfMediaUnsupported(added);
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
