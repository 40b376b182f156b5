using System.Text;

namespace Qwen3Native.Cli;

internal static class Program
{
    private static async Task<int> Main(string[] args)
    {
        try
        {
            // Model text is UTF-8 whatever the console's code page (Windows defaults to an OEM one).
            Console.OutputEncoding = new UTF8Encoding(encoderShouldEmitUTF8Identifier: false);
        }
        catch (IOException)
        {
            // No console to configure (a detached process); the writers keep their encoding.
        }
        var console = CliConsole.FromSystemConsole();
        using var ctrlC = console.Interrupts.HookConsole();
        return await Cli.RunAsync(args, console);
    }
}
