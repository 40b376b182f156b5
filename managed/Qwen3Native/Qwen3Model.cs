using System.Runtime.CompilerServices;
using System.Runtime.ExceptionServices;
using System.Runtime.InteropServices;
using Qwen3Native.Chat;
using Qwen3Native.Generation;
using Qwen3Native.Interop;
using Qwen3Native.Tokenization;
using Qwen3Native.Vision;

namespace Qwen3Native;

/// <summary>
/// A loaded Qwen3 checkpoint: the native model plus what the directory says about using it (tokenizer, chat template,
/// recommended sampling). Create conversations with <see cref="CreateSession"/>, or generate from token ids with
/// <see cref="GenerateAsync(IReadOnlyList{int}, SamplingOptions, CancellationToken)"/>.
/// </summary>
/// <remarks>
/// Thread-safe: the engine serialises work on one model, so sessions used from several threads take turns step by
/// step. Dispose the model and its sessions in any order; after <see cref="Dispose"/> every member that needs the
/// engine throws <see cref="ObjectDisposedException"/>, in the model and in its sessions.
/// </remarks>
public sealed class Qwen3Model : IDisposable
{
    private readonly SafeModelHandle _handle;
    private readonly Qwen3Tokenizer? _tokenizer;
    private int _disposed;

    private Qwen3Model(string directory, SafeModelHandle handle, ModelInfo info, Qwen3Tokenizer? tokenizer,
        SamplingOptions defaults, Qwen3ChatTemplate template, string? templateNote,
        (Qwen3VLImageProcessorOptions Image, Qwen3VLVideoProcessorOptions Video) processors)
    {
        ImageProcessorOptions = processors.Image;
        VideoProcessorOptions = processors.Video;
        Directory = directory;
        _handle = handle;
        Info = info;
        _tokenizer = tokenizer;
        GenerationDefaults = defaults;
        ChatTemplate = template;
        ChatTemplateNote = templateNote;
    }

    /// <summary>The checkpoint directory (full path).</summary>
    public string Directory { get; }

    public ModelInfo Info { get; }

    /// <summary>True when the directory has a tokenizer.json.</summary>
    public bool HasTokenizer => _tokenizer is not null;

    /// <summary>The tokenizer from the directory's tokenizer.json.</summary>
    /// <exception cref="FileNotFoundException">The directory has no tokenizer.json.</exception>
    public Qwen3Tokenizer Tokenizer => _tokenizer ?? throw new FileNotFoundException(
        $"The model directory '{Directory}' has no tokenizer.json, so text cannot be encoded or decoded " +
        "(chat sessions need it). Copy tokenizer.json from the checkpoint, or generate from token ids with GenerateAsync.",
        Path.Combine(Directory, "tokenizer.json"));

    /// <summary>
    /// The sampling the checkpoint recommends (generation_config.json, read as transformers reads it: greedy unless
    /// do_sample is true), with its eos ids as <see cref="SamplingOptions.StopTokenIds"/>; greedy when there is no such
    /// file. Used when a request passes no options.
    /// </summary>
    public SamplingOptions GenerationDefaults { get; }

    /// <summary>The chat template variant detected from the checkpoint (the Qwen3 hybrid template when unknown or absent).</summary>
    public Qwen3ChatTemplate ChatTemplate { get; }

    /// <summary>Why <see cref="ChatTemplate"/> is a fallback; null when the checkpoint's template was recognised.</summary>
    public string? ChatTemplateNote { get; }

    /// <summary>
    /// How images are resized and normalised for this model: the checkpoint's preprocessor_config.json, or the released
    /// Qwen3-VL values when it has none. Sessions use it; pass it to <see cref="MultimodalPromptBuilder"/> when preparing
    /// prompts yourself.
    /// </summary>
    public Qwen3VLImageProcessorOptions ImageProcessorOptions { get; }

    /// <summary>How videos are sampled and preprocessed: video_preprocessor_config.json, else the released values.</summary>
    public Qwen3VLVideoProcessorOptions VideoProcessorOptions { get; }

    /// <summary>The native library's version, such as "0.1.0+cpu".</summary>
    public static string NativeVersion => NativeUtf8.VersionString();

    internal SafeModelHandle Handle => _handle;

    internal bool IsDisposed => Volatile.Read(ref _disposed) != 0;

