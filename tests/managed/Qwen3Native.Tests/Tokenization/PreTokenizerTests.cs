using System.Text;
using System.Text.RegularExpressions;
using Qwen3Native.Tokenization;

namespace Qwen3Native.Tests.Tokenization;

/// <summary>The hand-written Qwen pre-tokenizer scanner against hand-derived splits and against .NET's Regex.</summary>
public class PreTokenizerTests
{
    private static string[] Pieces(string text)
    {
        var list = new List<(int Start, int Length)>();
        QwenSplitter.Instance.Split(text, 0, text.Length, list);
        return list.Select(p => text.Substring(p.Start, p.Length)).ToArray();
    }

    [TestCase("Hello world", new[] { "Hello", " world" })]
    [TestCase("I'm here", new[] { "I", "'m", " here" })]
    [TestCase("don't DON'T we'll WE'LL they're", new[] { "don", "'t", " DON", "'T", " we", "'ll", " WE", "'LL", " they", "'re" })]
    [TestCase("'sup", new[] { "'s", "up" })]
    [TestCase("'hello", new[] { "'hello" })]
    [TestCase("'ſ", new[] { "'ſ" })] // long s case-folds to s
    [TestCase("123 abc", new[] { "1", "2", "3", " abc" })]
    [TestCase("a  b", new[] { "a", " ", " b" })]
    [TestCase("a\n\nb", new[] { "a", "\n\n", "b" })]
    [TestCase("x   \n  y", new[] { "x", "   \n", " ", " y" })]
    [TestCase("trailing   ", new[] { "trailing", "   " })]
    [TestCase("...\n\nx", new[] { "...\n\n", "x" })]
    [TestCase(" .", new[] { " ." })]
    [TestCase("\t.", new[] { "\t", "." })]
    [TestCase("\t\t x", new[] { "\t\t", " x" })]
    [TestCase("😀abc", new[] { "😀abc" })]
    [TestCase("a😀😀b", new[] { "a", "😀😀", "b" })]
    [TestCase("𝐀𝐁c 𝐀", new[] { "𝐀𝐁c", " 𝐀" })] // astral letters are letters
    [TestCase("٣٤٥", new[] { "٣", "٤", "٥" })]
    [TestCase("\u00a0non", new[] { "\u00a0non" })]
    [TestCase("a \r\n b", new[] { "a", " \r\n", " b" })]
    [TestCase("\r\n", new[] { "\r\n" })]
    [TestCase("x\u3000\u3000y", new[] { "x", "\u3000", "\u3000y" })]
    [TestCase("e\u0301x", new[] { "e", "\u0301x" })] // a lone mark is neither letter nor number
    [TestCase("__init__", new[] { "__", "init", "__" })]
    [TestCase("a\0b", new[] { "a", "\0b" })]
    [TestCase("._x", new[] { "._", "x" })] // the punctuation run is greedy, so no prefix is left for the word
    public void SplitsLikeTheRegex(string text, string[] expected) => Assert.That(Pieces(text), Is.EqualTo(expected));

    [Test]
    public void PiecesTileTheInput()
    {
        string text = "Mixed: 中文 text, 123 числа\r\n\t  and 😀 emoji's   \n";
        Assert.That(string.Concat(Pieces(text)), Is.EqualTo(text));
    }

    /// <summary>
    /// On BMP text without 'ſ' .NET's Regex and Oniguruma agree on this pattern, so the scanner must give the
    /// same pieces as Regex for random mixtures of the character kinds the pattern distinguishes.
    /// </summary>
    [Test]
    public void AgreesWithDotNetRegexOnBmpText()
    {
        var regex = new Regex(QwenSplitter.Pattern, RegexOptions.CultureInvariant);
        string[] pool =
        {
            "a", "Z", "é", "中", "ж", "ß", "İ", "ǅ", "ʰ", "1", "٣", "Ⅻ", "½", "²", " ", "  ", "\t", "\n", "\r", "\r\n", "\v", "\f",
            "\u0085", "\u00a0", "\u2028", "\u3000", "\u200b", "\ufeff", "'", "'s", "'S", "'t", "'re", "'RE", "'ve", "'m", "'ll", "'Ll",
            "'d", "'x", ".", ",", "!", "?", "-", "_", "(", ")", "{", "}", "<", ">", "|", "\\", "\"", "#", "$", "\u0301", "\u0300",
            "\u0000", "\u007f", "\ue000", "™", "€", "→",
        };
        var rng = new Random(42);
        for (int n = 0; n < 20_000; n++)
        {
            var sb = new StringBuilder();
            int len = rng.Next(1, 16);
            for (int i = 0; i < len; i++) sb.Append(pool[rng.Next(pool.Length)]);
            string text = sb.ToString();
            string[] expected = regex.Matches(text).Select(m => m.Value).ToArray();
            Assert.That(string.Concat(expected), Is.EqualTo(text), "every character is matched by some alternative");
            Assert.That(Pieces(text), Is.EqualTo(expected), Qwen3TokenizerTests.Escape(text));
        }
    }

    [Test]
    public void ClassifiesLikeUnicode()
    {
        Assert.That(UnicodeClass.Classify('a'), Is.EqualTo(UnicodeClass.Letter));
        Assert.That(UnicodeClass.Classify(0x1D400), Is.EqualTo(UnicodeClass.Letter), "MATHEMATICAL BOLD CAPITAL A");
        Assert.That(UnicodeClass.Classify(0x20000), Is.EqualTo(UnicodeClass.Letter), "CJK extension B");
        Assert.That(UnicodeClass.Classify(0x1F600), Is.EqualTo(0), "emoji");
        Assert.That(UnicodeClass.Classify(0x2163), Is.EqualTo(UnicodeClass.Number), "ROMAN NUMERAL FOUR");
        Assert.That(UnicodeClass.Classify(0x00B2), Is.EqualTo(UnicodeClass.Number), "SUPERSCRIPT TWO");
        Assert.That(UnicodeClass.Classify('\n'), Is.EqualTo(UnicodeClass.Space | UnicodeClass.LineBreak));
        Assert.That(UnicodeClass.Classify(0x85), Is.EqualTo(UnicodeClass.Space));
        Assert.That(UnicodeClass.Classify(0x200B), Is.EqualTo(0), "ZERO WIDTH SPACE is not White_Space");
        Assert.That(UnicodeClass.Classify(0x180E), Is.EqualTo(0), "MONGOLIAN VOWEL SEPARATOR is not White_Space since 6.3");
        Assert.That(UnicodeClass.Classify(0x1C), Is.EqualTo(0), "information separators are not White_Space");
    }
}
