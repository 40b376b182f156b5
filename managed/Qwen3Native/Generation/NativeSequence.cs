using Qwen3Native.Chat;
using Qwen3Native.Interop;
using Qwen3Native.Tokenization;
using Qwen3Native.Vision;

namespace Qwen3Native.Generation;

/// <summary>
/// One native sequence (token stream plus its KV blocks) with checked calls. Not thread-safe: its owner runs one
/// operation at a time (the library serialises calls per model anyway).
/// </summary>
internal sealed unsafe class NativeSequence : IDisposable
{
    private readonly SafeSequenceHandle _handle;

    private NativeSequence(SafeSequenceHandle handle) => _handle = handle;

    public static NativeSequence Create(SafeModelHandle model)
    {
        var status = SafeSequenceHandle.Create(model, out var handle);
        if (status != q3n_status.Q3N_OK)
        {
            var error = NativeCall.ToException(status, "Creating a sequence");
            handle.Dispose();
            throw error;
        }
        return new NativeSequence(handle);
    }

    public bool IsClosed => _handle.IsClosed;

    public void Append(ReadOnlySpan<int> tokens)
    {
        if (tokens.IsEmpty) return;
        using var seq = new HandleLease(_handle);
        q3n_status status;
        fixed (int* p = tokens)
            status = NativeMethods.q3n_sequence_append(seq.Value, p, (nuint)tokens.Length);
        NativeCall.Check(status, "Appending tokens to the sequence");
    }

    /// <summary>
    /// Queues one image or video item (<c>q3n_sequence_append_vision</c>): the engine appends its placeholder tokens and
    /// runs the vision tower on <paramref name="pixelValues"/> in the step that reaches them. The values are copied.
    /// </summary>
    /// <exception cref="UnsupportedInputException">The model has no vision tower.</exception>
    public void AppendVision(VisionKind kind, GridThw grid, ReadOnlySpan<float> pixelValues)
    {
        if (grid.T <= 0 || grid.H <= 0 || grid.W <= 0)
            throw new ArgumentOutOfRangeException(nameof(grid), grid, "Every side of the grid must be positive.");
        using var seq = new HandleLease(_handle);
        q3n_status status;
        fixed (float* p = pixelValues)
            status = NativeMethods.q3n_sequence_append_vision(seq.Value, (q3n_vision_kind)kind, (uint)grid.T, (uint)grid.H,
                (uint)grid.W, p, (nuint)pixelValues.Length);
        NativeCall.Check(status, kind == VisionKind.Image ? "Appending an image to the sequence" : "Appending a video to the sequence");
    }

    /// <summary>Queues a prepared prompt's pieces in order: token runs as tokens, vision items with their pixels.</summary>
    public void Append(IEnumerable<PromptSegment> segments)
    {
        foreach (var segment in segments)
        {
            switch (segment)
            {
                case TokenSegment t:
                    Append(t.TokenIds is int[] ids ? ids : t.TokenIds.ToArray());
                    break;
                case VisionSegment v:
                    AppendVision(v.Kind, v.Grid, v.PixelValues.Span);
                    break;
                default:
                    throw new ArgumentException($"Unknown prompt segment {segment?.GetType().Name ?? "null"}.", nameof(segments));
            }
        }
    }

    /// <summary>
    /// The rotary positions of every token (processed and queued) as three rows of <see cref="Length"/> values:
    /// temporal, height, width (transformers' <c>position_ids[3][n]</c>). A text-only model's rows are all 0, 1, 2, ...
    /// </summary>
    public int[] GetRopePositions()
    {
        using var seq = new HandleLease(_handle);
        nuint count;
        q3n_status status = NativeMethods.q3n_sequence_get_rope_positions(seq.Value, null, 0, &count);
        if (status != q3n_status.Q3N_ERR_BUFFER_TOO_SMALL)
            NativeCall.Check(status, "Reading the rotary positions");
        var positions = new int[checked((int)count)];
        if (positions.Length == 0)
            return positions;
        fixed (int* p = positions)
            NativeCall.Check(NativeMethods.q3n_sequence_get_rope_positions(seq.Value, p, count, &count), "Reading the rotary positions");
        return positions;
    }

