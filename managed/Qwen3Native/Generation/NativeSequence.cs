using Qwen3Native.Interop;

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

    public void SetSampling(SamplingOptions options, ulong seed)
    {
        // Not q3n_sampling_params_init: it writes the library's sizeof, which a newer library may have grown past this
        // struct. The library reads struct_size bytes and defaults the rest.
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

    /// <summary>Samples the next token from the last step's logits and queues it.</summary>
    public int Sample()
    {
        using var seq = new HandleLease(_handle);
        int token;
        NativeCall.Check(NativeMethods.q3n_sequence_sample(seq.Value, &token), "Sampling");
        return token;
    }

    /// <summary>Frees the sequence and its KV blocks at once.</summary>
    public void Dispose() => _handle.Dispose();
}
