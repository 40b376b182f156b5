using System.Runtime.InteropServices;

namespace Qwen3Native.Interop;

/// <summary>Owns one <c>q3n_model*</c>; releases it with <c>q3n_model_free</c>.</summary>
internal sealed class SafeModelHandle : SafeHandle
{
    public SafeModelHandle() : base(0, ownsHandle: true) { }

    public override bool IsInvalid => handle == 0;

    /// <summary>Loads a checkpoint directory. On failure <paramref name="model"/> is an invalid handle
    /// and <c>q3n_last_error</c> holds the message for this thread.</summary>
    public static unsafe q3n_status Load(string path, q3n_model_options* options, out SafeModelHandle model)
    {
        ArgumentNullException.ThrowIfNull(path);
        // The handle object exists before the call so that a successful load is owned at once.
        model = new SafeModelHandle();
        byte[] utf8Path = NativeUtf8.ToNullTerminated(path, nameof(path));
        nint raw = 0;
        q3n_status status;
        fixed (byte* p = utf8Path)
        {
            status = NativeMethods.q3n_model_load(p, options, &raw);
        }
        if (status == q3n_status.Q3N_OK)
        {
            model.SetHandle(raw);
        }
        return status;
    }

    /// <summary>Loads with <c>options</c> (fill it with <see cref="NativeDefaults.ModelOptions"/> first).</summary>
    public static unsafe q3n_status Load(string path, in q3n_model_options options, out SafeModelHandle model)
    {
        fixed (q3n_model_options* p = &options)
        {
            return Load(path, p, out model);
        }
    }

    /// <summary>Loads with the library's default options.</summary>
    public static unsafe q3n_status Load(string path, out SafeModelHandle model) => Load(path, (q3n_model_options*)null, out model);

    /// <summary>Fills <paramref name="info"/> (its <c>struct_size</c> is set here). Pointers in it stay
    /// valid while the model lives.</summary>
    public unsafe q3n_status GetInfo(out q3n_model_info info)
    {
        info = default;
        info.struct_size = (uint)sizeof(q3n_model_info);
        bool addedRef = false;
        try
        {
            DangerousAddRef(ref addedRef);
            fixed (q3n_model_info* p = &info)
            {
                return NativeMethods.q3n_model_get_info(handle, p);
            }
        }
        finally
        {
            if (addedRef) DangerousRelease();
        }
    }

    /// <summary>One forward pass over <paramref name="sequences"/> (<c>q3n_model_step</c>); every handle is
    /// kept alive for the duration of the call.</summary>
    public unsafe q3n_status Step(ReadOnlySpan<SafeSequenceHandle> sequences, uint flags)
    {
        // A disposal racing with the call must not free a sequence the library is using, so each handle
        // is referenced for the call's duration, as the SafeHandle marshaller would do for one argument.
        const int StackLimit = 64;
        Span<nint> raw = sequences.Length <= StackLimit ? stackalloc nint[StackLimit] : new nint[sequences.Length];
        raw = raw[..sequences.Length];
        int referenced = 0;
        bool modelRef = false;
        try
        {
            DangerousAddRef(ref modelRef);
            for (; referenced < sequences.Length; referenced++)
            {
                bool added = false;
                sequences[referenced].DangerousAddRef(ref added);
                raw[referenced] = sequences[referenced].DangerousGetHandle();
            }
            fixed (nint* p = raw)
            {
                return NativeMethods.q3n_model_step(handle, p, (nuint)raw.Length, flags);
            }
        }
        finally
        {
            for (int i = 0; i < referenced; i++)
            {
                sequences[i].DangerousRelease();
            }
            if (modelRef) DangerousRelease();
        }
    }

    protected override bool ReleaseHandle()
    {
        NativeMethods.q3n_model_free(handle);
        return true;
    }
}
