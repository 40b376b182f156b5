using System.CommandLine;
using System.CommandLine.Parsing;
using System.Globalization;
using System.Text;
using Qwen3Native.Chat;
using Qwen3Native.Generation;

namespace Qwen3Native.Cli;

/// <summary>The options of every command that loads a model: where it is and how to load it.</summary>
internal sealed class ModelArgs
{
    public Option<string> Model { get; } = new("--model", "-m")
    {
        Description = "Checkpoint directory: config.json, model.safetensors (or a sharded index), tokenizer.json",
        HelpName = "DIR",
        Required = true,
    };

    public Option<string> Device { get; } = new Option<string>("--device")
    {
        Description = "Where to run: cpu, cuda, or auto (CUDA when this build has it and a GPU is present)",
        DefaultValueFactory = _ => "auto",
    }.AcceptOnlyFromAmong("cpu", "cuda", "auto");

    public Option<int> Context { get; } = CliOptions.AtLeast(new Option<int>("--context")
    {
        Description = "Context length in tokens (prompt plus output); 0 = the model's, at most 32768",
        HelpName = "N",
    }, 0);

    public Option<int> Threads { get; } = CliOptions.AtLeast(new Option<int>("--threads")
    {
        Description = "CPU worker threads; 0 = every core",
        HelpName = "N",
    }, 0);

    public void AddTo(Command command)
    {
        command.Add(Model);
        command.Add(Device);
        command.Add(Context);
        command.Add(Threads);
    }

    public string Directory(ParseResult r) => r.GetRequiredValue(Model);

    public ModelOptions ToOptions(ParseResult r, LoadFormat format = LoadFormat.Safetensors) => new()
    {
        Device = r.GetValue(Device) switch
        {
            "cpu" => Qwen3Device.Cpu,
            "cuda" => Qwen3Device.Cuda,
            _ => Qwen3Device.Auto,
        },
        ContextLength = r.GetValue(Context),
        Threads = r.GetValue(Threads),
        LoadFormat = format,
    };
}

/// <summary>
/// Sampling flags. Each one that is given overrides the model's generation_config.json (read as transformers reads
/// it); the ones that are not keep the model's values.
/// </summary>
internal sealed class SamplingArgs
{
    public Option<int?> MaxTokens { get; } = CliOptions.Check(new Option<int?>("--max-tokens", "-n")
    {
        Description = "Most tokens to generate; default: generation_config.json's max_new_tokens, else until a stop or the end of the context",
        HelpName = "N",
    }, v => v > 0, "greater than 0");

    public Option<float?> Temperature { get; } = CliOptions.Check(new Option<float?>("--temperature", "-t")
    {
        Description = "0 = greedy (most likely token); default: the model's",
        HelpName = "T",
    }, v => float.IsFinite(v) && v >= 0, "finite and >= 0");

    public Option<int?> TopK { get; } = CliOptions.Check(new Option<int?>("--top-k")
    {
        Description = "Keep the K most likely tokens; 0 = off",
        HelpName = "K",
    }, v => v >= 0, ">= 0");

    public Option<float?> TopP { get; } = CliOptions.Check(new Option<float?>("--top-p")
    {
        Description = "Nucleus sampling in (0, 1]; 1 = off",
        HelpName = "P",
    }, v => v > 0 && v <= 1, "in (0, 1]");

    public Option<float?> MinP { get; } = CliOptions.Check(new Option<float?>("--min-p")
    {
        Description = "Drop tokens less likely than P times the most likely, in [0, 1]; 0 = off",
        HelpName = "P",
    }, v => v >= 0 && v <= 1, "in [0, 1]");

    public Option<float?> RepetitionPenalty { get; } = CliOptions.Check(new Option<float?>("--repetition-penalty")
    {
        Description = "transformers' repetition penalty, on every token of the sequence; 1 = off",
        HelpName = "R",
    }, v => float.IsFinite(v) && v > 0, "finite and > 0");

    public Option<float?> PresencePenalty { get; } = CliOptions.Check(new Option<float?>("--presence-penalty")
    {
        Description = "OpenAI's presence penalty on generated tokens, in [-2, 2]; 0 = off",
        HelpName = "P",
    }, v => v >= -2 && v <= 2, "in [-2, 2]");

    public Option<float?> FrequencyPenalty { get; } = CliOptions.Check(new Option<float?>("--frequency-penalty")
    {
        Description = "OpenAI's frequency penalty on generated tokens, in [-2, 2]; 0 = off",
        HelpName = "F",
    }, v => v >= -2 && v <= 2, "in [-2, 2]");

    public Option<ulong?> Seed { get; } = new("--seed", "-s")
    {
        Description = "Random seed; the same seed, prompt and flags give the same output. Default: a fresh one",
        HelpName = "S",
    };

    public Option<string[]> Stop { get; } = new("--stop")
    {
        Description = "Stop when the text contains S (repeatable; \\n, \\t and \\\\ are unescaped); S is left out of the output",
        HelpName = "S",
        AllowMultipleArgumentsPerToken = true,
    };

    public void AddTo(Command command)
    {
        command.Add(MaxTokens);
        command.Add(Temperature);
        command.Add(TopK);
        command.Add(TopP);
        command.Add(MinP);
        command.Add(RepetitionPenalty);
        command.Add(PresencePenalty);
        command.Add(FrequencyPenalty);
        command.Add(Seed);
        command.Add(Stop);
    }

