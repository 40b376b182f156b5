using System.Diagnostics.CodeAnalysis;
using System.Reflection;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Text;

namespace Qwen3Native.Interop;

/// <summary>
/// Finds and loads the native engine for every <c>[LibraryImport("qwen3native")]</c> in this assembly,
/// then checks that its ABI version matches the bindings.
/// </summary>
/// <remarks>
/// Search order: <c>QWEN3NATIVE_LIBRARY_PATH</c> (a file, or a directory holding the library), the
/// application's base directory, <c>runtimes/{rid}/native</c> under it (the process's RID, then the
/// portable one such as linux-x64, where NuGet puts native assets), then the runtime's default
/// probing (LD_LIBRARY_PATH, the system directories). Without this the runtime's own failure says
/// only that the library was not found, with no hint of which of several causes applies.
/// </remarks>
internal static unsafe class NativeLibraryLoader
{
    public const string PathVariable = "QWEN3NATIVE_LIBRARY_PATH";

    private static readonly object s_lock = new();
    private static nint s_handle;
    private static string? s_loadedFrom;

    /// <summary>Where the library was loaded from (a path, or the default probing); null before the first call.</summary>
    public static string? LoadedFrom
    {
        get { lock (s_lock) return s_loadedFrom; }
    }

    /// <summary>The platform's file name for the library.</summary>
    public static string LibraryFileName =>
        OperatingSystem.IsWindows() ? NativeMethods.LibraryName + ".dll"
        : OperatingSystem.IsMacOS() ? "lib" + NativeMethods.LibraryName + ".dylib"
        : "lib" + NativeMethods.LibraryName + ".so";

    /// <summary>The RID that NuGet's portable native assets use on this machine, e.g. linux-x64.</summary>
    public static string PortableRuntimeIdentifier
    {
        get
        {
            string os = OperatingSystem.IsWindows() ? "win" : OperatingSystem.IsMacOS() ? "osx" : "linux";
            return os + "-" + RuntimeInformation.ProcessArchitecture.ToString().ToLowerInvariant();
        }
    }

    // A module initializer rather than a static constructor: every P/Invoke in the assembly, hand-written
    // or generated, must see the resolver, and none may run before it is installed.
    [ModuleInitializer]
    [SuppressMessage("Usage", "CA2255", Justification = "The resolver must be installed before any P/Invoke of this assembly runs.")]
    internal static void Install() =>
        NativeLibrary.SetDllImportResolver(typeof(NativeLibraryLoader).Assembly, Resolve);

    private static nint Resolve(string libraryName, Assembly assembly, DllImportSearchPath? searchPath)
    {
        if (libraryName != NativeMethods.LibraryName)
        {
            return 0;
        }
        lock (s_lock)
        {
            if (s_handle != 0)
            {
                return s_handle;
            }
            string? fromEnvironment = Environment.GetEnvironmentVariable(PathVariable);
            var attempts = new List<ProbeAttempt>();
            nint handle = Probe(fromEnvironment, AppContext.BaseDirectory, RuntimeIdentifiers(), attempts,
                defaultProbe: () => NativeLibrary.TryLoad(libraryName, assembly, searchPath, out nint h) ? h : 0,
                out string? origin);
            if (handle == 0)
            {
                throw new DllNotFoundException(BuildNotFoundMessage(attempts, fromEnvironment));
            }
            CheckAbi(handle, origin!);
            s_handle = handle;
            s_loadedFrom = origin;
            return handle;
        }
    }

    /// <summary>One place the loader looked, and what happened there.</summary>
    internal readonly record struct ProbeAttempt(string Location, string Outcome);

    internal static IReadOnlyList<string> RuntimeIdentifiers() =>
        new[] { RuntimeInformation.RuntimeIdentifier, PortableRuntimeIdentifier }.Distinct(StringComparer.Ordinal).ToArray();

    /// <summary>The files to try, in order, with the reason each is on the list.</summary>
    internal static IReadOnlyList<(string Path, string Origin)> CandidatePaths(string? fromEnvironment, string baseDirectory, IEnumerable<string> runtimeIdentifiers)
    {
        var candidates = new List<(string, string)>();
        if (!string.IsNullOrEmpty(fromEnvironment))
        {
            string path = Directory.Exists(fromEnvironment) ? Path.Combine(fromEnvironment, LibraryFileName) : fromEnvironment;
            candidates.Add((Path.GetFullPath(path), PathVariable));
        }
        candidates.Add((Path.Combine(baseDirectory, LibraryFileName), "application directory"));
        foreach (string rid in runtimeIdentifiers)
        {
            candidates.Add((Path.Combine(baseDirectory, "runtimes", rid, "native", LibraryFileName), $"runtimes/{rid}"));
        }
        return candidates;
    }

