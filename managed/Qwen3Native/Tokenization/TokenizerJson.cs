using System.Text.Json;
using System.Text.RegularExpressions;

namespace Qwen3Native.Tokenization;

/// <summary>
/// Reads the parts of a Hugging Face tokenizer.json that byte-level BPE tokenizers (Qwen2/Qwen3, GPT-2 style)
/// use. Anything that would change ids and is not implemented is rejected with
/// <see cref="TokenizerFormatException"/> instead of being ignored.
/// </summary>
internal static class TokenizerJson
{
    // ByteLevel's own split pattern when "use_regex" is true (GPT-2's).
    private const string Gpt2Pattern = @"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

    public static Qwen3Tokenizer Load(JsonElement root)
    {
        if (root.ValueKind != JsonValueKind.Object)
            throw new TokenizerFormatException("tokenizer.json must contain a JSON object.");

        if (!root.TryGetProperty("model", out var modelJson) || modelJson.ValueKind != JsonValueKind.Object)
            throw new TokenizerFormatException("tokenizer.json has no \"model\" object.");
        var model = LoadModel(modelJson);
        bool nfc = LoadNormalizer(Optional(root, "normalizer"));
        var preTokenizer = LoadPreTokenizer(Optional(root, "pre_tokenizer"));
        CheckDecoder(Optional(root, "decoder"));
        var added = LoadAddedTokens(Optional(root, "added_tokens"));
        return Qwen3Tokenizer.Create(model, preTokenizer, nfc, added);
    }

    private static JsonElement? Optional(JsonElement obj, string name) =>
        obj.TryGetProperty(name, out var v) && v.ValueKind != JsonValueKind.Null ? v : null;

    private static string TypeOf(JsonElement obj, string what)
    {
        if (obj.ValueKind != JsonValueKind.Object)
            throw new TokenizerFormatException($"{what} must be a JSON object.");
        if (!obj.TryGetProperty("type", out var t) || t.ValueKind != JsonValueKind.String)
            throw new TokenizerFormatException($"{what} has no \"type\".");
        return t.GetString()!;
    }

    private static bool Flag(JsonElement obj, string name, bool defaultValue)
    {
        if (!obj.TryGetProperty(name, out var v) || v.ValueKind == JsonValueKind.Null) return defaultValue;
        return v.ValueKind switch
        {
            JsonValueKind.True => true,
            JsonValueKind.False => false,
            _ => throw new TokenizerFormatException($"\"{name}\" must be true or false."),
        };
    }

    private static BpeModel LoadModel(JsonElement model)
    {
        // Old files omit "type"; HF then recognises BPE by its fields.
        if (model.TryGetProperty("type", out var typeJson) && typeJson.ValueKind != JsonValueKind.Null)
        {
            string? type = typeJson.ValueKind == JsonValueKind.String ? typeJson.GetString() : typeJson.ToString();
            if (type != "BPE")
                throw new TokenizerFormatException($"Tokenizer model type '{type}' is not supported; only byte-level BPE is.");
        }
        if (!model.TryGetProperty("vocab", out var vocabJson) || vocabJson.ValueKind != JsonValueKind.Object)
            throw new TokenizerFormatException("The BPE model has no \"vocab\" object.");
        if (!model.TryGetProperty("merges", out var mergesJson) || mergesJson.ValueKind != JsonValueKind.Array)
            throw new TokenizerFormatException("The BPE model has no \"merges\" array.");

        if (Optional(model, "dropout") is { } dropout && (dropout.ValueKind != JsonValueKind.Number || dropout.GetDouble() != 0))
            throw new TokenizerFormatException("BPE dropout is not supported (it makes encoding random).");
        foreach (var name in new[] { "continuing_subword_prefix", "end_of_word_suffix" })
        {
            if (Optional(model, name) is { } v && (v.ValueKind != JsonValueKind.String || v.GetString()!.Length != 0))
                throw new TokenizerFormatException($"BPE \"{name}\" is not supported.");
        }
        if (Flag(model, "byte_fallback", false))
            throw new TokenizerFormatException("BPE \"byte_fallback\" is not supported.");
        string? unk = Optional(model, "unk_token") is { } u ? u.GetString() : null;

        var vocab = new Dictionary<string, int>(vocabJson.GetPropertyCount(), StringComparer.Ordinal);
        foreach (var entry in vocabJson.EnumerateObject())
        {
            if (entry.Value.ValueKind != JsonValueKind.Number || !entry.Value.TryGetInt32(out int id) || id < 0)
                throw new TokenizerFormatException($"Vocabulary entry '{entry.Name}' has no valid id.");
            vocab[entry.Name] = id;
        }

        var merges = new List<(string, string)>(mergesJson.GetArrayLength());
        int line = 0;
        foreach (var m in mergesJson.EnumerateArray())
        {
            line++;
            if (m.ValueKind == JsonValueKind.Array && m.GetArrayLength() == 2 &&
                m[0].ValueKind == JsonValueKind.String && m[1].ValueKind == JsonValueKind.String)
            {
                merges.Add((m[0].GetString()!, m[1].GetString()!));
            }
            else if (m.ValueKind == JsonValueKind.String)
            {
                // Legacy "left right" lines, split on single spaces exactly as HF does.
                string s = m.GetString()!;
                if (s.StartsWith("#version", StringComparison.Ordinal)) continue;
                string[] parts = s.Split(' ');
                if (parts.Length != 2)
                    throw new TokenizerFormatException($"Merge #{line} \"{s}\" is not two space-separated tokens.");
                merges.Add((parts[0], parts[1]));
            }
            else
            {
                throw new TokenizerFormatException($"Merge #{line} is neither a \"left right\" string nor a [left, right] pair.");
            }
        }

        return new BpeModel(vocab, merges, new BpeOptions(unk, Flag(model, "fuse_unk", false), Flag(model, "ignore_merges", false)));
    }