    /// <summary>Loads a checkpoint directory (config.json plus model.safetensors or a sharded index) on the calling thread.</summary>
    /// <exception cref="ModelLoadException">Any failure to load, with the engine's status and message.</exception>
    public static Qwen3Model Load(string directory, ModelOptions? options = null) =>
        LoadCore(directory, options ?? new ModelOptions(), null, CancellationToken.None);

    /// <summary>
    /// Loads a checkpoint on the thread pool. <paramref name="progress"/> receives the fraction done in [0, 1] from the
    /// engine; cancelling <paramref name="cancellationToken"/> stops the load at its next progress report.
    /// </summary>
    /// <exception cref="ModelLoadException">Any failure to load.</exception>
    /// <exception cref="OperationCanceledException">The load was cancelled.</exception>
    public static Task<Qwen3Model> LoadAsync(string directory, ModelOptions? options = null, IProgress<float>? progress = null,
        CancellationToken cancellationToken = default)
    {
        ArgumentException.ThrowIfNullOrEmpty(directory);
        options ??= new ModelOptions();
        return Task.Run(() => LoadCore(directory, options, progress, cancellationToken), cancellationToken);
    }

    /// <summary>Starts a conversation. The session keeps its KV cache between turns so that a turn only processes its new tokens.</summary>
    /// <exception cref="FileNotFoundException">The directory has no tokenizer.json.</exception>
    public Qwen3Session CreateSession(SessionOptions? options = null)
    {
        ThrowIfDisposed();
        _ = Tokenizer; // fail here, with the clear message, rather than on the first turn
        return new Qwen3Session(this, options ?? new SessionOptions());
    }

    /// <summary>
    /// Generates from token ids without any chat template, streaming text updates. Each call uses a fresh native
    /// sequence that is freed when the enumeration ends.
    /// </summary>
    /// <exception cref="ContextOverflowException">The prompt leaves no room for a generated token.</exception>
    /// <exception cref="GenerationCanceledException">The token was cancelled (it carries the partial result).</exception>
    public IAsyncEnumerable<GenerationUpdate> GenerateStreamAsync(IReadOnlyList<int> promptIds, SamplingOptions? sampling = null,
        CancellationToken cancellationToken = default)
    {
        ThrowIfDisposed();
        var prompt = ValidatePrompt(promptIds);
        sampling ??= GenerationDefaults;
        return GenerateCoreAsync(TextLoop(prompt, sampling), sampling, null, cancellationToken);
    }

    /// <summary>Generates from token ids without any chat template and returns the whole result.</summary>
    /// <exception cref="ContextOverflowException">The prompt leaves no room for a generated token.</exception>
    /// <exception cref="GenerationCanceledException">The token was cancelled (it carries the partial result).</exception>
    public async Task<GenerationResult> GenerateAsync(IReadOnlyList<int> promptIds, SamplingOptions? sampling = null,
        CancellationToken cancellationToken = default)
    {
        ThrowIfDisposed();
        var prompt = ValidatePrompt(promptIds);
        var holder = new StrongBox<GenerationLoop?>();
        sampling ??= GenerationDefaults;
        await foreach (var _ in GenerateCoreAsync(TextLoop(prompt, sampling), sampling, holder, cancellationToken).ConfigureAwait(false))
        {
        }
        return holder.Value!.ToResult();
    }

    /// <summary>
    /// Generates from a prepared prompt of token runs, images and videos (<see cref="MultimodalPromptBuilder"/>) without any
    /// chat template, streaming text updates. Each call uses a fresh native sequence that is freed when the enumeration ends.
    /// </summary>
    /// <exception cref="UnsupportedInputException">The prompt has images or videos and the model has no vision tower.</exception>
    /// <exception cref="ContextOverflowException">The prompt leaves no room for a generated token.</exception>
    /// <exception cref="GenerationCanceledException">The token was cancelled (it carries the partial result).</exception>
    public IAsyncEnumerable<GenerationUpdate> GenerateStreamAsync(MultimodalPrompt prompt, SamplingOptions? sampling = null,
        CancellationToken cancellationToken = default)
    {
        ThrowIfDisposed();
        ValidatePrompt(prompt);
        sampling ??= GenerationDefaults;
        return GenerateCoreAsync(SegmentLoop(prompt, sampling), sampling, null, cancellationToken);
    }

