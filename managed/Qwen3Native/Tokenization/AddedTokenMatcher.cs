using System.Buffers;

namespace Qwen3Native.Tokenization;

/// <summary>A stretch of input: plain text when <see cref="TokenId"/> is -1, otherwise one added token.</summary>
internal readonly record struct Segment(int Start, int Length, int TokenId)
{
    public bool IsToken => TokenId >= 0;
}

/// <summary>
/// Finds added tokens in text the way Hugging Face's AddedVocabulary does: a leftmost-longest scan (their
/// Aho-Corasick automaton), non-overlapping, then the per-token single_word / lstrip / rstrip rules.
/// Vocabularies hold a few dozen added tokens, so a character trie plus a vectorised search for possible first
/// characters is as fast as an automaton and much simpler.
/// </summary>
internal sealed class AddedTokenMatcher
{
    private sealed class Node
    {
        public Dictionary<char, Node>? Children;
        public int Token = -1;
    }

    private readonly Node _root = new();
    private readonly List<AddedToken> _tokens = new();
    private readonly SearchValues<char> _firstChars;

    /// <param name="entries">The text to look for and the token it stands for (the text is the content, or its NFC form for normalized tokens).</param>
    public AddedTokenMatcher(IEnumerable<(string Pattern, AddedToken Token)> entries)
    {
        var first = new HashSet<char>();
        foreach (var (pattern, token) in entries)
        {
            if (pattern.Length == 0) continue; // empty tokens never match (HF ignores them)
            var node = _root;
            foreach (char c in pattern)
            {
                node.Children ??= new Dictionary<char, Node>();
                if (!node.Children.TryGetValue(c, out var child))
                    node.Children[c] = child = new Node();
                node = child;
            }
            // The same text registered twice: the later declaration wins, as in HF's content-to-id map.
            node.Token = _tokens.Count;
            _tokens.Add(token);
            first.Add(pattern[0]);
        }
        _firstChars = SearchValues.Create(first.ToArray());
    }

    public bool IsEmpty => _tokens.Count == 0;

    /// <summary>
    /// Appends the segments of <paramref name="sentence"/> (offsets relative to it) to <paramref name="output"/>.
    /// With <paramref name="skipSpecial"/> a special token's text is left as plain text, like HF's
    /// encode_special_tokens; the scan still resumes after it, exactly as HF's iterator does.
    /// </summary>
    public void Split(ReadOnlySpan<char> sentence, bool skipSpecial, List<Segment> output)
    {
        int n = sentence.Length;
        int startOffset = 0;
        int i = 0;
        while (i < n)
        {
            int rel = sentence[i..].IndexOfAny(_firstChars);
            if (rel < 0) break;
            i += rel;

            int bestLength = 0, best = -1;
            var node = _root;
            for (int j = i; j < n; j++)
            {
                if (node.Children is null || !node.Children.TryGetValue(sentence[j], out node)) break;
                if (node.Token >= 0)
                {
                    best = node.Token;
                    bestLength = j - i + 1;
                }
            }
            if (best < 0)
            {
                i++;
                continue;
            }

            int start = i, stop = i + bestLength;
            i = stop;
            var token = _tokens[best];
            if (skipSpecial && token.Special) continue;
            if (token.SingleWord)
            {
                bool spaceBefore = start == 0 || !UnicodeClass.IsWordChar(UnicodeClass.CodePointBefore(sentence, start));
                bool spaceAfter = stop == n || !UnicodeClass.IsWordChar(UnicodeClass.CodePointAt(sentence, stop, out _));
                if (!spaceBefore || !spaceAfter) continue;
            }
            if (token.LStrip)
            {
                int newStart = start;
                while (newStart > 0 && UnicodeClass.IsWhiteSpace(sentence[newStart - 1])) newStart--;
                // Whitespace already swallowed by the previous token's rstrip stays with it.
                start = Math.Max(newStart, startOffset);
            }
            if (token.RStrip)
            {
                while (stop < n && UnicodeClass.IsWhiteSpace(sentence[stop])) stop++;
            }
            if (startOffset < start) output.Add(new Segment(startOffset, start - startOffset, -1));
            output.Add(new Segment(start, stop - start, token.Id));
            startOffset = stop;
        }
        if (startOffset < n) output.Add(new Segment(startOffset, n - startOffset, -1));
    }
}
