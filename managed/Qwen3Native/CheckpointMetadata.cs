using System.Text.Json;
using Qwen3Native.Chat;
using Qwen3Native.Generation;
using Qwen3Native.Vision;

namespace Qwen3Native;

/// <summary>Reads the files of a checkpoint directory that the engine itself does not use.</summary>
internal static class CheckpointMetadata
{
    /// <summary>
    /// generation_config.json as transformers' <c>generate()</c> reads it. With <c>do_sample</c> false or absent
    /// transformers decodes greedily whatever the temperature says, so greedy it is here too; unset sampling values take
    /// transformers' GenerationConfig defaults (temperature 1, top_k 50, top_p 1) so that the same file gives the same
    /// distribution. No file: greedy.
    /// </summary>
    public static SamplingOptions ReadGenerationDefaults(string directory)
    {
        string path = Path.Combine(directory, "generation_config.json");
        if (!File.Exists(path))
            return SamplingOptions.Greedy;

        using var doc = ParseJson(directory, path);
        var root = doc.RootElement;
        if (root.ValueKind != JsonValueKind.Object)
            throw Bad(directory, path, "the top level is not a JSON object");
        try
        {
            bool sample = root.TryGetProperty("do_sample", out var ds) && ds.ValueKind == JsonValueKind.True;
            var options = new SamplingOptions
            {
                RepetitionPenalty = Float(root, "repetition_penalty") ?? 1f,
                PresencePenalty = Float(root, "presence_penalty") ?? 0f,
                FrequencyPenalty = Float(root, "frequency_penalty") ?? 0f,
                MaxTokens = Int(root, "max_new_tokens"),
                StopTokenIds = IntList(root, "eos_token_id"),
            };
            if (sample)
            {
                options = options with
                {
                    Temperature = Float(root, "temperature") ?? 1f,
                    TopK = Int(root, "top_k") ?? 50,
                    TopP = Float(root, "top_p") ?? 1f,
                    MinP = Float(root, "min_p") ?? 0f,
                };
            }
            return options;
        }
        catch (Exception e) when (e is ArgumentException or FormatException or InvalidOperationException or OverflowException)
        {
            throw Bad(directory, path, e.Message, e);
        }
    }

    /// <summary>
    /// The checkpoint's chat template: chat_template.jinja (where transformers 4.43+ saves it, and which it prefers),
    /// then chat_template.json, then tokenizer_config.json's <c>chat_template</c> (a string, or a list of named templates
    /// of which "default" is used). Unknown or absent templates fall back to the Qwen3 hybrid template with a note.
    /// </summary>
    public static (Qwen3ChatTemplate Template, string? Note) ReadChatTemplate(string directory)
    {
        string? jinja = null;
        string? source = null;
        string jinjaPath = Path.Combine(directory, "chat_template.jinja");
        if (File.Exists(jinjaPath))
        {
            jinja = File.ReadAllText(jinjaPath);
            source = "chat_template.jinja";
        }
        else
        {
            foreach (var name in new[] { "chat_template.json", "tokenizer_config.json" })
            {
                string path = Path.Combine(directory, name);
                if (!File.Exists(path))
                    continue;
                using var doc = ParseJson(directory, path);
                if (doc.RootElement.ValueKind == JsonValueKind.Object
                    && doc.RootElement.TryGetProperty("chat_template", out var t))
                {
                    jinja = TemplateText(t);
                    source = name;
                    break;
                }
            }
        }

        if (jinja is null)
            return (Qwen3ChatTemplate.Hybrid, "The checkpoint has no chat template; the Qwen3 hybrid template is used.");
        var detected = Qwen3ChatTemplate.Detect(jinja);
        if (detected is null)
            return (Qwen3ChatTemplate.Hybrid,
                $"The chat template in {source} is not one of the known Qwen3 templates; the Qwen3 hybrid template is used, " +
                "and prompts may differ from what the checkpoint's own template would render.");
        return (detected, null);
    }

