using System.Text;
using Qwen3Native.Tokenization;

namespace Qwen3Native.Tests.Tokenization;

public class StreamingDecoderTests
{
    private static Qwen3Tokenizer Tok => TokenizerFixture.Tokenizer;
    private static int Id(string token) => TokenizerFixture.Id(token);

    [Test]
    public void HoldsBackHalfCharacters()
    {
        var d = Tok.CreateStreamingDecoder();
        Assert.That(d.Push(Id("Hello")), Is.EqualTo("Hello"));
        Assert.That(d.Push(Id("ðŁ")), Is.EqualTo(""), "F0 9F starts a 4-byte character");
        Assert.That(d.HasPendingBytes, Is.True);
        Assert.That(d.Push(Id("ĺ")), Is.EqualTo(""));
        Assert.That(d.Push(Id("Ģ")), Is.EqualTo("😀"));
        Assert.That(d.HasPendingBytes, Is.False);
        Assert.That(d.Flush(), Is.EqualTo(""));
    }

    [Test]
    public void InvalidBytesBecomeReplacementCharactersAsSoonAsCertain()
    {
        var d = Tok.CreateStreamingDecoder();
        Assert.That(d.Push(Id("Ģ")), Is.EqualTo("\uFFFD"), "a stray continuation byte can never become valid");
        Assert.That(d.Push(Id("ðŁ")), Is.EqualTo(""));
        Assert.That(d.Push(Id("A")), Is.EqualTo("\uFFFDA"), "the unfinished character is cut off");
        Assert.That(d.Push(Id("ðŁ")), Is.EqualTo(""));
        Assert.That(d.Flush(), Is.EqualTo("\uFFFD"), "an unfinished character at the end is one U+FFFD");
        Assert.That(d.Push(Id("A")), Is.EqualTo("A"), "usable after Flush");
    }

    [Test]
    public void SkipsSpecialTokensWhenAsked()
    {
        var skip = Tok.CreateStreamingDecoder(skipSpecialTokens: true);
        var keep = Tok.CreateStreamingDecoder();
        Assert.That(skip.Push(151645), Is.EqualTo(""));
        Assert.That(keep.Push(151645), Is.EqualTo("<|im_end|>"));
        Assert.That(skip.Push(151667), Is.EqualTo("<think>"), "<think> is not special");
    }

    [Test]
    public void RandomIdStreamsEqualOneShotDecode()
    {
        // Byte-level ids 0..255 and multi-byte fragments make lots of broken and completed characters.
        var rng = new Random(99);
        var decoder = Tok.CreateStreamingDecoder();
        for (int n = 0; n < 3000; n++)
        {
            int len = rng.Next(1, 30);
            var ids = new int[len];
            for (int i = 0; i < len; i++)
                ids[i] = rng.Next(4) switch
                {
                    0 => rng.Next(256),
                    1 => rng.Next(Tok.VocabSize),
                    2 => rng.Next(140_000, 151_643),
                    _ => Tok.Encode("é中😀")[rng.Next(Tok.Encode("é中😀").Length)],
                };
            var sb = new StringBuilder();
            foreach (int id in ids) sb.Append(decoder.Push(id));
            sb.Append(decoder.Flush());
            Assert.That(sb.ToString(), Is.EqualTo(Tok.Decode(ids)), string.Join(",", ids));
        }
    }
}
