using System.Globalization;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace Qwen3Native.Vision;

/// <summary>
/// Reads the boxes of a Qwen3-VL grounding answer. Qwen3-VL writes boxes as JSON objects
/// <c>{"bbox_2d": [x1, y1, x2, y2], "label": "…"}</c> in coordinates normalised to 0–1000 of the image's width and
/// height (whatever size the processor resized it to), usually inside a ```json fence and not always as valid JSON.
/// The parser looks for each <c>bbox_2d</c> array on its own, so fences, prose around the answer, single quotes, a
/// missing bracket or a truncated answer cost only the boxes that are themselves incomplete. The answer text is
/// not changed.
/// </summary>
public static partial class Qwen3VLGrounding
{
    /// <summary>Coordinates are given out of this many units per side.</summary>
    public const double CoordinateScale = 1000.0;

    /// <summary>The boxes in the answer, in order, in normalised 0–1000 coordinates, corners ordered.</summary>
    public static IReadOnlyList<GroundingBox> Parse(string answer)
    {
        ArgumentNullException.ThrowIfNull(answer);
        var boxes = new List<GroundingBox>();
        var matches = BoxPattern().Matches(answer);
        int searchFrom = 0;
        for (int i = 0; i < matches.Count; i++)
        {
            var m = matches[i];
            double a = Number(m.Groups[1]), b = Number(m.Groups[2]), c = Number(m.Groups[3]), d = Number(m.Groups[4]);
            if (!(double.IsFinite(a) && double.IsFinite(b) && double.IsFinite(c) && double.IsFinite(d)))
                continue;
            // The label lives in the same object: between the '{' that opens it and the '}' that closes it, without
            // reaching into the neighbouring boxes' objects.
            int limit = i + 1 < matches.Count ? matches[i + 1].Index : answer.Length;
            int open = answer.LastIndexOf('{', m.Index);
            int start = open >= searchFrom ? open : searchFrom;
            int end = ObjectEnd(answer, m.Index + m.Length, limit);
            string? label = FindLabel(answer, start, m.Index, m.Index + m.Length, end);
            boxes.Add(new GroundingBox(label, Math.Min(a, c), Math.Min(b, d), Math.Max(a, c), Math.Max(b, d)));
            searchFrom = end;
        }
        return boxes;
    }

    /// <summary>The boxes in the answer, mapped to pixels of an image of <paramref name="imageWidth"/> × <paramref name="imageHeight"/>.</summary>
    public static IReadOnlyList<GroundingBox> Parse(string answer, int imageWidth, int imageHeight) =>
        Parse(answer).Select(b => ToPixels(b, imageWidth, imageHeight)).ToList();

    /// <summary>
    /// Maps a normalised box to pixels of the original image: <c>x · width / 1000</c>, <c>y · height / 1000</c>,
    /// clamped to the image (a model can overshoot the edge slightly).
    /// </summary>
    public static GroundingBox ToPixels(GroundingBox normalized, int imageWidth, int imageHeight)
    {
        ArgumentNullException.ThrowIfNull(normalized);
        ArgumentOutOfRangeException.ThrowIfLessThan(imageWidth, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(imageHeight, 1);
        double X(double v) => Math.Clamp(v * imageWidth / CoordinateScale, 0, imageWidth);
        double Y(double v) => Math.Clamp(v * imageHeight / CoordinateScale, 0, imageHeight);
        return normalized with { X1 = X(normalized.X1), Y1 = Y(normalized.Y1), X2 = X(normalized.X2), Y2 = Y(normalized.Y2) };
    }

    private static double Number(Group g) => double.Parse(g.Value, NumberStyles.Float, CultureInfo.InvariantCulture);

    /// <summary>Index just past the '}' closing the object that continues at <paramref name="from"/>, skipping quoted text.</summary>
    private static int ObjectEnd(string s, int from, int limit)
    {
        char quote = '\0';
        for (int i = from; i < limit; i++)
        {
            char ch = s[i];
            if (quote != '\0')
            {
                if (ch == '\\') i++;
                else if (ch == quote) quote = '\0';
            }
            else if (ch is '"' or '\'') quote = ch;
            else if (ch == '}') return i + 1;
            else if (ch == '{') return i; // the next object began: this one was never closed
        }
        return limit;
    }

    private static string? FindLabel(string s, int start, int boxStart, int boxEnd, int end)
    {
        // The label may come before or after the box inside the object.
        foreach (var (from, to) in new[] { (boxEnd, end), (start, boxStart) })
        {
            if (to <= from) continue;
            var m = LabelPattern().Match(s, from, to - from);
            if (!m.Success) continue;
            if (m.Groups[1].Success)
            {
                try
                {
                    using var doc = JsonDocument.Parse(m.Groups[1].Value);
                    return doc.RootElement.GetString();
                }
                catch (JsonException)
                {
                    return m.Groups[1].Value[1..^1]; // an escape JSON does not know: keep the text as written
                }
            }
            return m.Groups[2].Value;
        }
        return null;
    }

    private const string Num = @"\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*";

    [GeneratedRegex(@"[""']?bbox_2d[""']?\s*:\s*\[" + Num + "," + Num + "," + Num + "," + Num + @"\]")]
    private static partial Regex BoxPattern();

    [GeneratedRegex(@"[""']label[""']\s*:\s*(?:(""(?:[^""\\]|\\.)*"")|'([^']*)')")]
    private static partial Regex LabelPattern();
}
