using System.Buffers;
using System.Collections.ObjectModel;
using System.Text;
using System.Text.Json;

namespace Qwen3Native.Tokenization;

/// <summary>
/// The Qwen3 (Qwen2-family) byte-level BPE tokenizer, read from a Hugging Face tokenizer.json and producing the
/// same ids as the Hugging Face <c>tokenizers</c> library (<c>encode(text, add_special_tokens=False)</c>) and
/// the same text as its <c>decode</c>.
/// </summary>
/// <remarks>
/// <para>Encoding runs HF's pipeline: added tokens are split out of the raw text first; each remaining stretch is
/// NFC-normalized (Unicode 9.0 tables, as HF has them), cut into words by the pre-tokenizer regex (a scanner
/// equivalent to Qwen's pattern, working on Unicode scalar values) and each word's UTF-8 bytes are merged by BPE.
/// No special tokens are added around the text (Qwen's post-processor adds none either).</para>
/// <para>Strings with unpaired UTF-16 surrogates cannot exist on the Rust side; each lone surrogate is replaced by
/// U+FFFD before anything else, as Rust's <c>String::from_utf16_lossy</c> would, so it encodes as the bytes
/// EF BF BD.</para>
/// <para>Instances are immutable apart from an internal bounded word cache and are safe to share between threads.</para>
/// </remarks>
public sealed class Qwen3Tokenizer
{
    private readonly BpeModel _model;
    private readonly PreTokenizer _preTokenizer;
    private readonly bool _qwenScannerOnly;
    private readonly bool _nfc;
    private readonly AddedTokenMatcher _rawMatcher;        // added tokens with normalized = false
    private readonly AddedTokenMatcher _normalizedMatcher; // added tokens with normalized = true, matched after NFC
    private readonly AddedToken[] _addedTokens;
    private readonly Dictionary<string, int> _addedByContent;
    private readonly Dictionary<int, AddedToken> _addedById;
    private readonly ReadOnlyDictionary<string, int> _specialTokens;

    // Decoding: the bytes of every id, laid end to end. _tokenLength is -1 for ids that name no token.
    private readonly byte[] _tokenBytes;
    private readonly int[] _tokenStart;
    private readonly int[] _tokenLength;
    private readonly bool[] _isSpecial;

    [ThreadStatic] private static EncodeScratch? t_scratch;

    private Qwen3Tokenizer(BpeModel model, PreTokenizer preTokenizer, bool nfc, List<AddedToken> addedTokens)
    {
        _model = model;
        _preTokenizer = preTokenizer;
        _qwenScannerOnly = preTokenizer.Steps.Count == 1 && preTokenizer.Steps[0] is QwenSplitter;
        _nfc = nfc;
        _addedTokens = addedTokens.ToArray();

        _addedByContent = new Dictionary<string, int>(StringComparer.Ordinal);
        _addedById = new Dictionary<int, AddedToken>();
        var special = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var t in _addedTokens)
        {
            _addedByContent[t.Content] = t.Id;
            _addedById[t.Id] = t;
            if (t.Special) special[t.Content] = t.Id;
        }
        _specialTokens = new ReadOnlyDictionary<string, int>(special);

        // HF tries special tokens before the others when building its automaton; only the order of identical
        // contents could matter, and then the later entry wins in both.
        var ordered = _addedTokens.Where(t => t.Special).Concat(_addedTokens.Where(t => !t.Special)).ToList();
        _rawMatcher = new AddedTokenMatcher(ordered.Where(t => !t.Normalized).Select(t => (t.Content, t)));
        _normalizedMatcher = new AddedTokenMatcher(ordered.Where(t => t.Normalized)
            .Select(t => (nfc ? Nfc.Normalize(t.Content) : t.Content, t)));

        int capacity = model.IdCapacity;
        foreach (var t in _addedTokens) capacity = Math.Max(capacity, t.Id + 1);
        _tokenStart = new int[capacity];
        _tokenLength = new int[capacity];
        _isSpecial = new bool[capacity];
        Array.Fill(_tokenLength, -1);
        var blob = new List<byte>(capacity * 8);
        for (int id = 0; id < capacity; id++)
        {
            string? token = _addedById.TryGetValue(id, out var added) ? added.Content : model.IdToToken(id);
            if (token is null) continue;
            byte[] bytes = ByteLevel.TokenToBytes(token);
            _tokenStart[id] = blob.Count;
            _tokenLength[id] = bytes.Length;
            blob.AddRange(bytes);
            _isSpecial[id] = added is { Special: true };
        }
        _tokenBytes = blob.ToArray();

