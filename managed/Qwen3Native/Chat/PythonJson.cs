using System.Globalization;
using System.Text;
using System.Text.Json;

namespace Qwen3Native.Chat;

/// <summary>
/// Writes a JSON value the way transformers' <c>tojson</c> template filter does, which is
/// <c>json.dumps(x, ensure_ascii=False)</c> on the Python object that the JSON was loaded into: separators
/// <c>", "</c> and <c>": "</c>, key order kept, non-ASCII left raw, numbers as Python prints an int or a float.
/// </summary>
internal static class PythonJson
{
    public static string Serialize(JsonElement value)
    {
        var sb = new StringBuilder();
        Write(sb, value);
        return sb.ToString();
    }

    public static void Write(StringBuilder sb, JsonElement value)
    {
        switch (value.ValueKind)
        {
            case JsonValueKind.Object:
                WriteObject(sb, value);
                break;
            case JsonValueKind.Array:
                sb.Append('[');
                bool first = true;
                foreach (var item in value.EnumerateArray())
                {
                    if (!first)
                        sb.Append(", ");
                    first = false;
                    Write(sb, item);
                }
                sb.Append(']');
                break;
            case JsonValueKind.String:
                WriteString(sb, value.GetString()!);
                break;
            case JsonValueKind.Number:
                WriteNumber(sb, value.GetRawText());
                break;
            case JsonValueKind.True:
                sb.Append("true");
                break;
            case JsonValueKind.False:
                sb.Append("false");
                break;
            case JsonValueKind.Null:
                sb.Append("null");
                break;
            default:
                throw new ArgumentException($"Cannot serialize a JSON value of kind {value.ValueKind}.", nameof(value));
        }
    }

    private static void WriteObject(StringBuilder sb, JsonElement obj)
    {
        // A Python dict keeps one entry per key: where the key first appeared, with the value it got last.
        var keys = new List<string>();
        var values = new List<JsonElement>();
        Dictionary<string, int>? index = null;
        foreach (var prop in obj.EnumerateObject())
        {
            index ??= new Dictionary<string, int>(StringComparer.Ordinal);
            if (index.TryGetValue(prop.Name, out int at))
            {
                values[at] = prop.Value;
                continue;
            }
            index[prop.Name] = keys.Count;
            keys.Add(prop.Name);
            values.Add(prop.Value);
        }

        sb.Append('{');
        for (int i = 0; i < keys.Count; i++)
        {
            if (i > 0)
                sb.Append(", ");
            WriteString(sb, keys[i]);
            sb.Append(": ");
            Write(sb, values[i]);
        }
        sb.Append('}');
    }

    /// <summary>A string as json.dumps(ensure_ascii=False) quotes it: only '"', '\' and C0 controls are escaped.</summary>
    public static void WriteString(StringBuilder sb, string s)
    {
        sb.Append('"');
        foreach (char c in s)
        {
            switch (c)
            {
                case '"': sb.Append("\\\""); break;
                case '\\': sb.Append("\\\\"); break;
                case '\n': sb.Append("\\n"); break;
                case '\r': sb.Append("\\r"); break;
                case '\t': sb.Append("\\t"); break;
                case '\b': sb.Append("\\b"); break;
                case '\f': sb.Append("\\f"); break;
                default:
                    if (c < 0x20)
                        sb.Append("\\u").Append(((int)c).ToString("x4", CultureInfo.InvariantCulture));
                    else
                        sb.Append(c);
                    break;
            }
        }
        sb.Append('"');
    }

    /// <summary>
    /// Python's json module loads a number without fraction or exponent as an int (printed back digit for digit)
    /// and any other as a float (printed back with repr), so "1E5" comes out as "100000.0" and "-0" as "0".
    /// </summary>
    public static void WriteNumber(StringBuilder sb, string token)
    {
        if (token.AsSpan().IndexOfAny('.', 'e', 'E') < 0)
        {
            WriteInteger(sb, token);
            return;
        }
        double d = double.Parse(token, NumberStyles.Float, CultureInfo.InvariantCulture);
        sb.Append(FloatRepr(d));
    }

    private static void WriteInteger(StringBuilder sb, string token)
    {
        bool negative = token.StartsWith('-');
        var digits = (negative ? token.AsSpan(1) : token.AsSpan()).TrimStart('0');
        if (digits.IsEmpty)
        {
            sb.Append('0');
            return;
        }
        if (negative)
            sb.Append('-');
        sb.Append(digits);
    }

    /// <summary>Python's repr(float): shortest round-trip digits, positional for 1e-4 ≤ |x| &lt; 1e16, else d.ddde±XX.</summary>
    public static string FloatRepr(double d)
    {
        if (double.IsNaN(d))
            return "NaN";
        if (double.IsPositiveInfinity(d))
            return "Infinity";
        if (double.IsNegativeInfinity(d))
            return "-Infinity";

        // .NET's "R" gives the same shortest round-trip digit string as Python; only the layout differs.
        string r = d.ToString("R", CultureInfo.InvariantCulture);
        bool negative = r.StartsWith('-');
        if (negative)
            r = r.Substring(1);
        int exp = 0;
        int e = r.IndexOfAny(['E', 'e']);
        if (e >= 0)
        {
            exp = int.Parse(r.AsSpan(e + 1), NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture);
            r = r.Substring(0, e);
        }
        int dot = r.IndexOf('.');
        string intPart = dot >= 0 ? r.Substring(0, dot) : r;
        string fracPart = dot >= 0 ? r.Substring(dot + 1) : string.Empty;
        string digits = intPart + fracPart;
        int decpt = intPart.Length + exp; // value = 0.<digits> * 10^decpt
        int lead = 0;
        while (lead < digits.Length && digits[lead] == '0')
            lead++;
        digits = digits.Substring(lead).TrimEnd('0');
        decpt -= lead;

        var sb = new StringBuilder();
        if (negative)
            sb.Append('-');
        if (digits.Length == 0)
            return sb.Append("0.0").ToString();

        if (decpt <= -4 || decpt > 16)
        {
            sb.Append(digits[0]);
            if (digits.Length > 1)
                sb.Append('.').Append(digits, 1, digits.Length - 1);
            int x = decpt - 1;
            sb.Append('e').Append(x < 0 ? '-' : '+');
            sb.Append(Math.Abs(x).ToString("00", CultureInfo.InvariantCulture));
        }
        else if (decpt <= 0)
        {
            sb.Append("0.").Append('0', -decpt).Append(digits);
        }
        else if (decpt >= digits.Length)
        {
            sb.Append(digits).Append('0', decpt - digits.Length).Append(".0");
        }
        else
        {
            sb.Append(digits, 0, decpt).Append('.').Append(digits, decpt, digits.Length - decpt);
        }
        return sb.ToString();
    }
}
