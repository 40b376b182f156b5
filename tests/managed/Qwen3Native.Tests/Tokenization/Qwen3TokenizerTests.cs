using System.Diagnostics;
using System.Text;
using Qwen3Native.Tokenization;

namespace Qwen3Native.Tests.Tokenization;

/// <summary>Hand-checkable behaviour of the real Qwen3 tokenizer; ids are read from tokenizer.json's vocabulary.</summary>
public class Qwen3TokenizerTests
{
    private static Qwen3Tokenizer Tok => TokenizerFixture.Tokenizer;
    private static int Id(string token) => TokenizerFixture.Id(token);

    [Test]
    public void LoadsTheQwen3Vocabulary()
    {
        Assert.That(Tok.VocabSize, Is.EqualTo(151_669));
        Assert.That(Tok.SpecialTokens["<|im_end|>"], Is.EqualTo(151645));
        Assert.That(Tok.SpecialTokens["<|im_start|>"], Is.EqualTo(151644));
        Assert.That(Tok.SpecialTokens["<|endoftext|>"], Is.EqualTo(151643));
        Assert.That(Tok.SpecialTokens.ContainsKey("<think>"), Is.False, "<think> is an added token but not special");
        Assert.That(Tok.TokenToId("<think>"), Is.EqualTo(151667));
        Assert.That(Tok.IdToToken(151668), Is.EqualTo("</think>"));
        Assert.That(Tok.IdToToken(1879), Is.EqualTo("Ġworld"));
        Assert.That(Tok.IdToToken(151669), Is.Null);
        Assert.That(Tok.IdToToken(-1), Is.Null);
        Assert.That(Tok.IsSpecial(151645), Is.True);
        Assert.That(Tok.IsSpecial(151667), Is.False);
        Assert.That(Tok.IsSpecial(9707), Is.False);
        Assert.That(Tok.IsSpecial(-5), Is.False);
        Assert.That(Tok.AddedTokens, Has.Count.EqualTo(26));
    }

    [Test]
    public void HelloWorld() => Assert.That(Tok.Encode("Hello world"), Is.EqualTo(new[] { 9707, 1879 }));

    [Test]
    public void EmptyString() => Assert.That(Tok.Encode(""), Is.Empty);

    [Test]
    public void WhitespaceRuns()
    {
        // "a  b": the space run keeps its last space for the word ("\s+(?!\S)"), so " " then " b".
        Assert.That(Tok.Encode("a  b"), Is.EqualTo(new[] { Id("a"), Id("Ġ"), Id("Ġb") }));
        Assert.That(Tok.Encode("\n"), Is.EqualTo(new[] { Id("Ċ") }));
        Assert.That(Tok.Encode("\n\n"), Is.EqualTo(new[] { Id("ĊĊ") }));
        Assert.That(Tok.Encode("\t\t x"), Is.EqualTo(new[] { Id("ĉĉ"), Id("Ġx") }));
    }

    [Test]
    public void ChatTemplateMarkersAreSingleIds()
    {
        int[] ids = Tok.Encode("<|im_start|>user\nHi<|im_end|>\n");
        Assert.That(ids, Is.EqualTo(new[] { 151644, Id("user"), Id("Ċ"), Id("Hi"), 151645, Id("Ċ") }));
        Assert.That(Tok.Encode("<think>\n\n</think>"), Is.EqualTo(new[] { 151667, Id("ĊĊ"), 151668 }));
    }

    [Test]
    public void SpecialTokensCanBeTreatedAsText()
    {
        int[] asText = Tok.Encode("<|im_end|>", parseSpecialTokens: false);
        // Pre-tokenized as "<|", "im", "_end", "|>".
        int[] expected = Tok.Encode("<|").Concat(Tok.Encode("im")).Concat(Tok.Encode("_end")).Concat(Tok.Encode("|>")).ToArray();
        Assert.That(asText, Is.EqualTo(expected));
        Assert.That(asText, Does.Not.Contain(151645));
        Assert.That(Tok.Decode(asText), Is.EqualTo("<|im_end|>"));
        // Non-special added tokens stay recognised (HF's encode_special_tokens only affects special ones).
        Assert.That(Tok.Encode("<think>", parseSpecialTokens: false), Is.EqualTo(new[] { 151667 }));
    }

    [Test]
    public void SpecialTokenLookAlikesAreText()
    {
        foreach (string s in new[] { "<|im_start", "<im_start|>", "< |im_start|>", "<|IM_START|>", "<|im_end|", "<tool_call", "<|endoftext |>" })
        {
            int[] ids = Tok.Encode(s);
            Assert.That(ids.Any(Tok.IsSpecial), Is.False, s);
            Assert.That(ids.Any(i => i >= 151643), Is.False, s);
            Assert.That(Tok.Decode(ids), Is.EqualTo(s));
        }
        // A real marker glued to a look-alike: the longest leftmost match wins.
        Assert.That(Tok.Encode("<|<|im_end|>"), Is.EqualTo(Tok.Encode("<|").Append(151645).ToArray()));
    }

