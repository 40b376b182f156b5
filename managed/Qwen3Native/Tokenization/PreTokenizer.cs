using System.Text.RegularExpressions;

namespace Qwen3Native.Tokenization;

/// <summary>One regex-style splitting step ("Split" with behavior Isolated): matches and the gaps between them become pieces.</summary>
internal abstract class PreTokenSplitter
{
    /// <summary>Appends the pieces of <c>text[start..start+length]</c> as absolute (start, length) pairs.</summary>
    public abstract void Split(ReadOnlySpan<char> text, int start, int length, List<(int Start, int Length)> pieces);
}

/// <summary>
/// The chain of splitting steps of a tokenizer.json pre_tokenizer. The final ByteLevel step (bytes to GPT-2
/// alphabet) is not represented: the BPE model works on UTF-8 bytes directly.
/// </summary>
internal sealed class PreTokenizer
{
    private readonly PreTokenSplitter[] _steps;

    public PreTokenizer(PreTokenSplitter[] steps) => _steps = steps;

    public IReadOnlyList<PreTokenSplitter> Steps => _steps;

    /// <summary>Fills <paramref name="pieces"/> (cleared first) with the non-empty pieces of <paramref name="text"/>.</summary>
    public void Split(ReadOnlySpan<char> text, List<(int Start, int Length)> pieces, List<(int Start, int Length)> scratch)
    {
        pieces.Clear();
        if (text.IsEmpty) return;
        var current = pieces;
        var next = scratch;
        current.Add((0, text.Length));
        foreach (var step in _steps)
        {
            next.Clear();
            foreach (var (s, l) in current) step.Split(text, s, l, next);
            (current, next) = (next, current);
        }
        if (!ReferenceEquals(current, pieces))
        {
            pieces.Clear();
            pieces.AddRange(current);
        }
    }
}

/// <summary>
/// A hand-written matcher equivalent to the Qwen2/Qwen3 pre-tokenizer regex
/// <c>(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+</c>
/// as Oniguruma runs it inside Hugging Face tokenizers: leftmost-first alternation over Unicode scalar values.
/// .NET's Regex would see surrogate halves instead of astral letters and differs in case folding, and a scanner
/// is also several times faster. Every position matches one of the alternatives, so pieces tile the input.
/// </summary>
internal sealed class QwenSplitter : PreTokenSplitter
{
    public const string Pattern =
        @"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    public static readonly QwenSplitter Instance = new();

    public override void Split(ReadOnlySpan<char> text, int start, int length, List<(int Start, int Length)> pieces)
    {
        var s = text.Slice(start, length);
        for (int p = 0; p < s.Length;)
        {
            int end = NextEnd(s, p);
            pieces.Add((start + p, end - p));
            p = end;
        }
    }

    /// <summary>End (exclusive) of the match that starts at <paramref name="p"/>; the regex's lookahead sees only <paramref name="s"/>.</summary>
    public static int NextEnd(ReadOnlySpan<char> s, int p)
    {
        int n = s.Length;
        int c0 = UnicodeClass.CodePointAt(s, p, out int w0);
        byte k0 = UnicodeClass.Classify(c0);

        // (?i:'s|'t|'re|'ve|'m|'ll|'d). Case-insensitive as Unicode case folding has it: 'ſ' (U+017F) folds to 's';
        // no other character folds to one of these letters.
        if (c0 == '\'' && p + 1 < n)
        {
            char c1 = s[p + 1];
            switch (c1)
            {
                case 's' or 'S' or '\u017F' or 't' or 'T' or 'm' or 'M' or 'd' or 'D':
                    return p + 2;
                case 'r' or 'R' or 'v' or 'V' when p + 2 < n && (s[p + 2] | 0x20) == 'e':
                    return p + 3;
                case 'l' or 'L' when p + 2 < n && (s[p + 2] | 0x20) == 'l':
                    return p + 3;
            }
        }

        // [^\r\n\p{L}\p{N}]?\p{L}+
        if ((k0 & UnicodeClass.Letter) != 0)
            return SkipLetters(s, p + w0);
        if ((k0 & (UnicodeClass.Number | UnicodeClass.LineBreak)) == 0 && p + w0 < n)
        {
            int c1 = UnicodeClass.CodePointAt(s, p + w0, out int w1);
            if ((UnicodeClass.Classify(c1) & UnicodeClass.Letter) != 0)
                return SkipLetters(s, p + w0 + w1);
        }

        // \p{N}: one number character at a time.
        if ((k0 & UnicodeClass.Number) != 0)
            return p + w0;

        //  ?[^\s\p{L}\p{N}]+[\r\n]*
        if ((k0 & UnicodeClass.Space) == 0)
            return SkipPunctuationThenLineBreaks(s, p + w0);
        if (c0 == ' ' && p + 1 < n)
        {
            int c1 = UnicodeClass.CodePointAt(s, p + 1, out int w1);
            if (UnicodeClass.Classify(c1) == 0)
                return SkipPunctuationThenLineBreaks(s, p + 1 + w1);
        }

        // c0 is white space. All White_Space characters are in the BMP, so one char each.
        int e = p, lastBreak = -1;
        while (e < n && (UnicodeClass.Classify(s[e]) & UnicodeClass.Space) != 0)
        {
            if (s[e] == '\r' || s[e] == '\n') lastBreak = e;
            e++;
        }
        // \s*[\r\n]+ : backtracking \s* stops right after the last line break of the run.
        if (lastBreak >= 0) return lastBreak + 1;
        // \s+(?!\S) : the whole run at the end of the text, else the run minus its last character.
        if (e == n) return e;
        if (e - p >= 2) return e - 1;
        // \s+
        return e;
    }

    private static int SkipLetters(ReadOnlySpan<char> s, int q)
    {
        while (q < s.Length)
        {
            int c = UnicodeClass.CodePointAt(s, q, out int w);
            if ((UnicodeClass.Classify(c) & UnicodeClass.Letter) == 0) break;
            q += w;
        }
        return q;
    }

    private static int SkipPunctuationThenLineBreaks(ReadOnlySpan<char> s, int q)
    {
        while (q < s.Length)
        {
            int c = UnicodeClass.CodePointAt(s, q, out int w);
            if (UnicodeClass.Classify(c) != 0) break;
            q += w;
        }
        while (q < s.Length && (s[q] == '\r' || s[q] == '\n')) q++;
        return q;
    }
}

/// <summary>
/// Fallback for split patterns other than Qwen's: .NET Regex with the pattern as written. It is exact for
/// patterns whose classes only meet BMP text, but .NET matches UTF-16 code units (an astral letter is two
/// surrogates to \p{L}), so ids may differ from Hugging Face on astral characters.
/// </summary>
internal sealed class RegexSplitter : PreTokenSplitter
{
    private readonly Regex _regex;

    public RegexSplitter(string pattern)
    {
        _regex = new Regex(pattern, RegexOptions.CultureInvariant | RegexOptions.Compiled);
    }

    public string Pattern => _regex.ToString();

    public override void Split(ReadOnlySpan<char> text, int start, int length, List<(int Start, int Length)> pieces)
    {
        var s = text.Slice(start, length);
        int prev = 0;
        foreach (var m in _regex.EnumerateMatches(s))
        {
            if (m.Length == 0) continue;
            if (m.Index > prev) pieces.Add((start + prev, m.Index - prev));
            pieces.Add((start + m.Index, m.Length));
            prev = m.Index + m.Length;
        }
        if (prev < s.Length) pieces.Add((start + prev, s.Length - prev));
    }
}