    public SamplingOptions Apply(ParseResult r, SamplingOptions defaults)
    {
        var s = defaults;
        if (r.GetValue(MaxTokens) is int max)
            s = s with { MaxTokens = max };
        if (r.GetValue(Temperature) is float temperature)
            s = s with { Temperature = temperature };
        if (r.GetValue(TopK) is int topK)
            s = s with { TopK = topK };
        if (r.GetValue(TopP) is float topP)
            s = s with { TopP = topP };
        if (r.GetValue(MinP) is float minP)
            s = s with { MinP = minP };
        if (r.GetValue(RepetitionPenalty) is float repetition)
            s = s with { RepetitionPenalty = repetition };
        if (r.GetValue(PresencePenalty) is float presence)
            s = s with { PresencePenalty = presence };
        if (r.GetValue(FrequencyPenalty) is float frequency)
            s = s with { FrequencyPenalty = frequency };
        if (r.GetValue(Seed) is ulong seed)
            s = s with { Seed = seed };
        if (r.GetValue(Stop) is { Length: > 0 } stops)
            s = s with { StopStrings = stops.Select(CliOptions.Unescape).ToArray() };
        return s;
    }
}

/// <summary>Images and videos attached to the user's message (Qwen3-VL models).</summary>
internal sealed class MediaArgs
{
    public Option<string[]> Images { get; } = new("--image")
    {
        Description = "Attach a JPEG, PNG or WebP image to the user message (repeatable; Qwen3-VL models)",
        HelpName = "PATH",
    };

    public Option<string[]> Videos { get; } = new("--video")
    {
        Description = "Attach a video to the user message (repeatable; Qwen3-VL models; decoded with ffmpeg, which must be on PATH)",
        HelpName = "PATH",
    };

    public void AddTo(Command command)
    {
        command.Add(Images);
        command.Add(Videos);
    }

    public bool AnyGiven(ParseResult r) => r.GetValue(Images) is { Length: > 0 } || r.GetValue(Videos) is { Length: > 0 };

    /// <summary>The parts to put before the message text: images first, then videos, each in the order given.</summary>
    /// <exception cref="CliException">A file does not exist (checked before the model is loaded).</exception>
    public List<ChatContentPart> Parts(ParseResult r)
    {
        var parts = new List<ChatContentPart>();
        foreach (var path in r.GetValue(Images) ?? [])
            parts.Add(ImagePart.FromFile(Existing(path, "--image")));
        foreach (var path in r.GetValue(Videos) ?? [])
            parts.Add(VideoPart.FromFile(Existing(path, "--video")));
        return parts;
    }

    /// <summary>Refuses media for a model without a vision tower, before a message is sent.</summary>
    public static void CheckModel(Qwen3Model model)
    {
        if (!model.Info.HasVision)
            throw new CliException(
                $"This model ({model.Info.Architecture}) has no vision tower, so it cannot look at images or videos; " +
                "--image and --video need a Qwen3-VL checkpoint.");
    }

    internal static string Existing(string path, string flag) =>
        File.Exists(path) ? path : throw new CliException($"{flag}: the file '{path}' does not exist.", Cli.ExitUsage);
}

internal static class CliOptions
{
    /// <summary>Adds a range check that fails parsing (exit code 2) with a message naming the flag.</summary>
    public static Option<T?> Check<T>(Option<T?> option, Func<T, bool> valid, string rule) where T : struct
    {
        option.Validators.Add(result =>
        {
            if (result.GetValueOrDefault<T?>() is T value && !valid(value))
                result.AddError($"{option.Name} must be {rule}; got {Format(value)}.");
        });
        return option;
    }

    public static Option<int> AtLeast(Option<int> option, int minimum)
    {
        option.Validators.Add(result =>
        {
            int value = result.GetValueOrDefault<int>();
            if (value < minimum)
                result.AddError($"{option.Name} must be >= {minimum}; got {value}.");
        });
        return option;
    }

    /// <summary>Token ids as "1,2,3" (spaces allowed too), for --prompt-ids.</summary>
    public static int[]? ParseIds(ArgumentResult result)
    {
        var ids = new List<int>();
        foreach (var token in result.Tokens)
        {
            foreach (var part in token.Value.Split([',', ' '], StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
            {
                if (!int.TryParse(part, NumberStyles.None, CultureInfo.InvariantCulture, out int id))
                {
                    result.AddError($"--prompt-ids takes comma-separated token ids (non-negative integers); '{part}' is not one.");
                    return null;
                }
                ids.Add(id);
            }
        }
        if (ids.Count == 0)
        {
            result.AddError("--prompt-ids needs at least one token id.");
            return null;
        }
        return ids.ToArray();
    }

    /// <summary>A shell passes "\n" as a backslash and an n; a stop string of a newline is common enough to allow writing it.</summary>
    public static string Unescape(string value)
    {
        if (!value.Contains('\\'))
            return value;
        var sb = new StringBuilder(value.Length);
        for (int i = 0; i < value.Length; i++)
        {
            char c = value[i];
            if (c == '\\' && i + 1 < value.Length)
            {
                char next = value[i + 1];
                char? replaced = next switch { 'n' => '\n', 't' => '\t', 'r' => '\r', '\\' => '\\', _ => null };
                if (replaced is char r)
                {
                    sb.Append(r);
                    i++;
                    continue;
                }
            }
            sb.Append(c);
        }
        return sb.ToString();
    }

    private static string Format<T>(T value) => value is IFormattable f ? f.ToString(null, CultureInfo.InvariantCulture) : $"{value}";
}