    [Test]
    public void Contractions()
    {
        Assert.That(Tok.Encode("I'm"), Is.EqualTo(new[] { Id("I"), Id("'m") }));
        Assert.That(Tok.Encode("it's"), Is.EqualTo(new[] { Id("it"), Id("'s") }));
        Assert.That(Tok.Encode("IT'S"), Is.EqualTo(new[] { Id("IT"), Id("'S") }));
    }

    [Test]
    public void NumbersAreSplitIntoDigits()
    {
        Assert.That(Tok.Encode("12345"), Is.EqualTo(new[] { Id("1"), Id("2"), Id("3"), Id("4"), Id("5") }));
        Assert.That(Tok.Encode(" 42"), Is.EqualTo(new[] { Id("Ġ"), Id("4"), Id("2") }));
    }

    [Test]
    public void CombiningSequencesAreComposedFirst()
    {
        Assert.That(Tok.Encode("e\u0301"), Is.EqualTo(Tok.Encode("\u00e9")));
        Assert.That(Tok.Encode("A\u030A"), Is.EqualTo(Tok.Encode("\u00C5")));
        Assert.That(Tok.Encode("\u1100\u1161"), Is.EqualTo(Tok.Encode("\uAC00")));
        // NFC is not NFKC: the ligature and full-width letters stay as they are.
        Assert.That(Tok.Decode(Tok.Encode("\uFB01 \uFF46")), Is.EqualTo("\uFB01 \uFF46"));
    }

    [Test]
    public void NulAndControlCharacters()
    {
        string s = "\0 NUL inside\u0001\u007f";
        int[] ids = Tok.Encode(s);
        Assert.That(ids[0], Is.EqualTo(Id("Ā")), "NUL is byte 0, 'Ā' in the byte alphabet");
        Assert.That(Tok.Decode(ids), Is.EqualTo(s));
    }

    [Test]
    public void LoneSurrogatesBecomeReplacementCharacters()
    {
        Assert.That(Tok.Encode("a\uD800b"), Is.EqualTo(Tok.Encode("a\uFFFDb")));
        Assert.That(Tok.Encode("\uDC00"), Is.EqualTo(Tok.Encode("\uFFFD")));
        Assert.That(Tok.Encode("x\uD83D"), Is.EqualTo(Tok.Encode("x\uFFFD")));
        Assert.That(Tok.Encode("\uDE00\uD83D"), Is.EqualTo(Tok.Encode("\uFFFD\uFFFD")), "reversed pair is two lone halves");
        Assert.That(Tok.Decode(Tok.Encode("ok \uD83D\uDE00")), Is.EqualTo("ok \uD83D\uDE00"));
    }

    [TestCase("Hello, world! 你好，世界。")]
    [TestCase("Emoji: 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇺🇸")]
    [TestCase("    def f(x):\n        return x * 2\r\n\tpass\n")]
    [TestCase("𝐀𝐁𝐂 mathematical letters and 𠀀 CJK extension B")]
    [TestCase("Zero width: a\u200bb\u200cc\u200dd\ufeffe")]
    [TestCase("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n<think>\n</think>\n\n")]
    public void RoundTrips(string text) => Assert.That(Tok.Decode(Tok.Encode(text)), Is.EqualTo(text));

    [Test]
    public void DecodeSkipsOnlySpecialTokens()
    {
        int[] ids = Tok.Encode("<|im_start|>assistant\n<think>x</think>Hi<|im_end|>");
        Assert.That(Tok.Decode(ids), Is.EqualTo("<|im_start|>assistant\n<think>x</think>Hi<|im_end|>"));
        Assert.That(Tok.Decode(ids, skipSpecialTokens: true), Is.EqualTo("assistant\n<think>x</think>Hi"));
    }

    [Test]
    public void DecodeInvalidUtf8IsLossy()
    {
        int f09f = Id("ðŁ"); // bytes F0 9F: the start of a 4-byte character
        Assert.That(Tok.Decode(new[] { f09f }), Is.EqualTo("\uFFFD"));
        Assert.That(Tok.Decode(new[] { f09f, Id("A") }), Is.EqualTo("\uFFFDA"));
        Assert.That(Tok.Decode(new[] { f09f, Id("ĺ"), Id("Ģ") }), Is.EqualTo("😀"));
        Assert.That(Tok.Decode(new[] { Id("Ģ"), Id("Ģ") }), Is.EqualTo("\uFFFD\uFFFD"), "two stray continuation bytes");
        Assert.That(Tok.Decode(ReadOnlySpan<int>.Empty), Is.EqualTo(""));
    }