    /// <summary>
    /// The Qwen3-VL processor settings of preprocessor_config.json and video_preprocessor_config.json, read as
    /// transformers reads them: <c>size.shortest_edge</c>/<c>longest_edge</c> are pixel budgets, and the older top-level
    /// <c>min_pixels</c>/<c>max_pixels</c> win over them when present. A video without a file of its own takes the image
    /// file's patch sizes, mean and std (the processors share them) and keeps the video pixel budgets. Absent files and
    /// keys keep the released defaults.
    /// </summary>
    public static (Qwen3VLImageProcessorOptions Image, Qwen3VLVideoProcessorOptions Video) ReadProcessorOptions(string directory)
    {
        var image = Qwen3VLImageProcessorOptions.Default;
        var video = Qwen3VLVideoProcessorOptions.Default;
        string imagePath = Path.Combine(directory, "preprocessor_config.json");
        if (File.Exists(imagePath))
        {
            using var doc = ParseJson(directory, imagePath);
            var root = Object(directory, imagePath, doc);
            try
            {
                var (min, max) = PixelBudget(root);
                image = image with
                {
                    PatchSize = Int(root, "patch_size") ?? image.PatchSize,
                    TemporalPatchSize = Int(root, "temporal_patch_size") ?? image.TemporalPatchSize,
                    MergeSize = Int(root, "merge_size") ?? image.MergeSize,
                    MinPixels = min ?? image.MinPixels,
                    MaxPixels = max ?? image.MaxPixels,
                    ImageMean = Triple(root, "image_mean") ?? image.ImageMean,
                    ImageStd = Triple(root, "image_std") ?? image.ImageStd,
                };
            }
            catch (Exception e) when (e is FormatException or InvalidOperationException or OverflowException)
            {
                throw Bad(directory, imagePath, e.Message, e);
            }
            video = video with
            {
                PatchSize = image.PatchSize,
                TemporalPatchSize = image.TemporalPatchSize,
                MergeSize = image.MergeSize,
                ImageMean = image.ImageMean,
                ImageStd = image.ImageStd,
            };
        }

        string videoPath = Path.Combine(directory, "video_preprocessor_config.json");
        if (File.Exists(videoPath))
        {
            using var doc = ParseJson(directory, videoPath);
            var root = Object(directory, videoPath, doc);
            try
            {
                var (min, max) = PixelBudget(root);
                video = video with
                {
                    PatchSize = Int(root, "patch_size") ?? video.PatchSize,
                    TemporalPatchSize = Int(root, "temporal_patch_size") ?? video.TemporalPatchSize,
                    MergeSize = Int(root, "merge_size") ?? video.MergeSize,
                    MinPixels = min ?? video.MinPixels,
                    MaxPixels = max ?? video.MaxPixels,
                    ImageMean = Triple(root, "image_mean") ?? video.ImageMean,
                    ImageStd = Triple(root, "image_std") ?? video.ImageStd,
                    Fps = Float(root, "fps") ?? video.Fps,
                    MinFrames = Int(root, "min_frames") ?? video.MinFrames,
                    MaxFrames = Int(root, "max_frames") ?? video.MaxFrames,
                    NumFrames = Int(root, "num_frames") ?? video.NumFrames,
                };
            }
            catch (Exception e) when (e is FormatException or InvalidOperationException or OverflowException)
            {
                throw Bad(directory, videoPath, e.Message, e);
            }
        }
        return (image, video);
    }

    private static (long? Min, long? Max) PixelBudget(JsonElement root)
    {
        long? min = null, max = null;
        if (root.TryGetProperty("size", out var size) && size.ValueKind == JsonValueKind.Object)
        {
            min = Long(size, "shortest_edge");
            max = Long(size, "longest_edge");
        }
        return (Long(root, "min_pixels") ?? min, Long(root, "max_pixels") ?? max);
    }