        int overlapping = _addedByContent.Keys.Count(c => model.TokenToId(c) is not null);
        VocabSize = model.Count + _addedByContent.Count - overlapping;
    }

    internal BpeModel Model => _model;

    /// <summary>Number of distinct tokens, added tokens included (HF's <c>get_vocab_size(with_added_tokens=True)</c>): 151,669 for Qwen3.</summary>
    public int VocabSize { get; }

    /// <summary>Special added tokens by content, e.g. "&lt;|im_end|&gt;" → 151645.</summary>
    public IReadOnlyDictionary<string, int> SpecialTokens => _specialTokens;

    /// <summary>All added tokens (special or not) in tokenizer.json order.</summary>
    public IReadOnlyList<AddedToken> AddedTokens => _addedTokens;

    /// <summary>Whether <paramref name="id"/> is a special added token (skipped by <c>skipSpecialTokens</c>).</summary>
    public bool IsSpecial(int id) => (uint)id < (uint)_isSpecial.Length && _isSpecial[id];

    /// <summary>The id of a token given as it appears in the vocabulary (byte-level form, e.g. "Ġworld"), or null.</summary>
    public int? TokenToId(string token)
    {
        ArgumentNullException.ThrowIfNull(token);
        return _addedByContent.TryGetValue(token, out int id) ? id : _model.TokenToId(token);
    }

    /// <summary>The vocabulary string of <paramref name="id"/> (byte-level form for BPE tokens), or null when no token has that id.</summary>
    public string? IdToToken(int id) => _addedById.TryGetValue(id, out var t) ? t.Content : _model.IdToToken(id);

    /// <summary>Loads a Hugging Face tokenizer.json (about 200 ms for Qwen3's 11 MB file).</summary>
    /// <exception cref="TokenizerFormatException">The file is not valid JSON or describes something other than byte-level BPE.</exception>
    /// <exception cref="FileNotFoundException">No file at <paramref name="tokenizerJsonPath"/>.</exception>
    public static Qwen3Tokenizer FromFile(string tokenizerJsonPath)
    {
        ArgumentNullException.ThrowIfNull(tokenizerJsonPath);
        using var stream = File.OpenRead(tokenizerJsonPath);
        return FromJson(stream);
    }

    /// <summary>Loads tokenizer.json content from a stream (UTF-8).</summary>
    /// <exception cref="TokenizerFormatException">Invalid JSON or an unsupported tokenizer.</exception>
    public static Qwen3Tokenizer FromJson(Stream json)
    {
        ArgumentNullException.ThrowIfNull(json);
        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(json, new JsonDocumentOptions { MaxDepth = 256 });
        }
        catch (JsonException e)
        {
            throw new TokenizerFormatException("tokenizer.json is not valid JSON: " + e.Message, e);
        }
        using (doc) return TokenizerJson.Load(doc.RootElement);
    }

    /// <summary>Loads tokenizer.json content given as a string.</summary>
    /// <exception cref="TokenizerFormatException">Invalid JSON or an unsupported tokenizer.</exception>
    public static Qwen3Tokenizer FromJson(string json)
    {
        ArgumentNullException.ThrowIfNull(json);
        JsonDocument doc;
        try
        {
            doc = JsonDocument.Parse(json, new JsonDocumentOptions { MaxDepth = 256 });
        }
        catch (JsonException e)
        {
            throw new TokenizerFormatException("tokenizer.json is not valid JSON: " + e.Message, e);
        }
        using (doc) return TokenizerJson.Load(doc.RootElement);
    }

    internal static Qwen3Tokenizer Create(BpeModel model, PreTokenizer preTokenizer, bool nfc, List<AddedToken> addedTokens) =>
        new(model, preTokenizer, nfc, addedTokens);

    /// <summary>
    /// Token ids of <paramref name="text"/>, without any special tokens added around it.
    /// </summary>
    /// <param name="text">Any string; lone surrogates are read as U+FFFD.</param>
    /// <param name="parseSpecialTokens">
    /// True (default): added tokens written in the text, such as "&lt;|im_start|&gt;", become their ids.
    /// False: special tokens in the text are encoded as ordinary text (HF's <c>encode_special_tokens</c> /
    /// <c>split_special_tokens</c>); use this for untrusted content. Non-special added tokens such as
    /// "&lt;think&gt;" are still recognised, exactly as in HF.
    /// </param>
    public int[] Encode(string text, bool parseSpecialTokens = true)
    {
        ArgumentNullException.ThrowIfNull(text);
        var output = new List<int>(text.Length / 3 + 4);
        EncodeCore(text, output, parseSpecialTokens);
        return output.ToArray();
    }

    /// <summary>Like <see cref="Encode(string, bool)"/>, appending to <paramref name="destination"/>.</summary>
    public void Encode(string text, List<int> destination, bool parseSpecialTokens = true)
    {
        ArgumentNullException.ThrowIfNull(text);
        ArgumentNullException.ThrowIfNull(destination);
        EncodeCore(text, destination, parseSpecialTokens);
    }

    private void EncodeCore(string text, List<int> output, bool parseSpecialTokens)
    {
        if (text.Length == 0) return;
        string clean = ReplaceLoneSurrogates(text);
        var scratch = t_scratch ??= new EncodeScratch();
        var segments = scratch.Segments;
        segments.Clear();
        if (_rawMatcher.IsEmpty) segments.Add(new Segment(0, clean.Length, -1));
        else _rawMatcher.Split(clean, !parseSpecialTokens, segments);

        foreach (var segment in segments)
        {
            if (segment.IsToken)
            {
                output.Add(segment.TokenId);
                continue;
            }
            ReadOnlySpan<char> plain = clean.AsSpan(segment.Start, segment.Length);
            if (_nfc && Nfc.NormalizeOrNull(plain) is { } normalized) plain = normalized;
            if (_normalizedMatcher.IsEmpty)
            {
                EncodePlain(plain, output, scratch);
                continue;
            }
            var inner = scratch.InnerSegments;
            inner.Clear();
            _normalizedMatcher.Split(plain, !parseSpecialTokens, inner);
            foreach (var s in inner)
            {
                if (s.IsToken) output.Add(s.TokenId);
                else EncodePlain(plain.Slice(s.Start, s.Length), output, scratch);
            }
        }
    }

    private void EncodePlain(ReadOnlySpan<char> text, List<int> output, EncodeScratch scratch)
    {
        if (_qwenScannerOnly)
        {
            for (int p = 0; p < text.Length;)
            {
                int end = QwenSplitter.NextEnd(text, p);
                _model.Encode(text[p..end], output);
                p = end;
            }
            return;
        }
        _preTokenizer.Split(text, scratch.Pieces, scratch.PiecesScratch);
        foreach (var (start, length) in scratch.Pieces)
            _model.Encode(text.Slice(start, length), output);
    }

    /// <summary>Returns <paramref name="text"/> itself when it is well-formed UTF-16, else a copy with each lone surrogate replaced by U+FFFD.</summary>
    internal static string ReplaceLoneSurrogates(string text)
    {
        int i = text.AsSpan().IndexOfAnyInRange('\uD800', '\uDFFF');
        if (i < 0) return text;
        StringBuilder? sb = null;
        for (; i < text.Length; i++)
        {
            char c = text[i];
            if (!char.IsSurrogate(c)) continue;
            if (char.IsHighSurrogate(c) && i + 1 < text.Length && char.IsLowSurrogate(text[i + 1]))
            {
                i++;
                continue;
            }
            sb ??= new StringBuilder(text);
            sb[i] = '\uFFFD';
        }
        return sb?.ToString() ?? text;
    }

    /// <summary>
    /// Text of <paramref name="ids"/>: the tokens' bytes concatenated and read as UTF-8, invalid sequences becoming
    /// U+FFFD (Rust's <c>from_utf8_lossy</c>, which HF uses). With <paramref name="skipSpecialTokens"/> special
    /// added tokens (not e.g. &lt;think&gt;, which Qwen3 declares non-special) are left out.
    /// </summary>
    /// <exception cref="ArgumentOutOfRangeException">An id names no token. (HF silently drops such ids.)</exception>
    public string Decode(ReadOnlySpan<int> ids, bool skipSpecialTokens = false)
    {
        long total = 0;
        for (int i = 0; i < ids.Length; i++)
        {
            int id = ids[i];
            CheckId(id, i);
            if (!(skipSpecialTokens && _isSpecial[id])) total += _tokenLength[id];
        }
        if (total == 0) return string.Empty;
        if (total > int.MaxValue) throw new ArgumentException("The decoded text would exceed 2 GB.", nameof(ids));

        byte[] buffer = ArrayPool<byte>.Shared.Rent((int)total);
        try
        {
            int at = 0;
            foreach (int id in ids)
            {
                if (skipSpecialTokens && _isSpecial[id]) continue;
                _tokenBytes.AsSpan(_tokenStart[id], _tokenLength[id]).CopyTo(buffer.AsSpan(at));
                at += _tokenLength[id];
            }
            // .NET's decoder replaces each maximal invalid subsequence by one U+FFFD, the same rule as Rust's.
            return Encoding.UTF8.GetString(buffer, 0, at);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(buffer);
        }
    }

    /// <summary>Text of a single id (may be a fragment of a UTF-8 character, then U+FFFD); see <see cref="Decode(ReadOnlySpan{int}, bool)"/>.</summary>
    public string Decode(int id, bool skipSpecialTokens = false) => Decode([id], skipSpecialTokens);

    /// <summary>A decoder that turns ids into text one at a time, for streaming generation.</summary>
    public Qwen3StreamingDecoder CreateStreamingDecoder(bool skipSpecialTokens = false) => new(this, skipSpecialTokens);

    /// <summary>The raw bytes id <paramref name="id"/> stands for (validated).</summary>
    internal ReadOnlySpan<byte> GetTokenBytes(int id)
    {
        CheckId(id, -1);
        return _tokenBytes.AsSpan(_tokenStart[id], _tokenLength[id]);
    }

    private void CheckId(int id, int index)
    {
        if ((uint)id >= (uint)_tokenLength.Length || _tokenLength[id] < 0)
        {
            string where = index >= 0 ? $" (at index {index})" : "";
            throw new ArgumentOutOfRangeException("ids", id,
                $"Token id {id}{where} is not in the vocabulary; valid ids are 0..{_tokenLength.Length - 1}.");
        }
    }

    private sealed class EncodeScratch
    {
        public readonly List<Segment> Segments = new();
        public readonly List<Segment> InnerSegments = new();
        public readonly List<(int Start, int Length)> Pieces = new();
        public readonly List<(int Start, int Length)> PiecesScratch = new();
    }
}
