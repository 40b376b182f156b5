using System.Runtime.CompilerServices;
using System.Text;
using Qwen3Native.Chat;
using Qwen3Native.Tokenization;

namespace Qwen3Native.Generation;

/// <summary>
/// Drives one request on a native sequence: prefill of the new prompt tokens, then one step and one sample per token,
/// turning tokens into text updates and deciding when to stop. Native work runs on the thread pool, one step at a
/// time, and the cancellation token is checked between steps; a step already running is short and is awaited, so no
/// native work outlives the enumeration.
/// </summary>
internal sealed class GenerationLoop
{
    // Long prompts are prefilled in chunks so that a cancellation is noticed between them.
    private const int PrefillChunk = 512;

    private readonly Qwen3Model _model;
    private readonly NativeSequence _sequence;
    private readonly SamplingOptions _options;
    private readonly Qwen3StreamingDecoder? _decoder;
    private readonly StopStringMatcher _stops;
    private readonly HashSet<int> _stopIds;
    private readonly OutputKindTracker? _kinds;
    private readonly int _contextLength;
    private readonly int[] _pending;
    // A multimodal prompt's rest instead of _pending (which is then empty): token runs and vision items.
    private readonly IReadOnlyList<PromptSegment>? _pendingSegments;
    private readonly int _promptTokens;
    private readonly int _cachedTokens;
    private readonly List<int> _generated = new();
    private readonly StringBuilder _text = new();
    private readonly Qwen3Tokenizer? _tokenizer;
    private readonly List<TokenLogprob>? _logprobs;
    private IReadOnlyList<TokenLogprob>? _promptLogprobs;
    private GenerationStats _stats = GenerationStats.Empty;
    private int _sequenceLength;
    private OutputKind _lastKind;

    /// <param name="model">The model (checked for disposal before each step; supplies eos ids and context length).</param>
    /// <param name="sequence">A sequence holding the prompt's first <paramref name="keptTokens"/> tokens.</param>
    /// <param name="options">Already set on the sequence; read here for the stop rules.</param>
    /// <param name="keptTokens">Prompt tokens already in the sequence (the last of them may be queued, not yet processed).</param>
    /// <param name="cachedTokens">How many of those are in the KV cache (reported as reused).</param>
    /// <param name="pending">The rest of the prompt, appended and processed by the loop.</param>
    /// <param name="tokenizer">Decodes text; null for a model without one (no text, no stop strings).</param>
    /// <param name="kinds">Classifies chat output; null for raw generation (all text is content).</param>
    public GenerationLoop(Qwen3Model model, NativeSequence sequence, SamplingOptions options, int keptTokens,
        int cachedTokens, int[] pending, Qwen3Tokenizer? tokenizer, OutputKindTracker? kinds)
        : this(model, sequence, options, keptTokens, cachedTokens, pending, null, tokenizer, kinds)
    {
    }

    /// <summary>As the token form, with the rest of the prompt as token runs and vision items in sequence order.</summary>
    public GenerationLoop(Qwen3Model model, NativeSequence sequence, SamplingOptions options, int keptTokens,
        int cachedTokens, IReadOnlyList<PromptSegment> pending, Qwen3Tokenizer? tokenizer, OutputKindTracker? kinds)
        : this(model, sequence, options, keptTokens, cachedTokens, Array.Empty<int>(), pending, tokenizer, kinds)
    {
    }

    private GenerationLoop(Qwen3Model model, NativeSequence sequence, SamplingOptions options, int keptTokens,
        int cachedTokens, int[] pending, IReadOnlyList<PromptSegment>? pendingSegments, Qwen3Tokenizer? tokenizer,
        OutputKindTracker? kinds)
    {
        if (options.StopStrings.Count > 0 && tokenizer is null)
            throw new InvalidOperationException("Stop strings need the model's tokenizer, and this model directory has no tokenizer.json.");
        _model = model;
        _sequence = sequence;
        _options = options;
        _tokenizer = tokenizer;
        _decoder = tokenizer?.CreateStreamingDecoder();
        _logprobs = options.Logprobs ? new List<TokenLogprob>() : null;
        _stops = new StopStringMatcher(options.StopStrings);
        _stopIds = new HashSet<int>(options.StopTokenIds);
        // GenerationDefaults lists the eos ids among its stop ids, so IgnoreEos has to take them out again there too.
        if (options.IgnoreEos)
            _stopIds.ExceptWith(model.Info.EosTokenIds);
        else
            _stopIds.UnionWith(model.Info.EosTokenIds);
        _kinds = kinds;
        _lastKind = kinds?.Current ?? OutputKind.Content;
        _contextLength = model.Info.ContextLength;
        _pending = pending;
        _pendingSegments = pendingSegments;
        int pendingCount = pendingSegments?.Sum(s => s.TokenCount) ?? pending.Length;
        _cachedTokens = cachedTokens;
        _promptTokens = keptTokens + pendingCount;
        _sequenceLength = keptTokens;
        if (pendingCount == 0)
            throw new ArgumentException("At least one prompt token must be left to process.", nameof(pending));
    }