    public void Truncate(int length)
    {
        using var seq = new HandleLease(_handle);
        NativeCall.Check(NativeMethods.q3n_sequence_truncate(seq.Value, (nuint)length), "Truncating the sequence");
    }

    /// <summary>Tokens in the sequence, processed and queued.</summary>
    public int Length
    {
        get
        {
            using var seq = new HandleLease(_handle);
            nuint n;
            NativeCall.Check(NativeMethods.q3n_sequence_length(seq.Value, &n), "Reading the sequence length");
            return checked((int)n);
        }
    }

    /// <summary>Tokens whose keys and values are in the cache.</summary>
    public int CachedLength
    {
        get
        {
            using var seq = new HandleLease(_handle);
            nuint n;
            NativeCall.Check(NativeMethods.q3n_sequence_cached_length(seq.Value, &n), "Reading the cached length");
            return checked((int)n);
        }
    }

    public int[] GetTokens()
    {
        using var seq = new HandleLease(_handle);
        // Ask for the count first; the length cannot change in between because this object is used by one caller at a time.
        nuint count;
        NativeCall.Check(NativeMethods.q3n_sequence_length(seq.Value, &count), "Reading the sequence length");
        var tokens = new int[checked((int)count)];
        nuint written;
        fixed (int* p = tokens)
            NativeCall.Check(NativeMethods.q3n_sequence_get_tokens(seq.Value, p, count, &written), "Reading the sequence's tokens");
        return tokens;
    }

    /// <param name="vocabLimit">Ids at or past this are never sampled (the checkpoint's padding rows past the
    /// tokenizer); 0 excludes none.</param>
    public void SetSampling(SamplingOptions options, ulong seed, int vocabLimit = 0)
    {
        // Filled here, with struct_size = this assembly's size: the library reads that many bytes and defaults the rest.
        q3n_sampling_params p = default;
        p.struct_size = (uint)sizeof(q3n_sampling_params);
        p.temperature = options.Temperature;
        p.top_k = options.TopK;
        p.top_p = options.TopP;
        p.min_p = options.MinP;
        p.repetition_penalty = options.RepetitionPenalty;
        p.presence_penalty = options.PresencePenalty;
        p.frequency_penalty = options.FrequencyPenalty;
        p.seed = seed;
        p.logprobs = options.Logprobs ? 1u : 0u;
        p.top_logprobs = (uint)options.TopLogprobs;
        p.prompt_logprobs = options.PromptLogprobs ? 1u : 0u;
        p.vocab_limit = (uint)Math.Max(0, vocabLimit);
        using var seq = new HandleLease(_handle);
        NativeCall.Check(NativeMethods.q3n_sequence_set_sampling(seq.Value, &p), "Setting the sampling parameters");
    }

    /// <summary>One forward pass over the queued tokens, leaving the logits of the last position.</summary>
    public void Step()
    {
        using var seq = new HandleLease(_handle);
        // The sequence holds a reference on its model's handle, so the model pointer stays valid while this lease lives;
        // leasing the model too makes a step after the model's Dispose fail instead of running on a closed model.
        using var model = new HandleLease(_handle.Model ?? throw new ObjectDisposedException(nameof(Qwen3Model)));
        nint raw = seq.Value;
        NativeCall.Check(NativeMethods.q3n_model_step(model.Value, &raw, 1, 0), "Running the model");
    }

