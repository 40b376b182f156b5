using System.Text;
using Qwen3Native.Tokenization;

namespace Qwen3Native.Tests.Tokenization;

/// <summary>The built-in NFC (Unicode 9.0 data, as Hugging Face tokenizers has it).</summary>
public class NormalizationTests
{
    [TestCase("e\u0301", "\u00e9")]
    [TestCase("A\u030A", "\u00C5")]
    [TestCase("\u212B", "\u00C5")] // ANGSTROM SIGN is a singleton
    [TestCase("\u2126", "\u03A9")] // OHM SIGN
    [TestCase("\u1100\u1161\u11A8", "\uAC01")] // Hangul L V T
    [TestCase("\uAC00\u11A8", "\uAC01")] // LV + T
    [TestCase("a\u0328\u0301", "\u0105\u0301")] // ogonek (202) composes first, acute stays
    [TestCase("a\u0301\u0328", "\u0105\u0301")] // reordered by class before composing
    [TestCase("\u0301a", "\u0301a")] // a leading mark has nothing to compose with
    [TestCase("\u00e9\u0301", "\u00e9\u0301")]
    [TestCase("\uFB01", "\uFB01")] // compatibility mappings are not applied
    [TestCase("\u0344", "\u0308\u0301")] // non-starter decomposition
    [TestCase("\u0958", "\u0915\u093C")] // composition exclusion
    [TestCase("𝐀", "𝐀")]
    public void NormalizesToNfc(string input, string expected) => Assert.That(Nfc.Normalize(input), Is.EqualTo(expected));

    [Test]
    public void UsesUnicode9Data()
    {
        // U+11938 DIVES AKURU VOWEL SIGN O (Unicode 13) = U+11935 U+11930. HF's Unicode 9.0 tables do not know it,
        // so the pair stays decomposed (ICU-based string.Normalize would compose it).
        Assert.That(Nfc.Normalize("\U00011935\U00011930"), Is.EqualTo("\U00011935\U00011930"));
        Assert.That(Nfc.IsQuickNormalized("\U00011935\U00011930"), Is.True);
    }

    [Test]
    public void QuickCheck()
    {
        Assert.That(Nfc.IsQuickNormalized("plain ASCII and Latin-1 \u00e9\u00ff"), Is.True);
        Assert.That(Nfc.IsQuickNormalized("中文 テキスト 한국어 😀"), Is.True);
        Assert.That(Nfc.IsQuickNormalized("e\u0301"), Is.False);
        Assert.That(Nfc.IsQuickNormalized("\u212B"), Is.False);
        Assert.That(Nfc.NormalizeOrNull("abc"), Is.Null);
        Assert.That(Nfc.NormalizeOrNull("e\u0301"), Is.EqualTo("\u00e9"));
    }

    /// <summary>For characters that already existed in Unicode 9.0, NFC has not changed since; compare with ICU.</summary>
    [Test]
    public void AgreesWithIcuOnOldCharacters()
    {
        if ("e\u0301".Normalize(NormalizationForm.FormC).Length != 1)
            Assert.Ignore("string.Normalize is unavailable (invariant globalization mode).");
        (int From, int To)[] ranges =
        {
            (0x41, 0x5A), (0xC0, 0x17F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF), (0x591, 0x5C7), (0x610, 0x61A),
            (0x64B, 0x65F), (0x900, 0x977), (0x9BC, 0x9D7), (0xB3C, 0xB57), (0xBBE, 0xBD7), (0xCBF, 0xCD6),
            (0xD3E, 0xD57), (0xDCA, 0xDDF), (0xF71, 0xF81), (0x102E, 0x1038), (0x1100, 0x11FF), (0x1B05, 0x1B44),
            (0x1E00, 0x1FFF), (0x2126, 0x212B), (0x3099, 0x309A), (0x304B, 0x30FE), (0xAC00, 0xAC60), (0xF900, 0xFA0D),
        };
        var rng = new Random(7);
        for (int n = 0; n < 30_000; n++)
        {
            var sb = new StringBuilder();
            int len = rng.Next(1, 8);
            for (int i = 0; i < len; i++)
            {
                var (from, to) = ranges[rng.Next(ranges.Length)];
                sb.Append((char)rng.Next(from, to + 1));
            }
            string s = sb.ToString();
            Assert.That(Nfc.Normalize(s), Is.EqualTo(s.Normalize(NormalizationForm.FormC)), Qwen3TokenizerTests.Escape(s));
        }
    }
}
