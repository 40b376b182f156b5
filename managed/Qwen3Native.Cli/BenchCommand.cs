using System.CommandLine;
using System.Globalization;
using Qwen3Native.Generation;

namespace Qwen3Native.Cli;

/// <summary>
/// <c>qwen3 bench</c>: a quick prefill and decode speed through the whole .NET stack, as a user would see it. The
/// engine's own benchmarks (bench/, <c>dotnet run build.cs -- bench</c>) are the careful measurements.
/// </summary>
internal static class BenchCommand
{
    public static Command Create(CliConsole console)
    {
        var model = new ModelArgs();
        var promptTokens = CliOptions.AtLeast(new Option<int>("--prompt-tokens")
        {
            Description = "Prompt length to prefill",
            HelpName = "N",
            DefaultValueFactory = _ => 128,
        }, 1);
        var newTokens = CliOptions.AtLeast(new Option<int>("--new-tokens")
        {
            Description = "Tokens to decode after the prompt",
            HelpName = "N",
            DefaultValueFactory = _ => 32,
        }, 1);
        var dummy = new Option<bool>("--dummy") { Description = "Seeded random weights of the config's shapes: needs config.json only" };
        var json = new Option<bool>("--json") { Description = "Print one JSON object" };

        var command = new Command("bench", "Prefill and decode tokens/s of one greedy request with random prompt tokens");
        model.AddTo(command);
        command.Add(promptTokens);
        command.Add(newTokens);
        command.Add(dummy);
        command.Add(json);
        command.SetAction(Cli.Guard(console, async (r, cancellationToken) =>
        {
            using var interrupt = console.Interrupts.Begin(cancellationToken);
            var format = r.GetValue(dummy) ? LoadFormat.Dummy : LoadFormat.Safetensors;
            using var m = await ModelLoading.LoadAsync(model.Directory(r), model.ToOptions(r, format), console, interrupt.Token);
            int n = r.GetValue(promptTokens);
            int generate = r.GetValue(newTokens);
            if (n + generate > m.Info.ContextLength)
                throw new CliException($"--prompt-tokens {n} plus --new-tokens {generate} exceed the context of {m.Info.ContextLength} tokens; " +
                    "pass a larger --context or fewer tokens.", Cli.ExitUsage);

            // Random ids rather than text: the figure should not depend on a tokenizer or on a prompt's content. Seeded,
            // so that two runs process the same tokens.
            // Ids the tokenizer knows, not the padding rows past it, so that the prompt is one some text could give.
            var random = new Random(1234);
            int vocabulary = m.HasTokenizer ? Math.Min(m.Tokenizer.VocabSize, m.Info.VocabSize) : m.Info.VocabSize;
            int[] prompt = Enumerable.Range(0, n).Select(_ => random.Next(vocabulary)).ToArray();
            // IgnoreEos: every run decodes the same number of tokens, whatever the model would say.
            var sampling = SamplingOptions.Greedy with { IgnoreEos = true };

            // A short warm-up first: the first request pays for page faults on the weights and for thread start-up.
            await m.GenerateAsync(prompt.Take(Math.Min(n, 16)).ToArray(), sampling with { MaxTokens = 2 }, interrupt.Token);
            var result = await m.GenerateAsync(prompt, sampling with { MaxTokens = generate }, interrupt.Token);
            var s = result.Stats;

            if (r.GetValue(json))
            {
                console.Out.WriteLine(Output.Json(w =>
                {
                    w.WriteStartObject();
                    w.WriteString("architecture", m.Info.Architecture);
                    w.WriteString("weight_dtype", m.Info.WeightDtype.ToString());
                    w.WriteString("device", m.Info.Device.ToString());
                    w.WriteBoolean("dummy_weights", format == LoadFormat.Dummy);
                    w.WriteNumber("prompt_tokens", n);
                    w.WriteNumber("new_tokens", result.TokenIds.Count);
                    w.WriteNumber("prefill_tokens_per_s", Math.Round(s.PrefillTokensPerSecond, 3));
                    w.WriteNumber("decode_tokens_per_s", Math.Round(s.DecodeTokensPerSecond, 3));
                    w.WriteNumber("time_to_first_token_ms", Math.Round(s.TimeToFirstToken.TotalMilliseconds, 3));
                    w.WriteEndObject();
                }));
                return Cli.ExitOk;
            }
            var c = CultureInfo.InvariantCulture;
            console.Out.WriteLine(string.Create(c, $"model:   {m.Info.Architecture}, {m.Info.WeightDtype} weights{(format == LoadFormat.Dummy ? " (dummy)" : "")}, {m.Info.Device}"));
            console.Out.WriteLine(string.Create(c, $"prefill: {n} tokens in {s.PrefillTime.TotalMilliseconds:0.0} ms = {s.PrefillTokensPerSecond:0.0} tokens/s"));
            console.Out.WriteLine(string.Create(c, $"decode:  {result.TokenIds.Count} tokens at {s.DecodeTokensPerSecond:0.0} tokens/s"));
            console.Out.WriteLine(string.Create(c, $"time to first token: {s.TimeToFirstToken.TotalMilliseconds:0.0} ms"));
            return Cli.ExitOk;
        }));
        return command;
    }
}