    /// <summary>Generates from a prepared prompt of token runs, images and videos and returns the whole result.</summary>
    /// <inheritdoc cref="GenerateStreamAsync(MultimodalPrompt, SamplingOptions?, CancellationToken)" path="/exception"/>
    public async Task<GenerationResult> GenerateAsync(MultimodalPrompt prompt, SamplingOptions? sampling = null,
        CancellationToken cancellationToken = default)
    {
        ThrowIfDisposed();
        ValidatePrompt(prompt);
        var holder = new StrongBox<GenerationLoop?>();
        sampling ??= GenerationDefaults;
        await foreach (var _ in GenerateCoreAsync(SegmentLoop(prompt, sampling), sampling, holder, cancellationToken).ConfigureAwait(false))
        {
        }
        return holder.Value!.ToResult();
    }

    private Func<NativeSequence, GenerationLoop> TextLoop(int[] prompt, SamplingOptions sampling) =>
        sequence => new GenerationLoop(this, sequence, sampling, 0, 0, prompt, _tokenizer, null);

    private Func<NativeSequence, GenerationLoop> SegmentLoop(MultimodalPrompt prompt, SamplingOptions sampling) =>
        sequence => new GenerationLoop(this, sequence, sampling, 0, 0, prompt.Segments, _tokenizer, null);

    private async IAsyncEnumerable<GenerationUpdate> GenerateCoreAsync(Func<NativeSequence, GenerationLoop> newLoop, SamplingOptions sampling,
        StrongBox<GenerationLoop?>? holder, [EnumeratorCancellation] CancellationToken cancellationToken)
    {
        ThrowIfDisposed();
        // Creating the sequence and setting its sampler take the model's lock, which another session's step may hold.
        NativeSequence sequence;
        try
        {
            sequence = await Task.Run(() => CreateSequence(sampling), cancellationToken).ConfigureAwait(false);
        }
        catch (OperationCanceledException e) when (cancellationToken.IsCancellationRequested)
        {
            throw GenerationLoop.CanceledBeforeStart(cancellationToken, e);
        }
        using var owned = sequence;
        var loop = newLoop(sequence);
        if (holder is not null)
            holder.Value = loop;
        await foreach (var update in loop.RunAsync(cancellationToken).ConfigureAwait(false))
            yield return update;
    }

    private NativeSequence CreateSequence(SamplingOptions sampling)
    {
        var sequence = NativeSequence.Create(_handle);
        try
        {
            sequence.SetSampling(sampling, ResolveSeed(sampling), _tokenizer?.VocabSize ?? 0);
            return sequence;
        }
        catch
        {
            sequence.Dispose();
            throw;
        }
    }

    private int[] ValidatePrompt(IReadOnlyList<int> promptIds)
    {
        ArgumentNullException.ThrowIfNull(promptIds);
        if (promptIds.Count == 0)
            throw new ArgumentException("The prompt is empty: at least one token id is needed.", nameof(promptIds));
        var prompt = promptIds.ToArray();
        for (int i = 0; i < prompt.Length; i++)
        {
            if ((uint)prompt[i] >= (uint)Info.VocabSize)
                throw new ArgumentOutOfRangeException(nameof(promptIds), prompt[i],
                    $"Token id {prompt[i]} at index {i} is outside the vocabulary [0, {Info.VocabSize}).");
        }
        CheckFitsContext(prompt.Length);
        return prompt;
    }

    private void ValidatePrompt(MultimodalPrompt prompt)
    {
        ArgumentNullException.ThrowIfNull(prompt);
        if (prompt.TokenCount == 0)
            throw new ArgumentException("The prompt is empty: at least one token is needed.", nameof(prompt));
        if (prompt.VisionItems.Any())
            ThrowIfNoVision();
        foreach (var segment in prompt.Segments)
        {
            if (segment is TokenSegment t)
                foreach (int id in t.TokenIds)
                    if ((uint)id >= (uint)Info.VocabSize)
                        throw new ArgumentOutOfRangeException(nameof(prompt), id, $"Token id {id} is outside the vocabulary [0, {Info.VocabSize}).");
        }
        CheckFitsContext(prompt.TokenCount);
    }

