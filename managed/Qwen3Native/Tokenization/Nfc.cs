using System.Text;

namespace Qwen3Native.Tokenization;

/// <summary>
/// Unicode NFC with the Unicode 9.0 data that Hugging Face <c>tokenizers</c> uses (see NfcTables.g.cs and
/// tools/gen_nfc_tables.py). Not string.Normalize: that follows the OS's ICU version and is a no-op under
/// InvariantGlobalization, either of which would change token ids.
/// Input must be valid UTF-16 (the tokenizer replaces lone surrogates before it gets here).
/// </summary>
internal static partial class Nfc
{
    private const int SBase = 0xAC00, LBase = 0x1100, VBase = 0x1161, TBase = 0x11A7;
    private const int LCount = 19, VCount = 21, TCount = 28, NCount = VCount * TCount, SCount = LCount * NCount;

    private static readonly byte[] s_bmpCcc;
    private static readonly Dictionary<int, byte> s_astralCcc;
    private static readonly ulong[] s_bmpUnsafe;
    private static readonly int[] s_astralUnsafe; // sorted [start, end) pairs
    private static readonly Dictionary<int, (int Offset, int Length)> s_decompositions;
    private static readonly int[] s_decompositionPool;
    private static readonly Dictionary<long, int> s_compositions;

    static Nfc()
    {
        s_bmpCcc = new byte[0x10000];
        s_astralCcc = new Dictionary<int, byte>();
        foreach (uint packed in CccData)
        {
            int cp = (int)(packed >> 8);
            byte ccc = (byte)packed;
            if (cp < 0x10000) s_bmpCcc[cp] = ccc;
            else s_astralCcc[cp] = ccc;
        }

        s_bmpUnsafe = new ulong[0x10000 / 64];
        var astral = new List<int>();
        ReadOnlySpan<int> ranges = UnsafeRanges;
        for (int i = 0; i < ranges.Length; i += 2)
        {
            for (int cp = ranges[i]; cp < ranges[i + 1] && cp < 0x10000; cp++)
                s_bmpUnsafe[cp >> 6] |= 1UL << (cp & 63);
            if (ranges[i + 1] > 0x10000)
            {
                astral.Add(Math.Max(ranges[i], 0x10000));
                astral.Add(ranges[i + 1]);
            }
        }
        s_astralUnsafe = astral.ToArray();

        ReadOnlySpan<int> data = DecompositionData;
        var pool = new List<int>();
        s_decompositions = new Dictionary<int, (int, int)>();
        for (int i = 0; i < data.Length;)
        {
            int cp = data[i], len = data[i + 1];
            s_decompositions[cp] = (pool.Count, len);
            for (int k = 0; k < len; k++) pool.Add(data[i + 2 + k]);
            i += 2 + len;
        }
        s_decompositionPool = pool.ToArray();

        ReadOnlySpan<int> comp = CompositionData;
        s_compositions = new Dictionary<long, int>(comp.Length / 3);
        for (int i = 0; i < comp.Length; i += 3)
            s_compositions[Key(comp[i], comp[i + 1])] = comp[i + 2];
    }

    private static long Key(int first, int second) => ((long)first << 21) | (uint)second;

    private static int CombiningClass(int cp)
    {
        if (cp < 0x10000) return s_bmpCcc[cp];
        return s_astralCcc.TryGetValue(cp, out byte c) ? c : 0;
    }

    private static bool IsUnsafe(int cp)
    {
        if (cp < 0x10000) return (s_bmpUnsafe[cp >> 6] & (1UL << (cp & 63))) != 0;
        int[] r = s_astralUnsafe;
        for (int i = 0; i < r.Length; i += 2)
            if (cp >= r[i] && cp < r[i + 1]) return true;
        return false;
    }

