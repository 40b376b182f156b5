using System.Buffers;
using System.Text;
using System.Text.Unicode;

namespace Qwen3Native.Tokenization;

/// <summary>
/// Turns generated ids into text one id at a time. A token can end in the middle of a UTF-8 character (emoji and
/// CJK are often split over two or three tokens); those bytes are held back until the character is complete, so
/// the returned text never contains half a character. Concatenating every <see cref="Push"/> result and the final
/// <see cref="Flush"/> gives exactly <see cref="Qwen3Tokenizer.Decode(ReadOnlySpan{int}, bool)"/> of all the ids:
/// bytes that can no longer become a valid character are emitted as U+FFFD as soon as that is certain, and an
/// incomplete character left at the end becomes one U+FFFD in <see cref="Flush"/>, as in Rust's lossy decoding.
/// </summary>
/// <remarks>Not thread-safe: one instance per generation stream.</remarks>
public sealed class Qwen3StreamingDecoder
{
    private readonly Qwen3Tokenizer _tokenizer;
    private readonly bool _skipSpecialTokens;
    private readonly byte[] _pending = new byte[4]; // at most 3 bytes of an unfinished character
    private int _pendingCount;

    public Qwen3StreamingDecoder(Qwen3Tokenizer tokenizer, bool skipSpecialTokens = false)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        _tokenizer = tokenizer;
        _skipSpecialTokens = skipSpecialTokens;
    }

    /// <summary>True while bytes of an unfinished character are held back.</summary>
    public bool HasPendingBytes => _pendingCount > 0;

    /// <summary>Adds one id; returns the text it completes (often the token's text, possibly empty).</summary>
    /// <exception cref="ArgumentOutOfRangeException">The id names no token.</exception>
    public string Push(int id)
    {
        ReadOnlySpan<byte> token = _tokenizer.GetTokenBytes(id);
        if (_skipSpecialTokens && _tokenizer.IsSpecial(id)) return string.Empty;
        if (token.IsEmpty) return string.Empty;

        int total = _pendingCount + token.Length;
        byte[]? rented = null;
        Span<byte> source = total <= 256 ? stackalloc byte[256] : (rented = ArrayPool<byte>.Shared.Rent(total));
        char[]? rentedChars = null;
        Span<char> chars = total <= 256 ? stackalloc char[256] : (rentedChars = ArrayPool<char>.Shared.Rent(total));
        try
        {
            _pending.AsSpan(0, _pendingCount).CopyTo(source);
            token.CopyTo(source[_pendingCount..]);
            source = source[..total];

            // Not the final block: a trailing sequence that is still a valid prefix is left unread, everything
            // that is already invalid is replaced.
            Utf8.ToUtf16(source, chars, out int read, out int written, replaceInvalidSequences: true, isFinalBlock: false);
            _pendingCount = total - read;
            source[read..].CopyTo(_pending);
            return written == 0 ? string.Empty : new string(chars[..written]);
        }
        finally
        {
            if (rented is not null) ArrayPool<byte>.Shared.Return(rented);
            if (rentedChars is not null) ArrayPool<char>.Shared.Return(rentedChars);
        }
    }

    /// <summary>Ends the stream: returns U+FFFD if an unfinished character was held back, else "". The decoder can then be reused.</summary>
    public string Flush()
    {
        if (_pendingCount == 0) return string.Empty;
        _pendingCount = 0;
        return "\uFFFD";
    }

    /// <summary>Forgets any held-back bytes.</summary>
    public void Reset() => _pendingCount = 0;
}