    /// <returns>Whether NFC applies.</returns>
    private static bool LoadNormalizer(JsonElement? normalizer)
    {
        if (normalizer is null) return false;
        string type = TypeOf(normalizer.Value, "normalizer");
        switch (type)
        {
            case "NFC":
                return true;
            case "Sequence":
                bool any = false;
                foreach (var inner in normalizer.Value.GetProperty("normalizers").EnumerateArray())
                    any |= LoadNormalizer(inner);
                return any;
            default:
                throw new TokenizerFormatException($"Normalizer type '{type}' is not supported; only NFC is.");
        }
    }

    private static PreTokenizer LoadPreTokenizer(JsonElement? json)
    {
        if (json is null)
            throw new TokenizerFormatException("tokenizer.json has no \"pre_tokenizer\"; a ByteLevel pre-tokenizer is required.");
        var list = new List<JsonElement>();
        if (TypeOf(json.Value, "pre_tokenizer") == "Sequence")
        {
            if (!json.Value.TryGetProperty("pretokenizers", out var items) || items.ValueKind != JsonValueKind.Array)
                throw new TokenizerFormatException("Sequence pre-tokenizer has no \"pretokenizers\" array.");
            list.AddRange(items.EnumerateArray());
        }
        else
        {
            list.Add(json.Value);
        }

        var steps = new List<PreTokenSplitter>();
        bool sawByteLevel = false;
        foreach (var item in list)
        {
            string type = TypeOf(item, "pre-tokenizer");
            if (sawByteLevel)
                throw new TokenizerFormatException($"Pre-tokenizer '{type}' after ByteLevel is not supported.");
            switch (type)
            {
                case "Split":
                    steps.Add(LoadSplit(item));
                    break;
                case "ByteLevel":
                    if (Flag(item, "add_prefix_space", true))
                        throw new TokenizerFormatException("ByteLevel add_prefix_space = true is not supported.");
                    if (Flag(item, "use_regex", true)) steps.Add(MakeRegexSplitter(Gpt2Pattern));
                    sawByteLevel = true;
                    break;
                default:
                    throw new TokenizerFormatException($"Pre-tokenizer type '{type}' is not supported.");
            }
        }
        if (!sawByteLevel)
            throw new TokenizerFormatException("The pre-tokenizer has no ByteLevel step; only byte-level BPE is supported.");
        return new PreTokenizer(steps.ToArray());
    }

    private static PreTokenSplitter LoadSplit(JsonElement split)
    {
        string behavior = split.TryGetProperty("behavior", out var b) && b.ValueKind == JsonValueKind.String ? b.GetString()! : "";
        if (behavior != "Isolated")
            throw new TokenizerFormatException($"Split behavior '{behavior}' is not supported; only Isolated is.");
        if (Flag(split, "invert", false))
            throw new TokenizerFormatException("Split with invert = true is not supported.");
        if (!split.TryGetProperty("pattern", out var pattern) || pattern.ValueKind != JsonValueKind.Object)
            throw new TokenizerFormatException("Split pre-tokenizer has no \"pattern\".");
        if (pattern.TryGetProperty("Regex", out var regex) && regex.ValueKind == JsonValueKind.String)
        {
            string r = regex.GetString()!;
            return r == QwenSplitter.Pattern ? QwenSplitter.Instance : MakeRegexSplitter(r);
        }
        if (pattern.TryGetProperty("String", out var literal) && literal.ValueKind == JsonValueKind.String)
            return MakeRegexSplitter(Regex.Escape(literal.GetString()!));
        throw new TokenizerFormatException("Split pattern must be {\"Regex\": ...} or {\"String\": ...}.");
    }

    private static RegexSplitter MakeRegexSplitter(string pattern)
    {
        try
        {
            return new RegexSplitter(pattern);
        }
        catch (ArgumentException e)
        {
            throw new TokenizerFormatException($"Pre-tokenizer pattern '{pattern}' is not a valid .NET regular expression.", e);
        }
    }

    private static void CheckDecoder(JsonElement? decoder)
    {
        if (decoder is null)
            throw new TokenizerFormatException("tokenizer.json has no \"decoder\"; a ByteLevel decoder is required.");
        string type = TypeOf(decoder.Value, "decoder");
        if (type != "ByteLevel")
            throw new TokenizerFormatException($"Decoder type '{type}' is not supported; only ByteLevel is.");
    }

    private static List<AddedToken> LoadAddedTokens(JsonElement? json)
    {
        var result = new List<AddedToken>();
        if (json is null) return result;
        if (json.Value.ValueKind != JsonValueKind.Array)
            throw new TokenizerFormatException("\"added_tokens\" must be an array.");
        foreach (var t in json.Value.EnumerateArray())
        {
            if (t.ValueKind != JsonValueKind.Object ||
                !t.TryGetProperty("id", out var idJson) || !idJson.TryGetInt32(out int id) || id < 0 ||
                !t.TryGetProperty("content", out var contentJson) || contentJson.ValueKind != JsonValueKind.String)
                throw new TokenizerFormatException("Each added token needs an \"id\" and a \"content\".");
            bool special = Flag(t, "special", false);
            // HF's default for "normalized" is the opposite of "special".
            result.Add(new AddedToken(id, contentJson.GetString()!, special, Flag(t, "normalized", !special),
                Flag(t, "lstrip", false), Flag(t, "rstrip", false), Flag(t, "single_word", false)));
        }
        return result;
    }
}
