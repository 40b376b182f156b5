namespace Qwen3Native.Tokenization;

/// <summary>
/// GPT-2's reversible byte-to-character alphabet: every byte gets a printable character so that BPE
/// vocabularies can be stored as text. Printable Latin-1 bytes stand for themselves; the rest (controls,
/// space, DEL, NBSP, soft hyphen) are moved, in byte order, to U+0100 and up. So a space is 'Ġ' (U+0120).
/// </summary>
internal static class ByteLevel
{
    public static readonly char[] ByteToChar = BuildByteToChar();

    // Indexed by character; -1 where the character is not part of the alphabet. The alphabet ends at U+0143.
    private static readonly short[] s_charToByte = BuildCharToByte();

    private static char[] BuildByteToChar()
    {
        var map = new char[256];
        int next = 256;
        for (int b = 0; b < 256; b++)
        {
            bool keeps = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
            map[b] = keeps ? (char)b : (char)next++;
        }
        return map;
    }

    private static short[] BuildCharToByte()
    {
        var table = new short[0x144];
        Array.Fill(table, (short)-1);
        for (int b = 0; b < 256; b++)
            table[ByteToChar[b]] = (short)b;
        return table;
    }

    /// <summary>The byte a character stands for, or -1 when the character is outside the alphabet.</summary>
    public static int CharToByte(char c) => c < s_charToByte.Length ? s_charToByte[c] : -1;

    /// <summary>
    /// The bytes a vocabulary entry decodes to. Like the Hugging Face ByteLevel decoder, a token that contains
    /// any character outside the alphabet (possible for added tokens) is taken as plain UTF-8 instead.
    /// </summary>
    public static byte[] TokenToBytes(string token)
    {
        var bytes = new byte[token.Length];
        for (int i = 0; i < token.Length; i++)
        {
            int b = CharToByte(token[i]);
            if (b < 0)
                return System.Text.Encoding.UTF8.GetBytes(token);
            bytes[i] = (byte)b;
        }
        return bytes;
    }
}