    /// <summary>
    /// One forward pass over at most <paramref name="maxTokens"/> of the queued tokens (a prefill chunk); the rest stay
    /// queued. Its logits cannot be sampled while tokens remain queued.
    /// </summary>
    public void StepLimited(int maxTokens)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(maxTokens, 1);
        using var seq = new HandleLease(_handle);
        using var model = new HandleLease(_handle.Model ?? throw new ObjectDisposedException(nameof(Qwen3Model)));
        nint raw = seq.Value;
        NativeCall.Check(NativeMethods.q3n_model_step_limited(model.Value, &raw, 1, 0, (nuint)maxTokens), "Running the model");
    }

    /// <summary>Samples the next token from the last step's logits and queues it.</summary>
    public int Sample()
    {
        using var seq = new HandleLease(_handle);
        int token;
        NativeCall.Check(NativeMethods.q3n_sequence_sample(seq.Value, &token), "Sampling");
        return token;
    }

    /// <summary>The last step's logits at the last position (vocab_size floats).</summary>
    public float[] GetLogits(int vocabSize)
    {
        using var seq = new HandleLease(_handle);
        var logits = new float[vocabSize];
        nuint written;
        fixed (float* p = logits)
            NativeCall.Check(NativeMethods.q3n_sequence_get_logits(seq.Value, p, (nuint)logits.Length, &written), "Reading the logits");
        return logits;
    }

    /// <summary>The last sampled token's log-probability; needs <see cref="SamplingOptions.Logprobs"/>.</summary>
    public TokenLogprob GetTokenLogprob(Qwen3Tokenizer? tokenizer)
    {
        using var seq = new HandleLease(_handle);
        q3n_token_logprob lp;
        NativeCall.Check(NativeMethods.q3n_sequence_get_token_logprob(seq.Value, &lp), "Reading the token's log-probability");
        return ToManaged(in lp, tokenizer);
    }

    /// <summary>Log-probabilities of the prompt tokens processed since the request began; needs <see cref="SamplingOptions.PromptLogprobs"/>.</summary>
    public TokenLogprob[] GetPromptLogprobs(Qwen3Tokenizer? tokenizer)
    {
        using var seq = new HandleLease(_handle);
        // The count first, then the entries: nothing steps this sequence in between (one caller at a time).
        nuint count;
        q3n_status status = NativeMethods.q3n_sequence_get_prompt_logprobs(seq.Value, null, 0, &count);
        if (status != q3n_status.Q3N_ERR_BUFFER_TOO_SMALL)
            NativeCall.Check(status, "Reading the prompt log-probabilities");
        if (count == 0)
            return Array.Empty<TokenLogprob>();
        var raw = new q3n_token_logprob[checked((int)count)];
        fixed (q3n_token_logprob* p = raw)
            NativeCall.Check(NativeMethods.q3n_sequence_get_prompt_logprobs(seq.Value, p, count, &count),
                "Reading the prompt log-probabilities");
        var result = new TokenLogprob[raw.Length];
        for (int i = 0; i < raw.Length; i++)
            result[i] = ToManaged(in raw[i], tokenizer);
        return result;
    }

    /// <summary>The engine's figures for the current request (since the last <see cref="SetSampling"/>).</summary>
    public GenerationStats GetStats()
    {
        q3n_sequence_stats st = default;
        st.struct_size = (uint)sizeof(q3n_sequence_stats);
        using (var seq = new HandleLease(_handle))
            NativeCall.Check(NativeMethods.q3n_sequence_get_stats(seq.Value, &st), "Reading the sequence statistics");
        return new GenerationStats
        {
            // The engine counts only the prompt tokens it processed; the managed figures count the whole prompt.
            PromptTokens = checked((int)(st.prompt_tokens + st.cached_tokens)),
            CachedPromptTokens = checked((int)st.cached_tokens),
            GeneratedTokens = checked((int)st.generated_tokens),
            TimeToFirstToken = TimeSpan.FromMilliseconds(st.time_to_first_token_ms),
            PrefillTime = TimeSpan.FromMilliseconds(st.prefill_ms),
            DecodeTokensPerSecond = st.decode_tokens_per_s,
        };
    }

    private static TokenLogprob ToManaged(in q3n_token_logprob lp, Qwen3Tokenizer? tokenizer)
    {
        int n = (int)Math.Min(lp.num_top, (uint)NativeMethods.Q3N_MAX_TOP_LOGPROBS);
        var top = new TopLogprob[n];
        for (int i = 0; i < n; i++)
            top[i] = new TopLogprob(lp.top_tokens[i], TokenText(lp.top_tokens[i], tokenizer), lp.top_logprobs[i]);
        return new TokenLogprob(lp.token, TokenText(lp.token, tokenizer), lp.logprob, top);
    }

    // The model's vocabulary is padded past the tokenizer's (151,936 against 151,669 for Qwen3), and an alternative may
    // well be one of the padding ids: those have no text.
    private static string TokenText(int id, Qwen3Tokenizer? tokenizer) =>
        tokenizer?.IdToToken(id) is not null ? tokenizer.Decode(id) : string.Empty;

    /// <summary>Frees the sequence and its KV blocks at once.</summary>
    public void Dispose() => _handle.Dispose();
}
