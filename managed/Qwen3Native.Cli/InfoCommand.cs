using System.CommandLine;
using System.Globalization;
using Qwen3Native.Generation;

namespace Qwen3Native.Cli;

/// <summary><c>qwen3 info</c>: what a checkpoint is and how it loads.</summary>
internal static class InfoCommand
{
    public static Command Create(CliConsole console)
    {
        var model = new ModelArgs();
        var json = new Option<bool>("--json") { Description = "Print one JSON object" };
        var command = new Command("info", "Architecture, sizes, data types, context, end-of-sequence ids, chat template and engine version");
        model.AddTo(command);
        command.Add(json);
        command.SetAction(Cli.Guard(console, async (r, cancellationToken) =>
        {
            using var interrupt = console.Interrupts.Begin(cancellationToken);
            using var m = await ModelLoading.LoadAsync(model.Directory(r), model.ToOptions(r), console, interrupt.Token);
            var rows = Describe(m);
            if (r.GetValue(json))
            {
                console.Out.WriteLine(Output.Json(w =>
                {
                    w.WriteStartObject();
                    foreach (var (key, _, value) in rows)
                    {
                        switch (value)
                        {
                            case long n: w.WriteNumber(key, n); break;
                            case int n: w.WriteNumber(key, n); break;
                            case IReadOnlyList<int> ids: Output.WriteIds(w, key, ids); break;
                            case null: w.WriteNull(key); break;
                            default: w.WriteString(key, Convert.ToString(value, CultureInfo.InvariantCulture)); break;
                        }
                    }
                    w.WriteEndObject();
                }));
                return Cli.ExitOk;
            }
            int width = rows.Max(row => row.Label.Length);
            foreach (var (_, label, value) in rows)
                console.Out.WriteLine($"{(label + ":").PadRight(width + 2)}{Text(value)}");
            return Cli.ExitOk;
        }));
        return command;
    }

    private static List<(string Key, string Label, object? Value)> Describe(Qwen3Model m)
    {
        var i = m.Info;
        var d = m.GenerationDefaults;
        return
        [
            ("architecture", "Architecture", i.Architecture),
            ("directory", "Directory", m.Directory),
            ("parameters", "Parameters", i.ParameterCount),
            ("weight_bytes", "Weight bytes", i.WeightBytes),
            ("weight_dtype", "Weight dtype", i.WeightDtype.ToString()),
            ("layers", "Layers", i.NumLayers),
            ("hidden_size", "Hidden size", i.HiddenSize),
            ("intermediate_size", "Intermediate size", i.IntermediateSize),
            ("attention_heads", "Attention heads", i.NumAttentionHeads),
            ("kv_heads", "KV heads", i.NumKeyValueHeads),
            ("head_dim", "Head dim", i.HeadDim),
            ("vocab_size", "Vocabulary", i.VocabSize),
            ("max_position_embeddings", "Max positions", i.MaxPositionEmbeddings),
            ("context_length", "Context (loaded)", i.ContextLength),
            ("kv_cache_tokens", "KV cache tokens", i.KvCacheTokens),
            ("kv_cache_dtype", "KV cache dtype", i.KvCacheDtype.ToString()),
            ("device", "Device", i.Device.ToString()),
            ("bos_token_id", "BOS id", i.BosTokenId),
            ("eos_token_ids", "EOS ids", i.EosTokenIds),
            ("vision", "Vision", i.HasVision
                ? $"images and videos (patch {i.PatchSize}, temporal patch {i.TemporalPatchSize}, merge {i.SpatialMergeSize})"
                : "none (text only)"),
            ("chat_template", "Chat template", m.ChatTemplate.Kind.ToString()),
            ("chat_template_note", "Template note", m.ChatTemplateNote),
            ("tokenizer", "Tokenizer", m.HasTokenizer ? $"{m.Tokenizer.VocabSize} tokens" : "none (no tokenizer.json)"),
            ("generation_defaults", "Sampling defaults", Sampling(d)),
            ("native_version", "Native engine", Qwen3Model.NativeVersion),
        ];
    }

    private static string Sampling(SamplingOptions d) => d.IsGreedy
        ? "greedy" + (d.MaxTokens is int max ? $", max {max} tokens" : "")
        : FormattableString.Invariant($"temperature {d.Temperature}, top_k {d.TopK}, top_p {d.TopP}, min_p {d.MinP}") +
            (d.RepetitionPenalty != 1f ? FormattableString.Invariant($", repetition_penalty {d.RepetitionPenalty}") : "") +
            (d.MaxTokens is int n ? $", max {n} tokens" : "");

    private static string Text(object? value) => value switch
    {
        null => "-",
        IReadOnlyList<int> ids => string.Join(", ", ids),
        long n => n.ToString("N0", CultureInfo.InvariantCulture),
        _ => Convert.ToString(value, CultureInfo.InvariantCulture) ?? "",
    };
}
