using System.Diagnostics;
using System.Text;
using System.Text.Json;
using Qwen3Native.Tokenization;

namespace Qwen3Native.Tests.Tokenization;

/// <summary>
/// Every case of tests/fixtures/tokenizer/gold.json, written by make_gold.py with the Hugging Face
/// <c>tokenizers</c> package, must match exactly: encode ids, decode text with and without special tokens,
/// streaming decode, and the vocabulary size.
/// </summary>
public class GoldTests
{
    private sealed record EncodeCase(string Text, int[] Ids);
    private sealed record DecodeCase(int[] Ids, string Text, string TextSkipSpecial);
    private sealed record Gold(string Version, int VocabSize, EncodeCase[] Encode, DecodeCase[] Decode);

    private static readonly Lazy<Gold?> s_gold = new(LoadGold);

    private static Gold RequireGold()
    {
        var gold = s_gold.Value;
        if (gold is null) Assert.Ignore("gold.json has not been generated (run tests/fixtures/tokenizer/make_gold.py).");
        return gold!;
    }

    private static Gold? LoadGold()
    {
        string path = TokenizerFixture.GoldPath;
        if (!File.Exists(path)) return null;
        using var doc = JsonDocument.Parse(File.ReadAllBytes(path));
        var root = doc.RootElement;
        static int[] Ids(JsonElement a) => a.EnumerateArray().Select(e => e.GetInt32()).ToArray();
        var enc = root.GetProperty("encode").EnumerateArray()
            .Select(e => new EncodeCase(e.GetProperty("text").GetString()!, Ids(e.GetProperty("ids")))).ToArray();
        var dec = root.GetProperty("decode").EnumerateArray()
            .Select(e => new DecodeCase(Ids(e.GetProperty("ids")), e.GetProperty("text").GetString()!,
                e.GetProperty("text_skip_special").GetString()!)).ToArray();
        return new Gold(root.GetProperty("tokenizers_version").GetString() ?? "?", root.GetProperty("vocab_size").GetInt32(), enc, dec);
    }

    [Test]
    public void VocabSizeMatches() => Assert.That(TokenizerFixture.Tokenizer.VocabSize, Is.EqualTo(RequireGold().VocabSize));

    [Test]
    public void EveryEncodeCaseMatches()
    {
        var gold = RequireGold();
        var tok = TokenizerFixture.Tokenizer;
        var failures = new List<string>();
        foreach (var c in gold.Encode)
        {
            int[] actual = tok.Encode(c.Text);
            if (!actual.AsSpan().SequenceEqual(c.Ids)) failures.Add(Describe(tok, c, actual));
        }
        TestContext.Out.WriteLine($"tokenizers {gold.Version}: {gold.Encode.Length - failures.Count}/{gold.Encode.Length} encode cases match");
        Assert.That(failures, Is.Empty, string.Join("\n\n", failures.Take(10)));
    }

    [Test]
    public void EveryEncodeCaseRoundTrips()
    {
        // HF decode(encode(text)) == NFC(text) for these inputs; here we check our own decode of the gold ids.
        var gold = RequireGold();
        var tok = TokenizerFixture.Tokenizer;
        foreach (var c in gold.Encode)
            Assert.That(tok.Decode(c.Ids), Is.EqualTo(Nfc.Normalize(c.Text)), Qwen3TokenizerTests.Escape(c.Text));
    }

    [Test]
    public void EveryDecodeCaseMatches()
    {
        var gold = RequireGold();
        var tok = TokenizerFixture.Tokenizer;
        int i = 0;
        foreach (var c in gold.Decode)
        {
            Assert.That(tok.Decode(c.Ids), Is.EqualTo(c.Text), $"decode case {i}");
            Assert.That(tok.Decode(c.Ids, skipSpecialTokens: true), Is.EqualTo(c.TextSkipSpecial), $"decode case {i} (skip special)");
            i++;
        }
    }

    [Test]
    public void StreamingDecodeMatchesEveryDecodeCase()
    {
        var gold = RequireGold();
        var tok = TokenizerFixture.Tokenizer;
        foreach (bool skip in new[] { false, true })
        {
            var decoder = tok.CreateStreamingDecoder(skip);
            int i = 0;
            foreach (var c in gold.Decode)
            {
                var sb = new StringBuilder();
                foreach (int id in c.Ids)
                {
                    string piece = decoder.Push(id);
                    Assert.That(piece.Length == 0 || !char.IsHighSurrogate(piece[^1]), "never half a character");
                    sb.Append(piece);
                }
                sb.Append(decoder.Flush());
                Assert.That(sb.ToString(), Is.EqualTo(skip ? c.TextSkipSpecial : c.Text), $"decode case {i}, skip={skip}");
                i++;
            }
        }
    }

    /// <summary>Single-threaded encode throughput over the gold corpus (run explicitly, preferably with -c Release).</summary>
    [Test, Explicit("benchmark")]
    public void EncodeThroughput()
    {
        var gold = RequireGold();
        var tok = TokenizerFixture.Tokenizer;
        string[] texts = gold.Encode.Select(c => c.Text).ToArray();
        long bytes = texts.Sum(t => (long)Encoding.UTF8.GetByteCount(t));
        foreach (var t in texts) tok.Encode(t); // warm up JIT and cache
        long tokens = 0;
        var sw = Stopwatch.StartNew();
        int rounds = 0;
        while (sw.Elapsed < TimeSpan.FromSeconds(3) || rounds < 3)
        {
            foreach (var t in texts) tokens += tok.Encode(t).Length;
            rounds++;
        }
        sw.Stop();
        double mb = bytes * rounds / 1e6;
        TestContext.Out.WriteLine($"encode: {mb / sw.Elapsed.TotalSeconds:F1} MB/s, {tokens / sw.Elapsed.TotalSeconds / 1e6:F2} M tokens/s " +
                                  $"({rounds} rounds of {bytes / 1e6:F2} MB, {texts.Length} texts)");

        int[][] ids = gold.Encode.Select(c => c.Ids).ToArray();
        sw.Restart();
        rounds = 0;
        while (sw.Elapsed < TimeSpan.FromSeconds(2) || rounds < 3)
        {
            foreach (var x in ids) tok.Decode(x);
            rounds++;
        }
        TestContext.Out.WriteLine($"decode: {bytes * rounds / 1e6 / sw.Elapsed.TotalSeconds:F1} MB/s");

        var loadWatch = Stopwatch.StartNew();
        Qwen3Tokenizer.FromFile(TokenizerFixture.TokenizerJsonPath);
        TestContext.Out.WriteLine($"load tokenizer.json: {loadWatch.ElapsedMilliseconds} ms");
    }

    private static string Describe(Qwen3Tokenizer tok, EncodeCase c, int[] actual)
    {
        int first = 0;
        while (first < actual.Length && first < c.Ids.Length && actual[first] == c.Ids[first]) first++;
        string Window(int[] ids) => string.Join(" ", ids.Skip(Math.Max(0, first - 2)).Take(8)
            .Select(id => $"{id}:{Qwen3TokenizerTests.Escape(tok.IdToToken(id) ?? "?")}"));
        string text = c.Text.Length > 300 ? c.Text[..300] + "…" : c.Text;
        return $"text: {Qwen3TokenizerTests.Escape(text)}\n  first difference at id #{first}\n  expected: {Window(c.Ids)}\n  actual:   {Window(actual)}";
    }
}
