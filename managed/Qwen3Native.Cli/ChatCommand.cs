using System.CommandLine;
using Spectre.Console;
using Qwen3Native.Chat;
using Qwen3Native.Generation;

namespace Qwen3Native.Cli;

/// <summary>
/// <c>qwen3 chat</c>: a conversation read line by line from stdin. In a terminal the reasoning is shown dimmed and the
/// answer streams in plain colours; redirected, the raw text goes out as generated. Ctrl+C stops the answer being
/// generated and the conversation goes on as if it had not been asked.
/// </summary>
internal static class ChatCommand
{
    public static Command Create(CliConsole console)
    {
        var model = new ModelArgs();
        var sampling = new SamplingArgs();
        var system = new Option<string?>("--system") { Description = "A system message that opens the conversation", HelpName = "S" };
        var noThink = new Option<bool>("--no-think") { Description = "Hybrid models: answer without reasoning first" };
        var stats = new Option<bool>("--stats") { Description = "Print token counts and timings of each answer to stderr" };
        var media = new MediaArgs();

        var command = new Command("chat",
            "Chat interactively: one message per line; /image PATH and /video PATH attach media to the next message, " +
            "/reset starts over, /exit (or end of input) quits");
        model.AddTo(command);
        sampling.AddTo(command);
        command.Add(system);
        command.Add(noThink);
        command.Add(stats);
        media.AddTo(command);
        command.SetAction(Cli.Guard(console, async (r, cancellationToken) =>
        {
            // --image and --video go with the first message; /image and /video lines add to the next one.
            var attached = media.Parts(r);
            Qwen3Model m;
            using (var loading = console.Interrupts.Begin(cancellationToken))
                m = await ModelLoading.LoadAsync(model.Directory(r), model.ToOptions(r), console, loading.Token);
            using var owned = m;
            if (attached.Count > 0)
                MediaArgs.CheckModel(m);
            using var session = m.CreateSession(new SessionOptions
            {
                SystemPrompt = r.GetValue(system),
                EnableThinking = !r.GetValue(noThink),
                Sampling = sampling.Apply(r, m.GenerationDefaults),
            });
            var ansi = console.OutputIsTerminal ? CliConsole.Ansi(console.Out, isTerminal: true) : null;
            if (console.InputIsTerminal)
                console.Error.WriteLine(m.Info.HasVision
                    ? "Type a message; /image PATH and /video PATH attach media to the next one, /reset starts over, /exit quits. Ctrl+C stops an answer."
                    : "Type a message; /reset starts over, /exit quits. Ctrl+C stops an answer.");

            while (true)
            {
                if (console.InputIsTerminal)
                    WritePrompt(console, ansi);
                string? line = await console.In.ReadLineAsync(cancellationToken);
                if (line is null)
                    break;
                line = line.Trim();
                if (line.Length == 0)
                    continue;
                if (line is "/exit" or "/quit")
                    break;
                if (line == "/reset")
                {
                    session.Reset();
                    attached.Clear();
                    console.Error.WriteLine("(conversation cleared)");
                    continue;
                }
                if (line.StartsWith("/image ", StringComparison.Ordinal) || line.StartsWith("/video ", StringComparison.Ordinal))
                {
                    bool isImage = line[1] == 'i';
                    string path = line[7..].Trim();
                    if (!m.Info.HasVision)
                        console.Error.WriteLine($"(this model, {m.Info.Architecture}, has no vision tower: it cannot take images or videos)");
                    else if (!File.Exists(path))
                        console.Error.WriteLine($"(no such file: {path})");
                    else
                    {
                        attached.Add(isImage ? ImagePart.FromFile(path) : VideoPart.FromFile(path));
                        console.Error.WriteLine($"(attached to your next message: {path})");
                    }
                    continue;
                }

                var renderer = new AnswerRenderer(console.Out, ansi);
                GenerationUpdate? last = null;
                using (var answer = console.Interrupts.Begin(cancellationToken))
                {
                    try
                    {
                        var message = attached.Count > 0 ? ChatMessage.User([.. attached, line]) : ChatMessage.User(line);
                        attached.Clear();
                        await foreach (var update in session.ChatStreamAsync([message], null, answer.Token))
                        {
                            renderer.Write(update);
                            last = update;
                        }
                    }
                    catch (GenerationCanceledException) when (answer.WasInterrupted)
                    {
                        renderer.End();
                        console.Error.WriteLine("(answer stopped; it is not part of the conversation)");
                        continue;
                    }
                }
                renderer.End();
                if (r.GetValue(stats) && last?.Stats is { } s)
                    console.Error.WriteLine(Output.StatsLine(s));
            }
            return Cli.ExitOk;
        }));
        return command;
    }

    private static void WritePrompt(CliConsole console, IAnsiConsole? ansi)
    {
        if (ansi is not null)
            ansi.Markup("[bold green]>[/] ");
        else
            console.Out.Write("> ");
        console.Out.Flush();
    }

    /// <summary>Shows one streamed answer: in a terminal, reasoning dimmed and tags hidden; otherwise the raw text.</summary>
    private sealed class AnswerRenderer(TextWriter output, IAnsiConsole? ansi)
    {
        private bool _inReasoning;
        private bool _answerStarted;
        private bool _atLineStart = true;

        public void Write(GenerationUpdate update)
        {
            string text = update.Text;
            if (text.Length == 0)
                return;
            if (ansi is null)
            {
                Emit(text);
                return;
            }
            switch (update.Kind)
            {
                case OutputKind.Markup:
                    return; // the <think> and <tool_call> tags themselves
                case OutputKind.Reasoning:
                    _inReasoning = true;
                    ansi.Markup("[dim]" + Markup.Escape(text) + "[/]");
                    _atLineStart = text[^1] == '\n';
                    return;
                default:
                    // The template puts blank lines between the think block and the answer; the answer starts at its text.
                    if (!_answerStarted)
                        text = text.TrimStart('\n');
                    if (text.Length == 0)
                        return;
                    if (_inReasoning)
                    {
                        if (!_atLineStart)
                            Emit("\n");
                        Emit("\n");
                        _inReasoning = false;
                    }
                    _answerStarted = true;
                    Emit(text);
                    return;
            }
        }

        public void End()
        {
            if (!_atLineStart)
                Emit("\n");
            output.Flush();
        }

        private void Emit(string text)
        {
            output.Write(text);
            output.Flush();
            _atLineStart = text[^1] == '\n';
        }
    }
}
