using System.Globalization;
using System.Runtime.CompilerServices;

namespace Qwen3Native.Tokenization;

/// <summary>
/// The character classes the pre-tokenizer regex and the added-token rules test, defined on Unicode scalar
/// values (never on UTF-16 code units, so astral letters and emoji are classified as whole characters).
/// Letters and numbers come from the runtime's Unicode tables (.NET 10: Unicode 16.0, the same version as the
/// Oniguruma engine inside Hugging Face tokenizers). White space is the Unicode White_Space property, which is
/// what Oniguruma's and Rust's \s match.
/// </summary>
internal static class UnicodeClass
{
    public const byte Letter = 1;   // \p{L}
    public const byte Number = 2;   // \p{N}
    public const byte Space = 4;    // \s
    public const byte LineBreak = 8; // \r or \n (the regex names these two explicitly)

    private static readonly byte[] s_latin1 = BuildLatin1();

    private static byte[] BuildLatin1()
    {
        var t = new byte[256];
        for (int c = 0; c < 256; c++) t[c] = ClassifySlow(c);
        return t;
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static byte Classify(int cp) => cp < 256 ? s_latin1[cp] : ClassifySlow(cp);

    private static byte ClassifySlow(int cp)
    {
        if (cp == '\r' || cp == '\n') return Space | LineBreak;
        if (IsWhiteSpace(cp)) return Space;
        switch (CharUnicodeInfo.GetUnicodeCategory(cp))
        {
            case UnicodeCategory.UppercaseLetter:
            case UnicodeCategory.LowercaseLetter:
            case UnicodeCategory.TitlecaseLetter:
            case UnicodeCategory.ModifierLetter:
            case UnicodeCategory.OtherLetter:
                return Letter;
            case UnicodeCategory.DecimalDigitNumber:
            case UnicodeCategory.LetterNumber:
            case UnicodeCategory.OtherNumber:
                return Number;
            default:
                return 0;
        }
    }

    /// <summary>Unicode White_Space (stable since Unicode 6.3; all of it is in the BMP).</summary>
    public static bool IsWhiteSpace(int cp) => cp switch
    {
        >= 0x09 and <= 0x0D => true,
        0x20 or 0x85 or 0xA0 or 0x1680 => true,
        >= 0x2000 and <= 0x200A => true,
        0x2028 or 0x2029 or 0x202F or 0x205F or 0x3000 => true,
        _ => false,
    };

    /// <summary>
    /// Rust regex's Unicode \w (Alphabetic, marks, decimal digits, connector punctuation, joiners), which the
    /// Hugging Face added-token "single_word" rule uses. Alphabetic is approximated by letters, letter numbers
    /// and marks plus the symbol blocks of enclosed Latin letters that Unicode also calls alphabetic.
    /// </summary>
    public static bool IsWordChar(int cp)
    {
        if (cp == 0x200C || cp == 0x200D) return true;
        if ((cp >= 0x24B6 && cp <= 0x24E9) || (cp >= 0x1F130 && cp <= 0x1F149) || (cp >= 0x1F150 && cp <= 0x1F169) || (cp >= 0x1F170 && cp <= 0x1F189))
            return true;
        switch (CharUnicodeInfo.GetUnicodeCategory(cp))
        {
            case UnicodeCategory.UppercaseLetter:
            case UnicodeCategory.LowercaseLetter:
            case UnicodeCategory.TitlecaseLetter:
            case UnicodeCategory.ModifierLetter:
            case UnicodeCategory.OtherLetter:
            case UnicodeCategory.LetterNumber:
            case UnicodeCategory.NonSpacingMark:
            case UnicodeCategory.SpacingCombiningMark:
            case UnicodeCategory.EnclosingMark:
            case UnicodeCategory.DecimalDigitNumber:
            case UnicodeCategory.ConnectorPunctuation:
                return true;
            default:
                return false;
        }
    }

    /// <summary>The scalar value starting at <paramref name="i"/> (input is valid UTF-16) and its length in chars.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static int CodePointAt(ReadOnlySpan<char> s, int i, out int width)
    {
        char c = s[i];
        if (char.IsHighSurrogate(c) && i + 1 < s.Length && char.IsLowSurrogate(s[i + 1]))
        {
            width = 2;
            return char.ConvertToUtf32(c, s[i + 1]);
        }
        width = 1;
        return c;
    }

    /// <summary>The scalar value ending just before <paramref name="end"/>.</summary>
    public static int CodePointBefore(ReadOnlySpan<char> s, int end)
    {
        char c = s[end - 1];
        if (char.IsLowSurrogate(c) && end >= 2 && char.IsHighSurrogate(s[end - 2]))
            return char.ConvertToUtf32(s[end - 2], c);
        return c;
    }
}