    public IReadOnlyList<int> GeneratedTokens => _generated;

    /// <summary>Every text released so far (the concatenation of the updates).</summary>
    public string Text => _text.ToString();

    public FinishReason? FinishReason { get; private set; }

    public GenerationUsage Usage => new(_promptTokens, _cachedTokens, _generated.Count);

    /// <summary>The engine's figures as of the last sampled token.</summary>
    public GenerationStats Stats => _stats;

    /// <summary>For a cancellation that came before the first step: nothing was generated.</summary>
    public static GenerationCanceledException CanceledBeforeStart(CancellationToken cancellationToken, Exception? inner = null) =>
        new(new GenerationResult(Array.Empty<int>(), string.Empty, Generation.FinishReason.Cancelled, new GenerationUsage(0, 0, 0)),
            cancellationToken, inner);

    public GenerationResult ToResult() =>
        new(_generated.ToArray(), _text.ToString(), FinishReason ?? Generation.FinishReason.Cancelled, Usage, _stats,
            _logprobs?.ToArray(), _options.PromptLogprobs ? _promptLogprobs ?? Array.Empty<TokenLogprob>() : null);

    public async IAsyncEnumerable<GenerationUpdate> RunAsync([EnumeratorCancellation] CancellationToken cancellationToken)
    {
        var updates = new List<GenerationUpdate>(2);
        if (_pendingSegments is not null)
            await PrefillSegmentsAsync(cancellationToken).ConfigureAwait(false);
        int offset = 0;
        while (_pending.Length - offset > PrefillChunk)
        {
            int start = offset;
            ThrowIfStopped(cancellationToken);
            await RunNativeAsync(() =>
            {
                _sequence.Append(_pending.AsSpan(start, PrefillChunk));
                _sequence.Step();
                return 0;
            }, cancellationToken).ConfigureAwait(false);
            offset += PrefillChunk;
            _sequenceLength += PrefillChunk;
        }

        // A multimodal prompt is all queued by now: the first step below processes what the prefill left.
        int[]? lastChunk = _pendingSegments is null ? _pending[offset..] : null;
        while (FinishReason is null)
        {
            ThrowIfStopped(cancellationToken);
            int[]? append = lastChunk;
            lastChunk = null;
            bool wantPromptLogprobs = _options.PromptLogprobs && _promptLogprobs is null;
            var sampled = await RunNativeAsync(() =>
            {
                if (append is not null)
                    _sequence.Append(append);
                _sequence.Step();
                int token = _sequence.Sample();
                // Read here, on the pool thread and with the step just done, rather than in extra round trips: each native
                // call takes the model's lock, which another session's step may hold for a while.
                var logprob = _options.Logprobs ? _sequence.GetTokenLogprob(_tokenizer) : null;
                // The prompt's log-probabilities are complete once its last position has been processed, which the
                // first sample needs; the decode steps after it add none.
                var promptLogprobs = wantPromptLogprobs ? _sequence.GetPromptLogprobs(_tokenizer) : null;
                return new Sampled(token, logprob, promptLogprobs, _sequence.GetStats());
            }, cancellationToken).ConfigureAwait(false);
            if (append is not null)
                _sequenceLength += append.Length;
            _stats = sampled.Stats;
            if (sampled.PromptLogprobs is not null)
                _promptLogprobs = sampled.PromptLogprobs;

            updates.Clear();
            Accept(sampled.Token, updates);
            if (sampled.Logprob is not null)
            {
                _logprobs!.Add(sampled.Logprob);
                updates[^1] = updates[^1].WithLogprob(sampled.Logprob);
            }
            foreach (var update in updates)
                yield return update;
        }
    }