    [Test]
    public void DecodeRejectsUnknownIds()
    {
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => Tok.Decode(new[] { 9707, 151669 }));
        Assert.That(e!.Message, Does.Contain("151669").And.Contain("index 1"));
        Assert.Throws<ArgumentOutOfRangeException>(() => Tok.Decode(new[] { -1 }));
        Assert.Throws<ArgumentOutOfRangeException>(() => Tok.Decode(new[] { 151935 }), "embedding rows past the vocabulary are not tokens");
        Assert.Throws<ArgumentOutOfRangeException>(() => Tok.Decode(new[] { int.MaxValue }));
        Assert.Throws<ArgumentOutOfRangeException>(() => Tok.CreateStreamingDecoder().Push(200_000));
    }

    [Test]
    public void NullArgumentsThrow()
    {
        Assert.Throws<ArgumentNullException>(() => Tok.Encode(null!));
        Assert.Throws<ArgumentNullException>(() => Qwen3Tokenizer.FromFile(null!));
        Assert.Throws<FileNotFoundException>(() => Qwen3Tokenizer.FromFile(Path.Combine(TokenizerFixture.Directory, "missing.json")));
    }

    [Test]
    public void EncodeAppendsToAList()
    {
        var list = new List<int> { 7 };
        Tok.Encode("Hello world", list);
        Assert.That(list, Is.EqualTo(new[] { 7, 9707, 1879 }));
    }

    // One megabyte of a single character makes one huge pre-token (or a million tiny ones); both must stay fast.
    [TestCase("a")]
    [TestCase(" ")]
    [TestCase("\n")]
    [TestCase("1")]
    [TestCase(".")]
    [TestCase("😀")]
    [TestCase("中")]
    [TestCase("'s")]
    [TestCase("\0")]
    public void OneMegabyteOfOneCharacter(string unit)
    {
        string text = string.Concat(Enumerable.Repeat(unit, 1_000_000 / unit.Length));
        var tok = Tok; // load outside the timed region
        var sw = Stopwatch.StartNew();
        int[] ids = tok.Encode(text);
        sw.Stop();
        Assert.That(sw.Elapsed, Is.LessThan(TimeSpan.FromSeconds(10)), "encoding must be near-linear");
        Assert.That(Tok.Decode(ids), Is.EqualTo(text));
        TestContext.Out.WriteLine($"{Escape(unit)} x {text.Length / unit.Length}: {ids.Length} ids in {sw.ElapsedMilliseconds} ms");
    }

    [Test]
    public void ConcurrentEncodingGivesTheSameIds()
    {
        string[] texts = Enumerable.Range(0, 64).Select(i => $"Thread test {i}: 你好 {i * 7919} emoji 😀 <|im_end|> café").ToArray();
        int[][] expected = texts.Select(t => Tok.Encode(t)).ToArray();
        Parallel.For(0, 2000, i =>
        {
            int k = i % texts.Length;
            Assert.That(Tok.Encode(texts[k]), Is.EqualTo(expected[k]));
        });
    }

    [Test]
    public void BpeMatchesTheTextbookMergeLoop()
    {
        // The heap-based merge must pick the same pair as "repeatedly merge the lowest-ranked (leftmost) pair".
        var rng = new Random(1234);
        string alphabet = "aaabbbeeeiinnorrssttlllmmp  ...日本語のテキスト😀é";
        var model = Tok.Model;
        for (int n = 0; n < 3000; n++)
        {
            int len = rng.Next(1, n % 10 == 0 ? 400 : 20);
            var sb = new StringBuilder();
            while (sb.Length < len)
            {
                int i = rng.Next(alphabet.Length);
                if (char.IsHighSurrogate(alphabet[i])) sb.Append(alphabet, i, 2);
                else if (!char.IsLowSurrogate(alphabet[i])) sb.Append(alphabet[i]);
            }
            string word = sb.ToString();
            var actual = new List<int>();
            model.Encode(word, actual);
            Assert.That(actual, Is.EqualTo(NaiveBpe(model, word)), word);
        }
    }

    private static List<int> NaiveBpe(BpeModel model, string word)
    {
        var ids = Encoding.UTF8.GetBytes(word).Select(b => model.ByteToId(b)).ToList();
        while (true)
        {
            int bestRank = int.MaxValue, bestAt = -1, bestId = -1;
            for (int i = 0; i + 1 < ids.Count; i++)
            {
                if (model.TryGetMerge(ids[i], ids[i + 1], out int rank, out int merged) && rank < bestRank)
                {
                    bestRank = rank;
                    bestAt = i;
                    bestId = merged;
                }
            }
            if (bestAt < 0) return ids;
            ids[bestAt] = bestId;
            ids.RemoveAt(bestAt + 1);
        }
    }

    internal static string Escape(string s) =>
        string.Concat(s.Select(c => c < 0x20 || c > 0x7e ? $"\\u{(int)c:x4}" : c.ToString()));
}
