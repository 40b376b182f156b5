using System.CommandLine;
using System.CommandLine.Invocation;
using Qwen3Native.Tokenization;

namespace Qwen3Native.Cli;

/// <summary>
/// The qwen3 command line: parsing, dispatch and the exit-code contract (0 success, 1 a failure with one line saying
/// why, 2 bad arguments, 130 interrupted).
/// </summary>
internal static class Cli
{
    public const int ExitOk = 0;
    public const int ExitError = 1;
    public const int ExitUsage = 2;
    public const int ExitInterrupted = 130;

    private const string Name = "qwen3";

    /// <summary>Runs the CLI in-process on the given streams, none of them a terminal, with empty input.</summary>
    internal static Task<int> RunAsync(string[] args, TextWriter stdout, TextWriter stderr) =>
        RunAsync(args, new CliConsole(TextReader.Null, stdout, stderr));

    /// <summary>Runs the CLI in-process on the given streams, none of them a terminal.</summary>
    internal static Task<int> RunAsync(string[] args, TextReader stdin, TextWriter stdout, TextWriter stderr) =>
        RunAsync(args, new CliConsole(stdin, stdout, stderr));

    internal static async Task<int> RunAsync(string[] args, CliConsole console)
    {
        var root = BuildRootCommand(console);
        var parse = root.Parse(args);
        if (parse.Action is ParseErrorAction)
        {
            foreach (var error in parse.Errors)
                console.Error.WriteLine($"{Name}: {error.Message}");
            string command = parse.CommandResult.Command == root ? Name : $"{Name} {parse.CommandResult.Command.Name}";
            console.Error.WriteLine($"Run '{command} --help' for usage.");
            return ExitUsage;
        }
        var configuration = new InvocationConfiguration
        {
            Output = console.Out,
            Error = console.Error,
            // Failures are reported by Guard, one line each; Ctrl+C is routed by CliConsole.Interrupts.
            EnableDefaultExceptionHandler = false,
            ProcessTerminationTimeout = null,
        };
        return await parse.InvokeAsync(configuration).ConfigureAwait(false);
    }

    private static RootCommand BuildRootCommand(CliConsole console)
    {
        var root = new RootCommand(
            "Run Qwen3 checkpoints (Hugging Face directories, BF16 or FP8) with the Qwen3Native engine.");
        root.Add(InfoCommand.Create(console));
        root.Add(TokenizeCommand.Create(console));
        root.Add(GenerateCommand.Create(console));
        root.Add(ChatCommand.Create(console));
        root.Add(BenchCommand.Create(console));
        return root;
    }

    /// <summary>Wraps a command's body so that any failure ends in one line on stderr and its exit code.</summary>
    public static Func<ParseResult, CancellationToken, Task<int>> Guard(CliConsole console,
        Func<ParseResult, CancellationToken, Task<int>> body) => async (parse, cancellationToken) =>
    {
        try
        {
            return await body(parse, cancellationToken).ConfigureAwait(false);
        }
        catch (Exception e)
        {
            var (message, code) = Describe(e);
            console.Out.Flush();
            console.Error.WriteLine($"{Name}: {message}");
            return code;
        }
    };

    internal static (string Message, int ExitCode) Describe(Exception e) => e switch
    {
        CliException c => (c.Message, c.ExitCode),
        OperationCanceledException => ("interrupted.", ExitInterrupted),
        // A value the engine or the options refused (a token id outside the vocabulary, an empty prompt): the
        // arguments were wrong, whatever the parser could check.
        ArgumentException a => (ArgumentMessage(a), ExitUsage),
        // The loader's message lists where it looked and the likely causes, which is what the user needs.
        DllNotFoundException or EntryPointNotFoundException => (e.Message, ExitError),
        Qwen3NativeException or IOException or UnauthorizedAccessException or TokenizerFormatException
            or InvalidOperationException or NotSupportedException => (FirstLine(e.Message), ExitError),
        _ => ($"unexpected {e.GetType().Name}: {FirstLine(e.Message)}", ExitError),
    };

    private static string ArgumentMessage(ArgumentException e)
    {
        // ArgumentException appends " (Parameter 'x')" and the out-of-range one "Actual value was …" on a new line.
        string line = FirstLine(e.Message);
        if (e.ParamName is { } name && line.EndsWith($" (Parameter '{name}')", StringComparison.Ordinal))
            line = line[..^$" (Parameter '{name}')".Length];
        return line;
    }

    private static string FirstLine(string text)
    {
        int end = text.IndexOfAny(['\r', '\n']);
        return end < 0 ? text : text[..end];
    }
}