    /// <summary>
    /// Queues the whole multimodal prompt, then processes all but its last chunk with limited steps. Unlike token runs,
    /// a vision item cannot be appended in pieces, but the engine can cut one between steps (it keeps the tower's output
    /// until the item's last placeholder is processed), so chunking by positions keeps cancellation responsive.
    /// </summary>
    private async Task PrefillSegmentsAsync(CancellationToken cancellationToken)
    {
        ThrowIfStopped(cancellationToken);
        int queued = await RunNativeAsync(() =>
        {
            _sequence.Append(_pendingSegments!);
            // The previous turn's last sampled token may be queued too.
            return _sequence.Length - _sequence.CachedLength;
        }, cancellationToken).ConfigureAwait(false);
        _sequenceLength = _promptTokens;
        while (queued > PrefillChunk)
        {
            ThrowIfStopped(cancellationToken);
            await RunNativeAsync(() =>
            {
                _sequence.StepLimited(PrefillChunk);
                return 0;
            }, cancellationToken).ConfigureAwait(false);
            queued -= PrefillChunk;
        }
    }

    private void ThrowIfStopped(CancellationToken cancellationToken)
    {
        if (cancellationToken.IsCancellationRequested)
            throw new GenerationCanceledException(ToResult(), cancellationToken);
        _model.ThrowIfDisposed();
        // The sequence closes when its session is disposed in the middle of a turn.
        if (_sequence.IsClosed)
            throw new ObjectDisposedException(nameof(Qwen3Session), "The session was disposed during the generation.");
    }

    private readonly record struct Sampled(int Token, TokenLogprob? Logprob, TokenLogprob[]? PromptLogprobs, GenerationStats Stats);

    private async Task<T> RunNativeAsync<T>(Func<T> work, CancellationToken cancellationToken)
    {
        try
        {
            return await Task.Run(work, cancellationToken).ConfigureAwait(false);
        }
        catch (OperationCanceledException e) when (cancellationToken.IsCancellationRequested)
        {
            throw new GenerationCanceledException(ToResult(), cancellationToken, e);
        }
    }

    private void Accept(int token, List<GenerationUpdate> updates)
    {
        _generated.Add(token);
        _sequenceLength++;

        if (_stopIds.Contains(token))
        {
            // The stop token's own text ("<|im_end|>") is not part of the answer.
            Emit(updates, ReleaseEnd(out _), token, _lastKind, Generation.FinishReason.Stop);
            return;
        }

        OutputKind kind = _kinds?.Classify(token) ?? OutputKind.Content;
        if (kind != _lastKind)
        {
            // Text held back for a stop string (or an unfinished character) belongs to the previous kind; release it
            // under that kind so that a consumer splitting reasoning from answer sees each piece where it belongs.
            // Stop strings are therefore matched within one kind of text.
            string held = ReleaseEnd(out bool matched);
            if (matched)
            {
                Emit(updates, held, -1, _lastKind, Generation.FinishReason.Stop);
                return;
            }
            if (held.Length > 0)
                Emit(updates, held, -1, _lastKind, null);
            _lastKind = kind;
        }

        // The model's vocabulary is padded past the tokenizer's (151,936 rows against 151,669 tokens for Qwen3); a padding
        // id has no text, and decoding drops it as HF does, rather than failing the generation.
        string text = _tokenizer?.IdToToken(token) is null ? string.Empty : _decoder!.Push(token);
        string released = _stops.Push(text, out bool stopped);
        if (stopped)
        {
            Emit(updates, released, token, kind, Generation.FinishReason.Stop);
            return;
        }

        bool atMaxTokens = _options.MaxTokens is int max && _generated.Count >= max;
        // The sampled token is queued in the sequence; the next sample needs one more free position.
        bool atContextEnd = _sequenceLength + 1 > _contextLength;
        if (atMaxTokens || atContextEnd)
        {
            string tail = ReleaseEnd(out bool matched);
            Emit(updates, released + tail, token, kind, matched ? Generation.FinishReason.Stop : Generation.FinishReason.Length);
            return;
        }
        Emit(updates, released, token, kind, null);
    }

    /// <summary>Releases everything held back (an unfinished character, a possible stop-string prefix).</summary>
    private string ReleaseEnd(out bool matched)
    {
        string flushed = _decoder?.Flush() ?? string.Empty;
        string released = _stops.Push(flushed, out matched);
        return matched ? released : released + _stops.Flush();
    }

    private void Emit(List<GenerationUpdate> updates, string text, int token, OutputKind kind, FinishReason? finish)
    {
        _text.Append(text);
        if (finish is not null)
            FinishReason = finish;
        updates.Add(finish is null
            ? new GenerationUpdate(text, token, kind, null, null)
            : new GenerationUpdate(text, token, kind, finish, Usage, _stats,
                _options.PromptLogprobs ? _promptLogprobs ?? Array.Empty<TokenLogprob>() : null));
    }
}