    /// <summary>Tries each candidate, then <paramref name="defaultProbe"/> when given; records every attempt.
    /// Returns the library's handle, or 0 when nothing loaded.</summary>
    internal static nint Probe(string? fromEnvironment, string baseDirectory, IEnumerable<string> runtimeIdentifiers,
        List<ProbeAttempt> attempts, Func<nint>? defaultProbe, out string? origin)
    {
        foreach (var (path, why) in CandidatePaths(fromEnvironment, baseDirectory, runtimeIdentifiers))
        {
            if (!File.Exists(path))
            {
                attempts.Add(new ProbeAttempt($"{path} ({why})", "does not exist"));
                continue;
            }
            try
            {
                // Load, not TryLoad: its exception carries the loader's reason (a missing dependency,
                // an undefined symbol, the wrong architecture), which is what the user needs to see.
                nint handle = NativeLibrary.Load(path);
                origin = path;
                return handle;
            }
            catch (Exception e) when (e is DllNotFoundException or BadImageFormatException)
            {
                attempts.Add(new ProbeAttempt($"{path} ({why})", e.Message));
            }
        }
        if (defaultProbe is not null)
        {
            nint handle = defaultProbe();
            if (handle != 0)
            {
                origin = $"default probing for '{NativeMethods.LibraryName}'";
                return handle;
            }
            attempts.Add(new ProbeAttempt($"'{NativeMethods.LibraryName}' by the runtime's default probing (LD_LIBRARY_PATH, system directories)", "not found"));
        }
        origin = null;
        return 0;
    }

    internal static string BuildNotFoundMessage(IReadOnlyList<ProbeAttempt> attempts, string? fromEnvironment)
    {
        var text = new StringBuilder();
        text.Append($"Cannot load the Qwen3Native engine ({LibraryFileName}) for {PortableRuntimeIdentifier} ")
            .Append($"(process RID {RuntimeInformation.RuntimeIdentifier}).").AppendLine();
        text.AppendLine("Tried, in order:");
        foreach (var attempt in attempts)
        {
            text.Append("  - ").Append(attempt.Location).Append(": ").AppendLine(attempt.Outcome);
        }
        text.AppendLine("Likely causes:");
        if (!string.IsNullOrEmpty(fromEnvironment) && !File.Exists(fromEnvironment) && !Directory.Exists(fromEnvironment))
        {
            text.AppendLine($"  - {PathVariable} is set to '{fromEnvironment}', which does not exist: point it at {LibraryFileName} or the directory holding it.");
        }
        text.AppendLine($"  - The library is not built: run `dotnet run build.cs -- native` in the repository (it writes out/build/{LibraryFileName}), rebuild the app so it is copied beside it, or set {PathVariable}.");
        text.AppendLine($"  - Wrong RID: a package must carry runtimes/{PortableRuntimeIdentifier}/native/{LibraryFileName} for this process; a library built for another OS or architecture does not load.");
        text.AppendLine("  - A CUDA build needs the NVIDIA driver (libcuda.so.1) and the CUDA runtime it was linked with; a reason above naming libcuda or libcudart means one is missing.");
        text.Append("  - A missing or too old C++ runtime (libstdc++.so.6, or 'GLIBCXX_... not found' above): install the distribution's libstdc++6 or build the engine on this machine.");
        return text.ToString();
    }

    internal static string AbiMismatchMessage(string origin, uint libraryAbi) =>
        $"The Qwen3Native engine loaded from {origin} has ABI version {libraryAbi}, but these bindings " +
        $"({typeof(NativeLibraryLoader).Assembly.GetName().Name} {typeof(NativeLibraryLoader).Assembly.GetName().Version}) " +
        $"were generated for ABI version {NativeMethods.AbiVersion}. Use the library and the bindings of the same build: " +
        $"run `dotnet run build.cs -- native` (and `dotnet run build.cs -- bindings` after a header change), or set {PathVariable} to the matching library.";

    // The resolver cannot call q3n_abi_version through NativeMethods: that would ask the resolver again
    // for the library it is still resolving. It calls the export directly instead.
    internal static void CheckAbi(nint handle, string origin)
    {
        if (!NativeLibrary.TryGetExport(handle, "q3n_abi_version", out nint export))
        {
            NativeLibrary.Free(handle);
            throw new EntryPointNotFoundException(
                $"The library loaded from {origin} has no q3n_abi_version export: it is not the Qwen3Native engine, or it predates these bindings.");
        }
        uint abi = ((delegate* unmanaged[Cdecl]<uint>)export)();
        if (abi != NativeMethods.AbiVersion)
        {
            NativeLibrary.Free(handle);
            throw new InvalidOperationException(AbiMismatchMessage(origin, abi));
        }
    }
}
