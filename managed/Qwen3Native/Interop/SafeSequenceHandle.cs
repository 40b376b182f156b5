using System.Runtime.InteropServices;

namespace Qwen3Native.Interop;

/// <summary>Owns one <c>q3n_sequence*</c>; releases it with <c>q3n_sequence_free</c>.</summary>
/// <remarks>
/// The native library already keeps a model alive while it has sequences, but a managed reference
/// count on the model's handle means disposing the model object while a sequence is in use can
/// never hand a freed pointer to a later call that goes through the model handle.
/// </remarks>
internal sealed class SafeSequenceHandle : SafeHandle
{
    private SafeModelHandle? _model;

    public SafeSequenceHandle() : base(0, ownsHandle: true) { }

    public override bool IsInvalid => handle == 0;

    /// <summary>The model this sequence belongs to (null while the handle is invalid).</summary>
    public SafeModelHandle? Model => _model;

    /// <summary>Creates a sequence of <paramref name="model"/>. On failure <paramref name="sequence"/>
    /// is an invalid handle and the model's reference count is unchanged.</summary>
    /// <exception cref="ObjectDisposedException">The model handle is closed.</exception>
    public static unsafe q3n_status Create(SafeModelHandle model, out SafeSequenceHandle sequence)
    {
        ArgumentNullException.ThrowIfNull(model);
        sequence = new SafeSequenceHandle();
        bool addedRef = false;
        try
        {
            model.DangerousAddRef(ref addedRef);
            nint raw = 0;
            q3n_status status = NativeMethods.q3n_sequence_create(model.DangerousGetHandle(), &raw);
            if (status == q3n_status.Q3N_OK)
            {
                // From here the reference belongs to the sequence and is dropped in ReleaseHandle.
                sequence._model = model;
                sequence.SetHandle(raw);
                addedRef = false;
            }
            return status;
        }
        finally
        {
            if (addedRef)
            {
                model.DangerousRelease();
            }
        }
    }

    /// <summary>Queues <paramref name="tokens"/> for the next step (<c>q3n_sequence_append</c>).</summary>
    public unsafe q3n_status Append(ReadOnlySpan<int> tokens)
    {
        bool addedRef = false;
        try
        {
            DangerousAddRef(ref addedRef);
            fixed (int* p = tokens)
            {
                return NativeMethods.q3n_sequence_append(handle, p, (nuint)tokens.Length);
            }
        }
        finally
        {
            if (addedRef) DangerousRelease();
        }
    }

    /// <summary>The token the last sampling step produced, or -1 (<c>q3n_sequence_last_token</c>).</summary>
    public unsafe q3n_status LastToken(out int token)
    {
        bool addedRef = false;
        try
        {
            DangerousAddRef(ref addedRef);
            int value = -1;
            q3n_status status = NativeMethods.q3n_sequence_last_token(handle, &value);
            token = value;
            return status;
        }
        finally
        {
            if (addedRef) DangerousRelease();
        }
    }

    protected override bool ReleaseHandle()
    {
        NativeMethods.q3n_sequence_free(handle);
        _model?.DangerousRelease();
        _model = null;
        return true;
    }
}
