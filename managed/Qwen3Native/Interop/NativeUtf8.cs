using System.Runtime.InteropServices;
using System.Text;

namespace Qwen3Native.Interop;

/// <summary>UTF-8 conversions for the header's <c>const char*</c> strings (passed as <c>byte*</c>).</summary>
internal static unsafe class NativeUtf8
{
    /// <summary>A NUL-terminated UTF-8 copy of <paramref name="value"/>, to pin with <c>fixed</c>.</summary>
    /// <exception cref="ArgumentException">The string contains a NUL character: C would see only the
    /// part before it, so a path such as "models\0../other" would silently name another file.</exception>
    public static byte[] ToNullTerminated(string value, string? parameterName = null)
    {
        ArgumentNullException.ThrowIfNull(value, parameterName);
        if (value.Contains('\0'))
        {
            throw new ArgumentException("The string contains a NUL character, which C strings cannot carry.", parameterName);
        }
        int length = Encoding.UTF8.GetByteCount(value);
        var bytes = new byte[length + 1];
        Encoding.UTF8.GetBytes(value, bytes);
        return bytes;
    }

    /// <summary>The string at a NUL-terminated UTF-8 pointer, or "" for NULL. Invalid UTF-8 becomes U+FFFD.</summary>
    public static string FromNullTerminated(byte* value) =>
        value == null ? string.Empty : Encoding.UTF8.GetString(MemoryMarshal.CreateReadOnlySpanFromNullTerminated(value));

    /// <summary>The calling thread's last error message from the library ("" when none).</summary>
    public static string LastError() => FromNullTerminated(NativeMethods.q3n_last_error());

    /// <summary>The library's name for a status, such as "Q3N_ERR_BAD_CONFIG".</summary>
    public static string StatusName(q3n_status status) => FromNullTerminated(NativeMethods.q3n_status_name(status));

    /// <summary>The library's version string, such as "0.1.0+cpu".</summary>
    public static string VersionString() => FromNullTerminated(NativeMethods.q3n_version_string());
}
