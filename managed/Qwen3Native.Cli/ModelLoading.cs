using Spectre.Console;
using Qwen3Native.Tokenization;

namespace Qwen3Native.Cli;

/// <summary>Loads models and tokenizers for the commands, with a progress bar where a person watches stderr.</summary>
internal static class ModelLoading
{
    public static async Task<Qwen3Model> LoadAsync(string directory, ModelOptions options, CliConsole console,
        CancellationToken cancellationToken)
    {
        if (!console.ErrorIsTerminal)
            return await Qwen3Model.LoadAsync(directory, options, null, cancellationToken).ConfigureAwait(false);

        string name = Path.GetFileName(Path.TrimEndingDirectorySeparator(Path.GetFullPath(directory)));
        Qwen3Model? model = null;
        await CliConsole.Ansi(console.Error, isTerminal: true).Progress()
            .AutoClear(true)
            .HideCompleted(true)
            .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new ElapsedTimeColumn())
            .StartAsync(async context =>
            {
                var task = context.AddTask("Loading " + Markup.Escape(name), maxValue: 1.0);
                model = await Qwen3Model.LoadAsync(directory, options, new TaskProgress(task), cancellationToken).ConfigureAwait(false);
                task.Value = 1.0;
            }).ConfigureAwait(false);
        return model!;
    }

    /// <summary>
    /// The tokenizer alone, for commands that need no weights: tokenizing a string should not cost a model load nor
    /// need the native engine at all.
    /// </summary>
    public static Qwen3Tokenizer LoadTokenizer(string directory)
    {
        string full = Path.GetFullPath(directory);
        if (!Directory.Exists(full))
        {
            string why = File.Exists(full) ? "is a file, not a directory" : "does not exist";
            throw new CliException($"The model directory '{full}' {why}. Pass the folder that holds tokenizer.json.");
        }
        string path = Path.Combine(full, "tokenizer.json");
        if (!File.Exists(path))
            throw new CliException($"The model directory '{full}' has no tokenizer.json, so text cannot be tokenized.");
        try
        {
            return Qwen3Tokenizer.FromFile(path);
        }
        catch (TokenizerFormatException e)
        {
            throw new CliException($"'{path}' cannot be used: {e.Message}");
        }
    }

    // Set directly, not through Progress<T>: that posts to the thread pool, and reports could then land after the bar
    // was completed and removed.
    private sealed class TaskProgress(ProgressTask task) : IProgress<float>
    {
        public void Report(float value) => task.Value = Math.Clamp(value, 0f, 1f);
    }
}

/// <summary>A failure the CLI itself detected, with its message for the user and its exit code.</summary>
internal sealed class CliException(string message, int exitCode = Cli.ExitError) : Exception(message)
{
    public int ExitCode { get; } = exitCode;
}
