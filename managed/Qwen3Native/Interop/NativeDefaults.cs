namespace Qwen3Native.Interop;

/// <summary>The versioned option structs as the library's <c>*_init</c> functions fill them.</summary>
/// <remarks>Defaults come from the library rather than from C# initialisers. The size passed is this
/// assembly's view of the struct, so a newer library with a longer struct writes only what fits.</remarks>
internal static unsafe class NativeDefaults
{
    public static q3n_model_options ModelOptions()
    {
        q3n_model_options options;
        NativeMethods.q3n_model_options_init(&options, (nuint)sizeof(q3n_model_options));
        return options;
    }

    public static q3n_sampling_params SamplingParams()
    {
        q3n_sampling_params parameters;
        NativeMethods.q3n_sampling_params_init(&parameters, (nuint)sizeof(q3n_sampling_params));
        return parameters;
    }
}