    /// <summary>
    /// Refuses images and videos for a model without a vision tower before any work starts, with the exception the engine
    /// would give (<see cref="Qwen3Status.Unsupported"/>) and a message that says what to do.
    /// </summary>
    internal void ThrowIfNoVision()
    {
        if (!Info.HasVision)
            throw new UnsupportedInputException(
                $"This model ({Info.Architecture}) has no vision tower, so it cannot take images or videos; " +
                "use a Qwen3-VL checkpoint (Qwen3VLForConditionalGeneration), or send text only.");
    }

    /// <summary>A prompt must leave room for at least one generated token.</summary>
    internal void CheckFitsContext(int promptTokens)
    {
        if (promptTokens + 1 > Info.ContextLength)
            throw new ContextOverflowException(
                $"The prompt has {promptTokens} tokens, but the model was loaded with a context of {Info.ContextLength} tokens, " +
                "which must hold the prompt and at least one generated token. Shorten the prompt or load with a larger " +
                $"ModelOptions.ContextLength (at most max_position_embeddings = {Info.MaxPositionEmbeddings}).");
    }

    internal static ulong ResolveSeed(SamplingOptions sampling) =>
        sampling.Seed ?? (ulong)Random.Shared.NextInt64(long.MinValue, long.MaxValue);

    internal void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(IsDisposed, this);

