using System.Buffers;
using System.Globalization;
using System.Text;
using System.Text.Encodings.Web;
using System.Text.Json;
using Qwen3Native.Generation;

namespace Qwen3Native.Cli;

/// <summary>JSON and text renderings shared by the commands. JSON is written by hand (no reflection), one object per line.</summary>
internal static class Output
{
    // Model text is printed as it is (UTF-8), not as \uXXXX escapes: the output is for terminals and scripts, not HTML.
    private static readonly JsonWriterOptions s_json = new() { Encoder = JavaScriptEncoder.UnsafeRelaxedJsonEscaping };

    public static string Json(Action<Utf8JsonWriter> write)
    {
        var buffer = new ArrayBufferWriter<byte>();
        using (var writer = new Utf8JsonWriter(buffer, s_json))
            write(writer);
        return Encoding.UTF8.GetString(buffer.WrittenSpan);
    }

    public static void WriteIds(Utf8JsonWriter w, string name, IEnumerable<int> ids)
    {
        w.WriteStartArray(name);
        foreach (int id in ids)
            w.WriteNumberValue(id);
        w.WriteEndArray();
    }

    public static void WriteLogprobs(Utf8JsonWriter w, string name, IEnumerable<TokenLogprob> logprobs)
    {
        w.WriteStartArray(name);
        foreach (var lp in logprobs)
        {
            w.WriteStartObject();
            w.WriteNumber("id", lp.TokenId);
            w.WriteString("text", lp.Text);
            w.WriteNumber("logprob", lp.Logprob);
            w.WriteStartArray("top");
            foreach (var alt in lp.TopLogprobs)
            {
                w.WriteStartObject();
                w.WriteNumber("id", alt.TokenId);
                w.WriteString("text", alt.Text);
                w.WriteNumber("logprob", alt.Logprob);
                w.WriteEndObject();
            }
            w.WriteEndArray();
            w.WriteEndObject();
        }
        w.WriteEndArray();
    }

    public static void WriteUsage(Utf8JsonWriter w, GenerationUsage usage)
    {
        w.WriteStartObject("usage");
        w.WriteNumber("prompt_tokens", usage.PromptTokens);
        w.WriteNumber("cached_tokens", usage.CachedPromptTokens);
        w.WriteNumber("generated_tokens", usage.GeneratedTokens);
        w.WriteEndObject();
    }

    public static void WriteStats(Utf8JsonWriter w, GenerationStats stats)
    {
        w.WriteStartObject("stats");
        w.WriteNumber("prompt_tokens", stats.PromptTokens);
        w.WriteNumber("cached_tokens", stats.CachedPromptTokens);
        w.WriteNumber("prefilled_tokens", stats.PrefilledTokens);
        w.WriteNumber("generated_tokens", stats.GeneratedTokens);
        w.WriteNumber("time_to_first_token_ms", Round(stats.TimeToFirstToken.TotalMilliseconds));
        w.WriteNumber("prefill_ms", Round(stats.PrefillTime.TotalMilliseconds));
        w.WriteNumber("prefill_tokens_per_s", Round(stats.PrefillTokensPerSecond));
        w.WriteNumber("decode_tokens_per_s", Round(stats.DecodeTokensPerSecond));
        w.WriteEndObject();
    }

    public static string FinishReasonName(FinishReason reason) => reason switch
    {
        FinishReason.Stop => "stop",
        FinishReason.Length => "length",
        _ => "cancelled",
    };

    /// <summary>One line for stderr: counts and timings.</summary>
    public static string StatsLine(GenerationStats s) => FormattableString.Invariant(
        $"prompt {s.PromptTokens} tokens ({s.CachedPromptTokens} cached), generated {s.GeneratedTokens}; time to first token {s.TimeToFirstToken.TotalMilliseconds:0.0} ms, prefill {s.PrefillTokensPerSecond:0.0} tokens/s, decode {s.DecodeTokensPerSecond:0.0} tokens/s");

    /// <summary>Log-probabilities as a readable table for stderr, one token a line with its alternatives.</summary>
    public static void WriteLogprobTable(TextWriter writer, string title, IReadOnlyList<TokenLogprob> logprobs)
    {
        writer.WriteLine(title);
        foreach (var lp in logprobs)
        {
            var line = new StringBuilder();
            line.Append(CultureInfo.InvariantCulture, $"{lp.TokenId,8} {lp.Logprob,10:0.0000}  {Quote(lp.Text)}");
            if (lp.TopLogprobs.Count > 0)
            {
                line.Append("  |");
                foreach (var alt in lp.TopLogprobs)
                    line.Append(CultureInfo.InvariantCulture, $" {Quote(alt.Text)} {alt.Logprob:0.000}");
            }
            writer.WriteLine(line.ToString());
        }
    }

    /// <summary>Token text in quotes with its control characters visible (a token is often just "\n" or a space).</summary>
    public static string Quote(string text)
    {
        var sb = new StringBuilder(text.Length + 2).Append('"');
        foreach (char c in text)
        {
            switch (c)
            {
                case '\n': sb.Append("\\n"); break;
                case '\r': sb.Append("\\r"); break;
                case '\t': sb.Append("\\t"); break;
                case '"': sb.Append("\\\""); break;
                case '\\': sb.Append("\\\\"); break;
                default:
                    if (char.IsControl(c))
                        sb.Append(CultureInfo.InvariantCulture, $"\\u{(int)c:x4}");
                    else
                        sb.Append(c);
                    break;
            }
        }
        return sb.Append('"').ToString();
    }

    // Timings to a microsecond and speeds to a thousandth are all the precision they have.
    private static double Round(double value) => Math.Round(value, 3);
}