    private static JsonElement Object(string directory, string path, JsonDocument doc) =>
        doc.RootElement.ValueKind == JsonValueKind.Object ? doc.RootElement : throw Bad(directory, path, "the top level is not a JSON object");

    private static long? Long(JsonElement root, string name)
    {
        if (!root.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null)
            return null;
        if (v.ValueKind != JsonValueKind.Number || !v.TryGetInt64(out long l))
            throw new FormatException($"{name} must be an integer, not {v.GetRawText()}.");
        return l;
    }

    private static float[]? Triple(JsonElement root, string name)
    {
        if (!root.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null)
            return null;
        if (v.ValueKind == JsonValueKind.Number)
            return [(float)v.GetDouble(), (float)v.GetDouble(), (float)v.GetDouble()];
        if (v.ValueKind != JsonValueKind.Array || v.GetArrayLength() != 3)
            throw new FormatException($"{name} must be a number or a list of three numbers (R, G, B), not {v.GetRawText()}.");
        var values = new float[3];
        int i = 0;
        foreach (var e in v.EnumerateArray())
        {
            if (e.ValueKind != JsonValueKind.Number)
                throw new FormatException($"{name} must hold numbers, not {e.GetRawText()}.");
            values[i++] = (float)e.GetDouble();
        }
        return values;
    }

    private static string? TemplateText(JsonElement t)
    {
        if (t.ValueKind == JsonValueKind.String)
            return t.GetString();
        if (t.ValueKind == JsonValueKind.Array)
        {
            foreach (var entry in t.EnumerateArray())
            {
                if (entry.ValueKind == JsonValueKind.Object
                    && entry.TryGetProperty("name", out var n) && n.ValueKind == JsonValueKind.String && n.GetString() == "default"
                    && entry.TryGetProperty("template", out var body) && body.ValueKind == JsonValueKind.String)
                    return body.GetString();
            }
        }
        return null;
    }

    private static JsonDocument ParseJson(string directory, string path)
    {
        try
        {
            using var stream = File.OpenRead(path);
            return JsonDocument.Parse(stream);
        }
        catch (JsonException e)
        {
            throw Bad(directory, path, "not valid JSON: " + e.Message, e);
        }
        catch (IOException e)
        {
            throw new ModelLoadException(Qwen3Status.Io, directory, $"Cannot read '{path}': {e.Message}", e);
        }
        catch (UnauthorizedAccessException e)
        {
            throw new ModelLoadException(Qwen3Status.Io, directory, $"Cannot read '{path}': {e.Message}", e);
        }
    }

    private static ModelLoadException Bad(string directory, string path, string why, Exception? inner = null) =>
        new(Qwen3Status.BadConfig, directory, $"'{path}' is malformed: {why}", inner);

    private static float? Float(JsonElement root, string name)
    {
        if (!root.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null)
            return null;
        if (v.ValueKind != JsonValueKind.Number)
            throw new FormatException($"{name} must be a number, not {v.ValueKind}.");
        return (float)v.GetDouble();
    }

    private static int? Int(JsonElement root, string name)
    {
        if (!root.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null)
            return null;
        if (v.ValueKind != JsonValueKind.Number || !v.TryGetInt32(out int i))
            throw new FormatException($"{name} must be an integer, not {v.GetRawText()}.");
        return i;
    }

    private static int[] IntList(JsonElement root, string name)
    {
        if (!root.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null)
            return Array.Empty<int>();
        if (v.ValueKind == JsonValueKind.Number)
            return [Int(root, name)!.Value];
        if (v.ValueKind != JsonValueKind.Array)
            throw new FormatException($"{name} must be an integer or a list of integers.");
        var ids = new List<int>();
        foreach (var e in v.EnumerateArray())
        {
            if (e.ValueKind != JsonValueKind.Number || !e.TryGetInt32(out int i))
                throw new FormatException($"{name} must hold integers, not {e.GetRawText()}.");
            ids.Add(i);
        }
        return ids.ToArray();
    }
}
