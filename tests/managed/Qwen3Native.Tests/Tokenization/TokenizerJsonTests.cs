using System.Text;
using System.Text.Json.Nodes;
using Qwen3Native.Tokenization;

namespace Qwen3Native.Tests.Tokenization;

/// <summary>
/// tokenizer.json handling on a tiny synthetic byte-level tokenizer: rejected formats, merges formats,
/// ignore_merges, and the added-token flags that Qwen3 itself does not use (lstrip, rstrip, single_word, normalized).
/// </summary>
public class TokenizerJsonTests
{
    // Byte-level alphabet in byte order gets ids 0..255; then a few merges for "hello" and " world".
    private static readonly (string Left, string Right)[] s_merges =
    {
        ("h", "e"), ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "w"), ("o", "r"), ("Ġw", "or"), ("l", "d"), ("Ġwor", "ld"),
    };

    private static JsonObject TinyJson()
    {
        var vocab = new JsonObject();
        int next = 0;
        for (int b = 0; b < 256; b++) vocab[ByteLevel.ByteToChar[b].ToString()] = next++;
        foreach (var (l, r) in s_merges)
            if (!vocab.ContainsKey(l + r)) vocab[l + r] = next++;
        var merges = new JsonArray();
        foreach (var (l, r) in s_merges) merges.Add(new JsonArray(l, r));
        return new JsonObject
        {
            ["version"] = "1.0",
            ["added_tokens"] = new JsonArray(),
            ["normalizer"] = new JsonObject { ["type"] = "NFC" },
            ["pre_tokenizer"] = new JsonObject
            {
                ["type"] = "Sequence",
                ["pretokenizers"] = new JsonArray(
                    new JsonObject
                    {
                        ["type"] = "Split",
                        ["pattern"] = new JsonObject { ["Regex"] = QwenSplitter.Pattern },
                        ["behavior"] = "Isolated",
                        ["invert"] = false,
                    },
                    new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["trim_offsets"] = false, ["use_regex"] = false }),
            },
            ["decoder"] = new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["trim_offsets"] = false, ["use_regex"] = false },
            ["model"] = new JsonObject
            {
                ["type"] = "BPE",
                ["dropout"] = null,
                ["unk_token"] = null,
                ["continuing_subword_prefix"] = "",
                ["end_of_word_suffix"] = "",
                ["fuse_unk"] = false,
                ["byte_fallback"] = false,
                ["ignore_merges"] = false,
                ["vocab"] = vocab,
                ["merges"] = merges,
            },
        };
    }

    private static Qwen3Tokenizer Load(JsonObject json) => Qwen3Tokenizer.FromJson(json.ToJsonString());

    private static int AddToken(JsonObject json, string content, bool special = false, bool normalized = false,
        bool lstrip = false, bool rstrip = false, bool singleWord = false)
    {
        var vocab = json["model"]!["vocab"]!.AsObject();
        var added = json["added_tokens"]!.AsArray();
        int id = vocab.Count + added.Count;
        added.Add(new JsonObject
        {
            ["id"] = id, ["content"] = content, ["single_word"] = singleWord, ["lstrip"] = lstrip, ["rstrip"] = rstrip,
            ["normalized"] = normalized, ["special"] = special,
        });
        return id;
    }

    private static int B(char c) => c; // ids follow byte order, so an ASCII character's id is its code

    [Test]
    public void TinyTokenizerMerges()
    {
        var tok = Load(TinyJson());
        int hello = tok.TokenToId("hello")!.Value, world = tok.TokenToId("Ġworld")!.Value;
        Assert.That(tok.Encode("hello world"), Is.EqualTo(new[] { hello, world }));
        Assert.That(tok.Encode("help"), Is.EqualTo(new[] { tok.TokenToId("he")!.Value, B('l'), B('p') }));
        Assert.That(tok.Decode(tok.Encode("hello world")), Is.EqualTo("hello world"));
    }

    [Test]
    public void LegacyStringMergesGiveTheSameIds()
    {
        var json = TinyJson();
        var legacy = new JsonArray();
        legacy.Add("#version: 0.2");
        foreach (var (l, r) in s_merges) legacy.Add($"{l} {r}");
        json["model"]!["merges"] = legacy;
        Assert.That(Load(json).Encode("hello world, hell"), Is.EqualTo(Load(TinyJson()).Encode("hello world, hell")));
    }

    [Test]
    public void IgnoreMergesTakesWholeWordsFromTheVocabulary()
    {
        var json = TinyJson();
        json["model"]!["vocab"]!["Ġtiny"] = 9999;
        Assert.That(Load(json).Encode(" tiny"), Is.EqualTo(new[] { 32 /* Ġ, the byte-level form of byte 0x20 */, B('t'), B('i'), B('n'), B('y') }));
        json["model"]!["ignore_merges"] = true;
        Assert.That(Load(json).Encode(" tiny"), Is.EqualTo(new[] { 9999 }));
        Assert.That(Load(json).Encode(" tin"), Is.EqualTo(new[] { 32, B('t'), B('i'), B('n') }));
    }

    [Test]
    public void RStripAndLStripSwallowWhitespace()
    {
        var json = TinyJson();
        int r = AddToken(json, "<r>", rstrip: true);
        int l = AddToken(json, "<l>", lstrip: true);
        var tok = Load(json);
        Assert.That(tok.Encode("a<r>  \t b"), Is.EqualTo(new[] { B('a'), r, B('b') }));
        Assert.That(tok.Encode("a \n <l>b"), Is.EqualTo(new[] { B('a'), l, B('b') }));
        // Whitespace between the two is taken by the first token's rstrip.
        Assert.That(tok.Encode("<r>   <l>"), Is.EqualTo(new[] { r, l }));
    }

    [Test]
    public void SingleWordTokensDoNotMatchInsideWords()
    {
        var json = TinyJson();
        int ony = AddToken(json, "ony", singleWord: true);
        var tok = Load(json);
        Assert.That(tok.Encode("ony"), Is.EqualTo(new[] { ony }));
        Assert.That(tok.Encode("a ony, b"), Does.Contain(ony));
        Assert.That(tok.Encode("Tony"), Does.Not.Contain(ony));
        Assert.That(tok.Encode("onyx"), Does.Not.Contain(ony));
        Assert.That(tok.Encode("a\u0301ony"), Does.Not.Contain(ony), "a combining mark is a word character");
    }

    [Test]
    public void NormalizedTokensMatchAfterNfc()
    {
        var json = TinyJson();
        int normalized = AddToken(json, "caf\u00e9", normalized: true);
        int raw = AddToken(json, "\u00c5ngstr", normalized: false);
        var tok = Load(json);
        Assert.That(tok.Encode("cafe\u0301"), Is.EqualTo(new[] { normalized }));
        Assert.That(tok.Encode("caf\u00e9"), Is.EqualTo(new[] { normalized }));
        Assert.That(tok.Encode("\u00c5ngstr"), Is.EqualTo(new[] { raw }));
        Assert.That(tok.Encode("A\u030angstr"), Does.Not.Contain(raw), "non-normalized tokens match the raw text only");
    }

    [Test]
    public void SpecialFlagDecidesWhatParseSpecialTokensFalseKeeps()
    {
        var json = TinyJson();
        int special = AddToken(json, "<s>", special: true);
        int plain = AddToken(json, "<p>");
        var tok = Load(json);
        Assert.That(tok.Encode("<s><p>"), Is.EqualTo(new[] { special, plain }));
        Assert.That(tok.Encode("<s><p>", parseSpecialTokens: false), Is.EqualTo(new[] { B('<'), B('s'), B('>'), plain }));
        Assert.That(tok.Decode(new[] { special, plain }, skipSpecialTokens: true), Is.EqualTo("<p>"));
        Assert.That(tok.VocabSize, Is.EqualTo(256 + 9 + 2)); // bytes, merge results, added tokens
    }

    [Test]
    public void Gpt2StyleByteLevelRegexIsSupported()
    {
        var json = TinyJson();
        json["pre_tokenizer"] = new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["use_regex"] = true };
        var tok = Load(json);
        Assert.That(tok.Encode("hello world"), Is.EqualTo(new[] { tok.TokenToId("hello")!.Value, tok.TokenToId("Ġworld")!.Value }));
        Assert.That(tok.Decode(tok.Encode("x  123 !! y")), Is.EqualTo("x  123 !! y"));
    }

    [Test]
    public void UnknownBytesAreDroppedOrBecomeUnk()
    {
        var json = TinyJson();
        json["model"]!["vocab"]!.AsObject().Remove("z");
        Assert.That(Load(json).Encode("zaz"), Is.EqualTo(new[] { B('a') }), "HF drops characters it cannot encode when there is no unk token");
        json["model"]!["unk_token"] = "Ġ";
        Assert.That(Load(json).Encode("zza"), Is.EqualTo(new[] { 32, 32, B('a') }));
        json["model"]!["fuse_unk"] = true;
        Assert.That(Load(json).Encode("zza"), Is.EqualTo(new[] { 32, B('a') }));
    }

    private static void AssertRejected(JsonObject json, string messagePart)
    {
        var e = Assert.Throws<TokenizerFormatException>(() => Load(json));
        Assert.That(e!.Message, Does.Contain(messagePart));
        Assert.That(e, Is.InstanceOf<FormatException>());
    }

    [Test]
    public void RejectsMissingModel()
    {
        var json = TinyJson();
        json.Remove("model");
        AssertRejected(json, "\"model\"");
    }

    [Test]
    public void RejectsNonBpeModels()
    {
        var json = TinyJson();
        json["model"]!["type"] = "WordPiece";
        AssertRejected(json, "WordPiece");
    }

    [Test]
    public void RejectsUnknownPreTokenizers()
    {
        var json = TinyJson();
        json["pre_tokenizer"]!["pretokenizers"]!.AsArray().Insert(0, new JsonObject { ["type"] = "Whitespace" });
        AssertRejected(json, "Whitespace");
    }

    [TestCase("normalizer", "{\"type\":\"NFKC\"}", "NFKC")]
    [TestCase("decoder", "{\"type\":\"WordPiece\"}", "WordPiece")]
    [TestCase("decoder", "null", "decoder")]
    [TestCase("pre_tokenizer", "{\"type\":\"Split\",\"pattern\":{\"Regex\":\"a\"},\"behavior\":\"Removed\"}", "Removed")]
    [TestCase("pre_tokenizer", "{\"type\":\"ByteLevel\",\"add_prefix_space\":true}", "add_prefix_space")]
    [TestCase("pre_tokenizer", "{\"type\":\"Sequence\",\"pretokenizers\":[{\"type\":\"Split\",\"pattern\":{\"Regex\":\"(\"},\"behavior\":\"Isolated\"},{\"type\":\"ByteLevel\",\"add_prefix_space\":false}]}", "not a valid")]
    public void RejectsUnsupportedComponents(string property, string value, string messagePart)
    {
        var json = TinyJson();
        json[property] = JsonNode.Parse(value);
        AssertRejected(json, messagePart);
    }

    [Test]
    public void RejectsMergesOutsideTheVocabulary()
    {
        var json = TinyJson();
        json["model"]!["merges"]!.AsArray().Add(new JsonArray("q", "q"));
        AssertRejected(json, "'qq' is not in the vocabulary");
        json = TinyJson();
        json["model"]!["merges"]!.AsArray().Add("a b c");
        AssertRejected(json, "Merge #");
    }

    [Test]
    public void RejectsDropoutAndBrokenJson()
    {
        var json = TinyJson();
        json["model"]!["dropout"] = 0.1;
        AssertRejected(json, "dropout");
        Assert.Throws<TokenizerFormatException>(() => Qwen3Tokenizer.FromJson("{\"model\": "));
        Assert.Throws<TokenizerFormatException>(() => Qwen3Tokenizer.FromJson("[1, 2]"));
        Assert.Throws<TokenizerFormatException>(() => Qwen3Tokenizer.FromJson(new MemoryStream(Encoding.UTF8.GetBytes("not json"))));
    }

    [Test]
    public void StreamOverloadLoadsToo()
    {
        using var stream = new MemoryStream(Encoding.UTF8.GetBytes(TinyJson().ToJsonString()));
        Assert.That(Qwen3Tokenizer.FromJson(stream).Encode("hello"), Has.Length.EqualTo(1));
    }
}
