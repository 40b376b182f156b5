using System.CommandLine;
using System.Text;
using Qwen3Native.Chat;
using Qwen3Native.Generation;

namespace Qwen3Native.Cli;

/// <summary>
/// <c>qwen3 generate</c>: one completion of a raw prompt (text, or token ids), or with --chat of one user message
/// rendered with the checkpoint's chat template. Streams the text, or prints one JSON object with --json.
/// </summary>
internal static class GenerateCommand
{
    public static Command Create(CliConsole console)
    {
        var model = new ModelArgs();
        var sampling = new SamplingArgs();
        var prompt = new Option<string?>("--prompt", "-p") { Description = "Prompt text, used as it is unless --chat is given", HelpName = "T" };
        var promptFile = new Option<string?>("--prompt-file") { Description = "Read the prompt text from a UTF-8 file", HelpName = "F" };
        var promptIds = new Option<int[]?>("--prompt-ids")
        {
            Description = "Prompt as token ids, e.g. 151644,872,198 (no template)",
            HelpName = "IDS",
            CustomParser = CliOptions.ParseIds,
        };
        var logprobs = CliOptions.Check(new Option<int?>("--logprobs")
        {
            Description = "Report each generated token's log-probability with the K most likely alternatives (0..20)",
            HelpName = "K",
        }, k => k is >= 0 and <= SamplingOptions.MaxTopLogprobs, $"in 0..{SamplingOptions.MaxTopLogprobs}");
        var promptLogprobs = new Option<bool>("--prompt-logprobs") { Description = "Report the prompt tokens' log-probabilities (with --logprobs K alternatives)" };
        var stats = new Option<bool>("--stats") { Description = "Print token counts and timings to stderr" };
        var json = new Option<bool>("--json") { Description = "Print one JSON object: ids, text, finish_reason, usage, stats, logprobs" };
        var chat = new Option<bool>("--chat") { Description = "Render the prompt as a user message with the chat template" };
        var noThink = new Option<bool>("--no-think") { Description = "With --chat on hybrid models: answer without reasoning first" };
        var system = new Option<string?>("--system") { Description = "With --chat: a system message", HelpName = "S" };
        var media = new MediaArgs();

        var command = new Command("generate", "Generate a completion; text streams to stdout as it is produced");
        model.AddTo(command);
        command.Add(prompt);
        command.Add(promptFile);
        command.Add(promptIds);
        sampling.AddTo(command);
        command.Add(logprobs);
        command.Add(promptLogprobs);
        command.Add(stats);
        command.Add(json);
        command.Add(chat);
        command.Add(noThink);
        command.Add(system);
        media.AddTo(command);
        command.Validators.Add(result =>
        {
            int given = new[] { result.GetResult(prompt), result.GetResult(promptFile), result.GetResult(promptIds) }.Count(o => o is not null);
            if (given != 1)
                result.AddError("Give exactly one of --prompt, --prompt-file or --prompt-ids.");
            bool isChat = result.GetResult(chat) is not null && result.GetValue(chat);
            if (isChat && result.GetResult(promptIds) is not null)
                result.AddError("--chat renders a text prompt with the chat template; --prompt-ids are used as they are.");
            if (!isChat && (result.GetResult(noThink) is not null || result.GetResult(system) is not null))
                result.AddError("--no-think and --system apply to --chat.");
            if (!isChat && (result.GetResult(media.Images) is not null || result.GetResult(media.Videos) is not null))
                result.AddError("--image and --video attach media to a chat message; add --chat.");
        });

        command.SetAction(Cli.Guard(console, async (r, cancellationToken) =>
        {
            using var interrupt = console.Interrupts.Begin(cancellationToken);
            // Missing files are found before the model load, which can take a while.
            var attached = media.Parts(r);
            using var m = await ModelLoading.LoadAsync(model.Directory(r), model.ToOptions(r), console, interrupt.Token);
            if (attached.Count > 0)
                MediaArgs.CheckModel(m);
            var options = sampling.Apply(r, m.GenerationDefaults);
            if (r.GetValue(logprobs) is int k)
                options = options with { Logprobs = true, TopLogprobs = k };
            if (r.GetValue(promptLogprobs))
                options = options with { PromptLogprobs = true };

            string? text = r.GetValue(prompt) ?? (r.GetValue(promptFile) is { } file ? File.ReadAllText(file) : null);
            bool asJson = r.GetValue(json);
            bool isChat = r.GetValue(chat);
            bool thinking = !r.GetValue(noThink);

            using var session = isChat
                ? m.CreateSession(new SessionOptions { SystemPrompt = r.GetValue(system), EnableThinking = thinking })
                : null;
            var stream = session is not null
                ? session.ChatStreamAsync([attached.Count > 0 ? ChatMessage.User([.. attached, text!]) : ChatMessage.User(text!)], options,
                    interrupt.Token)
                // Asked by presence: an absent array option reads as empty, not null.
                : m.GenerateStreamAsync(r.GetResult(promptIds) is not null ? r.GetValue(promptIds)! : m.Tokenizer.Encode(text!),
                    options, interrupt.Token);

            var run = new Collected();
            try
            {
                await foreach (var update in stream)
                {
                    run.Add(update);
                    if (!asJson && update.Text.Length > 0)
                    {
                        console.Out.Write(update.Text);
                        console.Out.Flush();
                    }
                }
            }
            catch (OperationCanceledException) when (!asJson)
            {
                console.Out.WriteLine();
                throw;
            }

            var final = run.Final!;
            // A chat turn's ids come from the sequence: a stop string that ends on a tag leaves its last token without
            // an update of its own. Raw generation has no tags, so its updates name every token.
            IReadOnlyList<int> ids = session is not null
                ? session.GetTokens().Skip(final.Usage!.PromptTokens).ToArray()
                : run.Ids;

            if (asJson)
            {
                console.Out.WriteLine(Output.Json(w =>
                {
                    w.WriteStartObject();
                    Output.WriteIds(w, "ids", ids);
                    w.WriteString("text", run.Text.ToString());
                    if (session is not null)
                    {
                        var parsed = ChatOutputParser.Parse(run.Text.ToString(),
                            session.ChatTemplate.PromptOpensThinking(new ChatTemplateOptions { EnableThinking = thinking }));
                        w.WriteString("content", parsed.Content);
                        if (parsed.Reasoning is { } reasoning)
                            w.WriteString("reasoning", reasoning);
                        else
                            w.WriteNull("reasoning");
                    }
                    w.WriteString("finish_reason", Output.FinishReasonName(final.FinishReason!.Value));
                    Output.WriteUsage(w, final.Usage!);
                    Output.WriteStats(w, final.Stats!);
                    if (options.Logprobs)
                        Output.WriteLogprobs(w, "logprobs", run.Logprobs);
                    if (options.PromptLogprobs)
                        Output.WriteLogprobs(w, "prompt_logprobs", final.PromptLogprobs ?? []);
                    w.WriteEndObject();
                }));
                return Cli.ExitOk;
            }

            if (run.Text.Length == 0 || run.Text[^1] != '\n')
                console.Out.WriteLine();
            console.Out.Flush();
            if (options.PromptLogprobs)
                Output.WriteLogprobTable(console.Error, "prompt log-probabilities:", final.PromptLogprobs ?? []);
            if (options.Logprobs)
                Output.WriteLogprobTable(console.Error, "log-probabilities:", run.Logprobs);
            if (r.GetValue(stats))
                console.Error.WriteLine($"finish: {Output.FinishReasonName(final.FinishReason!.Value)}; {Output.StatsLine(final.Stats!)}");
            return Cli.ExitOk;
        }));
        return command;
    }

    /// <summary>What the stream delivered: text, token ids, log-probabilities and the final update.</summary>
    private sealed class Collected
    {
        public StringBuilder Text { get; } = new();

        public List<int> Ids { get; } = new();

        public List<TokenLogprob> Logprobs { get; } = new();

        public GenerationUpdate? Final { get; private set; }

        public void Add(GenerationUpdate update)
        {
            Text.Append(update.Text);
            if (update.TokenId >= 0)
                Ids.Add(update.TokenId);
            if (update.Logprob is { } lp)
                Logprobs.Add(lp);
            if (update.IsFinal)
                Final = update;
        }
    }
}