    /// <summary>
    /// Releases the model. Sessions still open keep the native memory alive until they are disposed, but refuse further
    /// turns; a step already running finishes first.
    /// </summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) == 0)
            _handle.Dispose();
    }

    // ---- Loading ------------------------------------------------------------------------------------------------

    private static Qwen3Model LoadCore(string directory, ModelOptions options, IProgress<float>? progress, CancellationToken cancellationToken)
    {
        ArgumentException.ThrowIfNullOrEmpty(directory);
        ArgumentNullException.ThrowIfNull(options);
        string full = Path.GetFullPath(directory);
        if (!System.IO.Directory.Exists(full))
        {
            string why = File.Exists(full) ? "is a file, not a directory" : "does not exist";
            throw new ModelLoadException(Qwen3Status.Io, full,
                $"The model directory '{full}' {why}. Pass the folder that holds config.json and the safetensors files.",
                new DirectoryNotFoundException(full));
        }

        // The small JSON files first: a mistake in them should not cost a full weight load.
        var defaults = CheckpointMetadata.ReadGenerationDefaults(full);
        var (template, note) = CheckpointMetadata.ReadChatTemplate(full);
        var processors = CheckpointMetadata.ReadProcessorOptions(full);

        var handle = LoadNative(full, options, progress, cancellationToken);
        try
        {
            var info = ReadInfo(handle);
            Qwen3Tokenizer? tokenizer = null;
            string tokenizerPath = Path.Combine(full, "tokenizer.json");
            if (File.Exists(tokenizerPath))
            {
                try
                {
                    tokenizer = Qwen3Tokenizer.FromFile(tokenizerPath);
                }
                catch (TokenizerFormatException e)
                {
                    throw new ModelLoadException(Qwen3Status.BadConfig, full, $"'{tokenizerPath}' cannot be used: {e.Message}", e);
                }
                catch (IOException e)
                {
                    throw new ModelLoadException(Qwen3Status.Io, full, $"Cannot read '{tokenizerPath}': {e.Message}", e);
                }
            }
            return new Qwen3Model(full, handle, info, tokenizer, defaults, template, note, processors);
        }
        catch
        {
            handle.Dispose();
            throw;
        }
    }

    private static unsafe SafeModelHandle LoadNative(string directory, ModelOptions options, IProgress<float>? progress,
        CancellationToken cancellationToken)
    {
        // Filled here with struct_size = this assembly's size: the library reads that many bytes and
        // defaults the rest, so this assembly works with newer libraries.
        q3n_model_options o = default;
        o.struct_size = (uint)sizeof(q3n_model_options);
        o.device = (q3n_device)options.Device;
        o.device_index = options.DeviceIndex;
        o.kv_cache_dtype = (q3n_dtype)options.KvCacheDtype;
        o.context_length = (uint)options.ContextLength;
        o.kv_cache_tokens = (ulong)options.KvCacheTokens;
        o.kv_block_size = (uint)options.KvBlockSize;
        o.load_format = (q3n_load_format)options.LoadFormat;
        o.dummy_seed = options.DummySeed;
        o.num_threads = (uint)options.Threads;

        var state = progress is null && !cancellationToken.CanBeCanceled ? null : new LoadProgress(progress, cancellationToken);
        GCHandle gc = default;
        try
        {
            if (state is not null)
            {
                gc = GCHandle.Alloc(state);
                o.progress = &OnProgress;
                o.progress_user_data = (void*)GCHandle.ToIntPtr(gc);
            }
            q3n_status status = SafeModelHandle.Load(directory, &o, out var handle);
            if (status == q3n_status.Q3N_OK)
                return handle;
            // Read the message now: it is this thread's and the next library call replaces it.
            string message = NativeCall.Describe(status, $"Loading the model from '{directory}'");
            handle.Dispose();
            if (state?.Failure is { } failure)
                ExceptionDispatchInfo.Throw(failure);
            // A cancelled load stops through the progress callback, which the engine reports as INVALID_STATE.
            if (status == q3n_status.Q3N_ERR_INVALID_STATE && cancellationToken.IsCancellationRequested)
                throw new OperationCanceledException("Loading the model was cancelled.", cancellationToken);
            throw new ModelLoadException((Qwen3Status)status, directory, message);
        }
        finally
        {
            if (gc.IsAllocated)
                gc.Free();
        }
    }

    private sealed class LoadProgress(IProgress<float>? progress, CancellationToken cancellationToken)
    {
        public Exception? Failure;

        public int Report(float fraction)
        {
            if (cancellationToken.IsCancellationRequested)
                return 1;
            try
            {
                progress?.Report(fraction);
                return 0;
            }
            catch (Exception e)
            {
                // An exception may not unwind through native frames; stop the load and rethrow it afterwards.
                Failure = e;
                return 1;
            }
        }
    }

    [UnmanagedCallersOnly(CallConvs = [typeof(CallConvCdecl)])]
    private static unsafe int OnProgress(float fraction, void* userData)
    {
        try
        {
            var state = (LoadProgress)GCHandle.FromIntPtr((nint)userData).Target!;
            return state.Report(fraction);
        }
        catch
        {
            return 1;
        }
    }

    private static unsafe ModelInfo ReadInfo(SafeModelHandle handle)
    {
        q3n_model_info info = default;
        info.struct_size = (uint)sizeof(q3n_model_info);
        using (var lease = new HandleLease(handle))
            NativeCall.Check(NativeMethods.q3n_model_get_info(lease.Value, &info), "Reading the model information");
        var eos = new int[info.num_eos_token_ids];
        for (int i = 0; i < eos.Length; i++)
            eos[i] = info.eos_token_ids[i];
        return new ModelInfo
        {
            Architecture = NativeUtf8.FromNullTerminated(info.architecture),
            WeightDtype = (Qwen3DataType)info.weight_dtype,
            Device = (Qwen3Device)info.device,
            KvCacheDtype = (Qwen3DataType)info.kv_cache_dtype,
            VocabSize = checked((int)info.vocab_size),
            HiddenSize = checked((int)info.hidden_size),
            IntermediateSize = checked((int)info.intermediate_size),
            NumLayers = checked((int)info.num_layers),
            NumAttentionHeads = checked((int)info.num_attention_heads),
            NumKeyValueHeads = checked((int)info.num_kv_heads),
            HeadDim = checked((int)info.head_dim),
            MaxPositionEmbeddings = checked((int)info.max_position_embeddings),
            ContextLength = checked((int)info.context_length),
            KvCacheTokens = checked((long)info.kv_cache_tokens),
            KvBlockSize = checked((int)info.kv_block_size),
            BosTokenId = info.bos_token_id >= 0 ? info.bos_token_id : null,
            EosTokenIds = eos,
            ParameterCount = checked((long)info.parameter_count),
            WeightBytes = checked((long)info.weight_bytes),
            HasVision = info.has_vision != 0,
            PatchSize = checked((int)info.patch_size),
            TemporalPatchSize = checked((int)info.temporal_patch_size),
            SpatialMergeSize = checked((int)info.spatial_merge_size),
            ImageTokenId = info.image_token_id >= 0 ? info.image_token_id : null,
            VideoTokenId = info.video_token_id >= 0 ? info.video_token_id : null,
            VisionStartTokenId = info.vision_start_token_id >= 0 ? info.vision_start_token_id : null,
            VisionEndTokenId = info.vision_end_token_id >= 0 ? info.vision_end_token_id : null,
        };
    }
}
