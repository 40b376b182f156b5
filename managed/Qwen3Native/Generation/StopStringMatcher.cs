using System.Text;

namespace Qwen3Native.Generation;

/// <summary>
/// Finds stop strings in streamed text. A stop string may be split over several tokens, so the end of the text that
/// could still become one is held back; once it cannot, it is released. Text before a match is released and the match
/// and everything after it are dropped, as vLLM and the OpenAI API do.
/// </summary>
internal sealed class StopStringMatcher
{
    private readonly string[] _stops;
    private readonly StringBuilder _held = new();

    public StopStringMatcher(IReadOnlyList<string> stops) => _stops = stops.ToArray();

    public bool IsActive => _stops.Length > 0;

    /// <summary>Adds text; returns what can be released now, and whether a stop string was found.</summary>
    public string Push(string text, out bool matched)
    {
        matched = false;
        if (_stops.Length == 0)
            return text;
        if (text.Length == 0 && _held.Length == 0)
            return string.Empty;

        _held.Append(text);
        string buffer = _held.ToString();
        _held.Clear();

        // The held text never contains a whole stop string (it would have matched), so the earliest match in the
        // buffer is the first place generation should have stopped.
        int cut = -1;
        foreach (var stop in _stops)
        {
            int i = buffer.IndexOf(stop, StringComparison.Ordinal);
            if (i >= 0 && (cut < 0 || i < cut))
                cut = i;
        }
        if (cut >= 0)
        {
            matched = true;
            return buffer.Substring(0, cut);
        }

        int keep = LongestStopPrefixSuffix(buffer);
        _held.Append(buffer, buffer.Length - keep, keep);
        return buffer.Substring(0, buffer.Length - keep);
    }

    /// <summary>Releases the held text at the end of a generation that did not stop on a string.</summary>
    public string Flush()
    {
        string rest = _held.ToString();
        _held.Clear();
        return rest;
    }

    /// <summary>The length of the longest suffix of <paramref name="text"/> that is a proper prefix of some stop string.</summary>
    private int LongestStopPrefixSuffix(string text)
    {
        int best = 0;
        foreach (var stop in _stops)
        {
            for (int k = Math.Min(stop.Length - 1, text.Length); k > best; k--)
            {
                if (string.CompareOrdinal(text, text.Length - k, stop, 0, k) == 0)
                {
                    best = k;
                    break;
                }
            }
        }
        return best;
    }
}
