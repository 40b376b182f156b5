using System.Runtime.InteropServices;
using Qwen3Native.Interop;

namespace Qwen3Native;

/// <summary>Turns native status codes into the managed exceptions.</summary>
internal static class NativeCall
{
    /// <summary>
    /// Throws the exception for a failed status. Must run on the thread that made the failing call and before it
    /// calls the library again: <c>q3n_last_error</c> is per thread and overwritten by the next call.
    /// </summary>
    public static void Check(q3n_status status, string operation)
    {
        if (status != q3n_status.Q3N_OK)
            throw ToException(status, operation);
    }

    public static Qwen3NativeException ToException(q3n_status status, string operation)
    {
        string message = Describe(status, operation);
        return status switch
        {
            q3n_status.Q3N_ERR_CONTEXT_OVERFLOW => new ContextOverflowException(message),
            q3n_status.Q3N_ERR_KV_CACHE_FULL => new KvCacheFullException(message),
            q3n_status.Q3N_ERR_NUMERIC => new NumericException(message),
            q3n_status.Q3N_ERR_DEVICE => new DeviceException(message),
            q3n_status.Q3N_ERR_OUT_OF_MEMORY => new NativeOutOfMemoryException(message),
            q3n_status.Q3N_ERR_UNSUPPORTED => new UnsupportedInputException(message),
            _ => new Qwen3NativeException((Qwen3Status)status, message),
        };
    }

    /// <summary>"operation failed: native message (Q3N_ERR_X)", read from this thread's last error.</summary>
    public static string Describe(q3n_status status, string operation)
    {
        string native = NativeUtf8.LastError();
        string name = NativeUtf8.StatusName(status);
        if (string.IsNullOrEmpty(name))
            name = "status " + (int)status;
        return string.IsNullOrEmpty(native)
            ? $"{operation} failed ({name})."
            : $"{operation} failed: {native} ({name}).";
    }
}

/// <summary>
/// Holds a reference on a <see cref="SafeHandle"/> for the duration of a native call made with its raw value, which is
/// what the generated bindings take (<c>nint</c>). A dispose on another thread then waits for the call instead of
/// freeing the object under it.
/// </summary>
internal ref struct HandleLease
{
    private readonly SafeHandle _handle;
    private bool _added;

    /// <exception cref="ObjectDisposedException">The handle is already closed.</exception>
    public HandleLease(SafeHandle handle)
    {
        _handle = handle;
        _added = false;
        handle.DangerousAddRef(ref _added);
        Value = handle.DangerousGetHandle();
    }

    public nint Value { get; }

    public void Dispose()
    {
        if (_added)
        {
            _added = false;
            _handle.DangerousRelease();
        }
    }
}
