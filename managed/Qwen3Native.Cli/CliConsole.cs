using Spectre.Console;

namespace Qwen3Native.Cli;

/// <summary>
/// The streams a command talks to and whether each is a terminal. Commands never touch <see cref="Console"/> directly,
/// so that the tests can run them in-process on strings, and so that decorations (colours, progress bars, prompts)
/// appear only where a person is looking.
/// </summary>
internal sealed class CliConsole
{
    public CliConsole(TextReader input, TextWriter output, TextWriter error,
        bool inputIsTerminal = false, bool outputIsTerminal = false, bool errorIsTerminal = false)
    {
        In = input;
        Out = output;
        Error = error;
        InputIsTerminal = inputIsTerminal;
        OutputIsTerminal = outputIsTerminal;
        ErrorIsTerminal = errorIsTerminal;
    }

    public TextReader In { get; }

    public TextWriter Out { get; }

    public TextWriter Error { get; }

    public bool InputIsTerminal { get; }

    public bool OutputIsTerminal { get; }

    public bool ErrorIsTerminal { get; }

    /// <summary>Where Ctrl+C goes: the innermost running scope, or the default (end the process) when none is.</summary>
    public Interrupts Interrupts { get; } = new();

    public static CliConsole FromSystemConsole() => new(Console.In, Console.Out, Console.Error,
        !Console.IsInputRedirected, !Console.IsOutputRedirected, !Console.IsErrorRedirected);

    /// <summary>A Spectre console on <paramref name="writer"/>; colours and cursor movement only when it is a terminal.</summary>
    public static IAnsiConsole Ansi(TextWriter writer, bool isTerminal) => AnsiConsole.Create(new AnsiConsoleSettings
    {
        Out = new AnsiConsoleOutput(writer),
        Ansi = isTerminal ? AnsiSupport.Detect : AnsiSupport.No,
        ColorSystem = isTerminal ? ColorSystemSupport.Detect : ColorSystemSupport.NoColors,
        Interactive = isTerminal ? InteractionSupport.Yes : InteractionSupport.No,
    });
}

/// <summary>
/// Routes Ctrl+C to the operation that is running (a model load, a generation, one chat answer) instead of ending the
/// process, so that an interrupted answer leaves the chat usable. With nothing running, Ctrl+C ends the process as usual.
/// </summary>
internal sealed class Interrupts
{
    private CancellationTokenSource? _current;

    /// <summary>Starts receiving Ctrl+C from the system console until the result is disposed (the real program only).</summary>
    public IDisposable HookConsole()
    {
        ConsoleCancelEventHandler handler = OnCancelKeyPress;
        Console.CancelKeyPress += handler;
        return new Unhook(handler);
    }

    /// <summary>Ctrl+C cancels the returned scope's token until it is disposed.</summary>
    public Scope Begin(CancellationToken outer)
    {
        var source = CancellationTokenSource.CreateLinkedTokenSource(outer);
        var previous = Interlocked.Exchange(ref _current, source);
        return new Scope(this, source, previous);
    }

    /// <summary>What Ctrl+C does; public for the tests, which have no console to press it on.</summary>
    public bool Interrupt()
    {
        var current = Volatile.Read(ref _current);
        if (current is null)
            return false;
        try
        {
            current.Cancel();
        }
        catch (ObjectDisposedException)
        {
            // The operation ended between the read and the cancel: nothing left to interrupt, and the key is swallowed.
        }
        return true;
    }

    private void OnCancelKeyPress(object? sender, ConsoleCancelEventArgs e)
    {
        if (e.SpecialKey == ConsoleSpecialKey.ControlC && Interrupt())
            e.Cancel = true;
    }

    internal sealed class Scope : IDisposable
    {
        private readonly Interrupts _owner;
        private readonly CancellationTokenSource _source;
        private readonly CancellationTokenSource? _previous;

        public Scope(Interrupts owner, CancellationTokenSource source, CancellationTokenSource? previous)
        {
            _owner = owner;
            _source = source;
            _previous = previous;
        }

        public CancellationToken Token => _source.Token;

        public bool WasInterrupted => _source.IsCancellationRequested;

        public void Dispose()
        {
            Interlocked.CompareExchange(ref _owner._current, _previous, _source);
            _source.Dispose();
        }
    }

    private sealed class Unhook(ConsoleCancelEventHandler handler) : IDisposable
    {
        public void Dispose() => Console.CancelKeyPress -= handler;
    }
}