    /// <summary>
    /// True when NFC certainly leaves <paramref name="text"/> unchanged: no character in it can be rewritten or
    /// combine with its neighbour. This is the common case and costs one vectorised scan for Latin text.
    /// </summary>
    public static bool IsQuickNormalized(ReadOnlySpan<char> text)
    {
        // Nothing below U+0300 (the first combining mark) is affected by NFC.
        int i = text.IndexOfAnyInRange('\u0300', '\uFFFF');
        if (i < 0) return true;
        for (; i < text.Length; i++)
        {
            char c = text[i];
            if (c < '\u0300') continue;
            int cp = c;
            if (char.IsHighSurrogate(c) && i + 1 < text.Length && char.IsLowSurrogate(text[i + 1]))
            {
                cp = char.ConvertToUtf32(c, text[i + 1]);
                i++;
            }
            if (IsUnsafe(cp)) return false;
        }
        return true;
    }

    /// <summary>NFC of <paramref name="text"/>; returns null when the text is already normalized.</summary>
    public static string? NormalizeOrNull(ReadOnlySpan<char> text)
    {
        if (IsQuickNormalized(text)) return null;
        string result = Normalize(text);
        return text.SequenceEqual(result) ? null : result;
    }

    public static string Normalize(ReadOnlySpan<char> text)
    {
        // Canonical decomposition, then canonical ordering of each run of non-starters.
        var cps = new List<int>(text.Length + 8);
        for (int i = 0; i < text.Length;)
        {
            Rune.DecodeFromUtf16(text[i..], out Rune r, out int used);
            i += used;
            Decompose(r.Value, cps);
        }
        SortNonStarterRuns(cps);

        // Canonical composition (the UAX #15 reference loop). lastClass is the class of the last character kept
        // after the current starter: 0 when the candidate is adjacent to the starter, 256 before any starter.
        // The run is already sorted, so lastClass >= cls means an intervening mark blocks the candidate.
        int write = 0, starter = -1, lastClass = 256;
        for (int read = 0; read < cps.Count; read++)
        {
            int cp = cps[read];
            int cls = CombiningClass(cp);
            if (starter >= 0 && (lastClass == 0 || lastClass < cls) && TryCompose(cps[starter], cp, out int composed))
            {
                cps[starter] = composed;
                continue;
            }
            if (cls == 0) starter = write;
            lastClass = cls;
            cps[write++] = cp;
        }

        var sb = new StringBuilder(write + 4);
        for (int i = 0; i < write; i++) sb.Append(new Rune(cps[i]).ToString());
        return sb.ToString();
    }

    private static void Decompose(int cp, List<int> output)
    {
        if (cp < 0xC0)
        {
            output.Add(cp);
            return;
        }
        int s = cp - SBase;
        if ((uint)s < SCount)
        {
            output.Add(LBase + s / NCount);
            output.Add(VBase + s % NCount / TCount);
            if (s % TCount != 0) output.Add(TBase + s % TCount);
            return;
        }
        if (s_decompositions.TryGetValue(cp, out var d))
        {
            for (int k = 0; k < d.Length; k++) output.Add(s_decompositionPool[d.Offset + k]);
            return;
        }
        output.Add(cp);
    }

    private static void SortNonStarterRuns(List<int> cps)
    {
        // Insertion sort keeps equal classes in order (the reordering must be stable) and runs are short.
        for (int i = 1; i < cps.Count; i++)
        {
            int cls = CombiningClass(cps[i]);
            if (cls == 0) continue;
            int cp = cps[i];
            int j = i - 1;
            while (j >= 0)
            {
                int prev = CombiningClass(cps[j]);
                if (prev == 0 || prev <= cls) break;
                cps[j + 1] = cps[j];
                j--;
            }
            cps[j + 1] = cp;
        }
    }

    private static bool TryCompose(int first, int second, out int composed)
    {
        int l = first - LBase, v = second - VBase;
        if ((uint)l < LCount && (uint)v < VCount)
        {
            composed = SBase + (l * VCount + v) * TCount;
            return true;
        }
        int s = first - SBase, t = second - TBase;
        if ((uint)s < SCount && s % TCount == 0 && t > 0 && t < TCount)
        {
            composed = first + t;
            return true;
        }
        return s_compositions.TryGetValue(Key(first, second), out composed);
    }
}
