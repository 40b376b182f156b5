using System.Diagnostics;
using System.Text;

namespace Qwen3Native.PackageTests;

internal sealed record CommandResult(string CommandLine, int ExitCode, string Output)
{
    public override string ToString() => $"`{CommandLine}` exited with {ExitCode}:\n{Output}";
}

/// <summary>Runs the dotnet CLI and other tools as child processes of the test, with their output captured.</summary>
internal static class Commands
{
    /// <summary>The dotnet host that runs this test (set by `dotnet test`), so the child uses the same SDK installation.</summary>
    public static string Dotnet => Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") is { Length: > 0 } host && File.Exists(host) ? host : "dotnet";

    /// <summary>
    /// Runs <paramref name="file"/> and waits for it and for the end of its output. <paramref name="environment"/> sets
    /// variables, or removes those mapped to null.
    /// </summary>
    public static CommandResult Run(string file, IEnumerable<string> arguments, string workingDirectory,
        IReadOnlyDictionary<string, string?>? environment = null, TimeSpan? timeout = null)
    {
        var psi = new ProcessStartInfo(file)
        {
            WorkingDirectory = workingDirectory,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (string a in arguments)
            psi.ArgumentList.Add(a);
        foreach (var (name, value) in BaseEnvironment.Concat(environment ?? new Dictionary<string, string?>()))
        {
            if (value is null)
                psi.Environment.Remove(name);
            else
                psi.Environment[name] = value;
        }
        string commandLine = string.Join(' ', new[] { file }.Concat(psi.ArgumentList));

        var output = new StringBuilder();
        void Append(object _, DataReceivedEventArgs e)
        {
            if (e.Data is null)
                return;
            lock (output)
                output.AppendLine(e.Data);
        }
        using var process = new Process { StartInfo = psi };
        process.OutputDataReceived += Append;
        process.ErrorDataReceived += Append;
        TestContext.Progress.WriteLine($"> {commandLine}");
        process.Start();
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        var limit = timeout ?? TimeSpan.FromMinutes(5);
        if (!process.WaitForExit(limit))
        {
            process.Kill(entireProcessTree: true);
            process.WaitForExit();
            Assert.Fail($"`{commandLine}` did not finish within {limit.TotalSeconds:0} s and was killed. Its output:\n{output}");
        }
        process.WaitForExit(); // the end of the redirected output
        lock (output)
            return new CommandResult(commandLine, process.ExitCode, output.ToString());
    }

    /// <summary>Like <see cref="Run"/>, and fails the test with the command's output when it exits non-zero.</summary>
    public static CommandResult RunChecked(string file, IEnumerable<string> arguments, string workingDirectory,
        IReadOnlyDictionary<string, string?>? environment = null, TimeSpan? timeout = null)
    {
        var result = Run(file, arguments, workingDirectory, environment, timeout);
        if (result.ExitCode != 0)
            Assert.Fail(result.ToString());
        return result;
    }

    private static readonly Dictionary<string, string?> BaseEnvironment = new()
    {
        // The output is parsed (`dotnet nuget list source`): keep it in English.
        ["DOTNET_CLI_UI_LANGUAGE"] = "en",
        ["DOTNET_NOLOGO"] = "1",
        ["DOTNET_CLI_TELEMETRY_OPTOUT"] = "1",
        ["DOTNET_SKIP_FIRST_TIME_EXPERIENCE"] = "1",
        // MSBuild worker nodes, the MSBuild server and the compiler server outlive the build and inherit its stdout, so
        // waiting for the end of the output would wait for them to time out (minutes). UseSharedCompilation reaches
        // MSBuild as a property, like every environment variable.
        ["MSBUILDDISABLENODEREUSE"] = "1",
        ["DOTNET_CLI_USE_MSBUILD_SERVER"] = "0",
        ["UseSharedCompilation"] = "false",
        // Set by the `dotnet test` that started this host; a child build resolves its own SDK.
        ["MSBuildExtensionsPath"] = null,
        ["MSBuildSDKsPath"] = null,
        ["MSBUILD_EXE_PATH"] = null,
        ["MSBuildLoadMicrosoftTargetsReadOnly"] = null,
        // Would make the loader take that file instead of the package's copy.
        ["QWEN3NATIVE_LIBRARY_PATH"] = null,
    };
}
