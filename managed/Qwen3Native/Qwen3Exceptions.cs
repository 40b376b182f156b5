using Qwen3Native.Generation;

namespace Qwen3Native;

/// <summary>The engine's status codes (<c>q3n_status</c> in the C header), as the managed layer reports them.</summary>
public enum Qwen3Status
{
    Ok = 0,
    InvalidArgument = 1,
    Io = 2,
    BadCheckpoint = 3,
    BadConfig = 4,
    Unsupported = 5,
    OutOfMemory = 6,
    ContextOverflow = 7,
    KvCacheFull = 8,
    Numeric = 9,
    Device = 10,
    BufferTooSmall = 11,
    InvalidState = 12,
    Internal = 13,
}

/// <summary>
/// A failure reported by the native engine (or found by the managed layer before it reached the engine), with the
/// engine's status and its message. The subclasses name the failures a caller can act on.
/// </summary>
public class Qwen3NativeException : Exception
{
    public Qwen3NativeException(Qwen3Status status, string message, Exception? innerException = null)
        : base(message, innerException)
    {
        Status = status;
    }

    /// <summary>The engine's status code for this failure.</summary>
    public Qwen3Status Status { get; }
}

/// <summary>
/// A model could not be loaded: a missing directory or file (<see cref="Qwen3Status.Io"/>), a malformed or inconsistent
/// config.json or generation_config.json (<see cref="Qwen3Status.BadConfig"/>), a corrupt checkpoint
/// (<see cref="Qwen3Status.BadCheckpoint"/>), an architecture or device this build cannot run
/// (<see cref="Qwen3Status.Unsupported"/>), or any other status the engine returned while loading.
/// </summary>
public sealed class ModelLoadException : Qwen3NativeException
{
    public ModelLoadException(Qwen3Status status, string directory, string message, Exception? innerException = null)
        : base(status, message, innerException)
    {
        Directory = directory;
    }

    /// <summary>The checkpoint directory that failed to load.</summary>
    public string Directory { get; }
}

/// <summary>A prompt, or prompt plus output, does not fit in the context length the model was loaded with.</summary>
public sealed class ContextOverflowException : Qwen3NativeException
{
    public ContextOverflowException(string message, Exception? innerException = null)
        : base(Qwen3Status.ContextOverflow, message, innerException) { }
}

/// <summary>
/// The KV cache shared by the model's sequences has no room for this step (nothing was changed). Free or finish other
/// sessions, or load with a larger <see cref="ModelOptions.KvCacheTokens"/>.
/// </summary>
public sealed class KvCacheFullException : Qwen3NativeException
{
    public KvCacheFullException(string message, Exception? innerException = null)
        : base(Qwen3Status.KvCacheFull, message, innerException) { }
}

/// <summary>The logits contained NaN or Inf; no token was produced from them.</summary>
public sealed class NumericException : Qwen3NativeException
{
    public NumericException(string message, Exception? innerException = null)
        : base(Qwen3Status.Numeric, message, innerException) { }
}

/// <summary>The accelerator failed. The model refuses further work; the process has to be restarted to use the device again.</summary>
public sealed class DeviceException : Qwen3NativeException
{
    public DeviceException(string message, Exception? innerException = null)
        : base(Qwen3Status.Device, message, innerException) { }
}

/// <summary>
/// Valid input that this model or build cannot run (<see cref="Qwen3Status.Unsupported"/>): above all, images and videos
/// given to a model without a vision tower, which need a Qwen3-VL checkpoint.
/// </summary>
public sealed class UnsupportedInputException : Qwen3NativeException
{
    public UnsupportedInputException(string message, Exception? innerException = null)
        : base(Qwen3Status.Unsupported, message, innerException) { }
}

/// <summary>The engine could not allocate memory (host or device).</summary>
public sealed class NativeOutOfMemoryException : Qwen3NativeException
{
    public NativeOutOfMemoryException(string message, Exception? innerException = null)
        : base(Qwen3Status.OutOfMemory, message, innerException) { }
}

/// <summary>
/// A generation was cancelled through its <see cref="CancellationToken"/>. It is an
/// <see cref="OperationCanceledException"/>, as .NET callers expect, and it carries what was produced before the
/// cancellation in <see cref="Partial"/> (whose <see cref="GenerationResult.FinishReason"/> is
/// <see cref="FinishReason.Cancelled"/>).
/// </summary>
public sealed class GenerationCanceledException : OperationCanceledException
{
    public GenerationCanceledException(GenerationResult partial, CancellationToken token, Exception? innerException = null)
        : base("The generation was cancelled after " + partial.TokenIds.Count + " generated tokens.", innerException, token)
    {
        Partial = partial;
    }

    /// <summary>The tokens and text generated before the cancellation (stop strings and end-of-turn tokens excluded from the text).</summary>
    public GenerationResult Partial { get; }
}
