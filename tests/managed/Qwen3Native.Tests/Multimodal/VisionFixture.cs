using System.Text.Json;
using Qwen3Native.Chat;
using Qwen3Native.Tests.Api;
using Qwen3Native.Tests.Interop;
using Qwen3Native.Vision;

namespace Qwen3Native.Tests.Multimodal;

/// <summary>
/// tests/fixtures/qwen3_vl/*: tiny random-weight Qwen3-VL checkpoints with reference.json from transformers 5.17
/// (make_vl_fixtures.py). They have no tokenizer, so prompts are rebuilt from the reference's input_ids: cut at each run
/// of pad tokens, an image run is one image and a video run one temporal slice of the next video, as the processor lays
/// them out. Pixels are never shipped; they follow the recorded formula (tests/native/vl_fixture.h does the same).
/// </summary>
internal sealed class VisionFixture
{
    private VisionFixture(string name, string directory, JsonElement root)
    {
        Name = name;
        Directory = directory;
        var special = root.GetProperty("special_ids");
        ImagePad = special.GetProperty("image_pad").GetInt32();
        VideoPad = special.GetProperty("video_pad").GetInt32();
        Inputs = root.GetProperty("vision_inputs").EnumerateArray()
            .Select(i => (i.GetProperty("kind").GetString()!, Grid(i.GetProperty("grid_thw"))))
            .ToArray();
        Prompts = root.GetProperty("prompts").EnumerateArray().Select(p => new VisionCase(
            p.GetProperty("name").GetString()!,
            Ints(p.GetProperty("input_ids")),
            Ints(p.GetProperty("images")),
            Ints(p.GetProperty("videos")),
            p.GetProperty("position_ids").EnumerateArray().SelectMany(Ints).ToArray(),
            p.GetProperty("last_logits").EnumerateArray().Select(e => e.GetSingle()).ToArray(),
            Ints(p.GetProperty("greedy").GetProperty("tokens")),
            p.GetProperty("greedy").GetProperty("margins").EnumerateArray().Select(e => e.GetDouble()).ToArray())).ToArray();
    }

    public const int Columns = 3 * 2 * 16 * 16;
    public const int MergeSize = 2;

    public string Name { get; }
    public string Directory { get; }
    public int ImagePad { get; }
    public int VideoPad { get; }
    public IReadOnlyList<(string Kind, GridThw Grid)> Inputs { get; }
    public IReadOnlyList<VisionCase> Prompts { get; }

    public static string PathOf(string name) => RepositoryRoot.Combine("tests", "fixtures", "qwen3_vl", name);

    /// <summary>The fixture, or an Ignore naming the script that makes it: a missing fixture is never a pass.</summary>
    public static VisionFixture Load(string name)
    {
        string dir = PathOf(name);
        string reference = Path.Combine(dir, "reference.json");
        if (!File.Exists(reference))
            Assert.Ignore($"{reference} is missing: run tests/fixtures/make_vl_fixtures.py with transformers 5.17.");
        using var doc = JsonDocument.Parse(File.ReadAllText(reference));
        return new VisionFixture(name, dir, doc.RootElement.Clone());
    }

    /// <summary>Model loads use two threads: tests may run side by side on a small machine.</summary>
    public Qwen3Model LoadModel(int contextLength = 256) =>
        Qwen3Model.Load(Directory, new ModelOptions { Device = Qwen3Device.Cpu, Threads = 2, ContextLength = contextLength });

    /// <summary>Rows [0, rows) of vision input k: float32(sin(0.1 r + 0.3 c + 1.3 k)), computed in double.</summary>
    public static float[] Pixels(int k, long rows)
    {
        var values = new float[rows * Columns];
        for (long r = 0; r < rows; r++)
            for (int c = 0; c < Columns; c++)
                values[r * Columns + c] = (float)Math.Sin(0.1 * r + 0.3 * c + 1.3 * k);
        return values;
    }

    /// <summary>The prompt as the session feeds it: token runs and vision items in order.</summary>
    public MultimodalPrompt PromptOf(VisionCase p)
    {
        var segments = new List<PromptSegment>();
        int nextImage = 0, nextVideo = 0, nextSlice = 0;
        int i = 0;
        while (i < p.InputIds.Length)
        {
            int start = i;
            int id = p.InputIds[i];
            if (id != ImagePad && id != VideoPad)
            {
                while (i < p.InputIds.Length && p.InputIds[i] != ImagePad && p.InputIds[i] != VideoPad)
                    i++;
                segments.Add(new TokenSegment(p.InputIds[start..i]));
                continue;
            }
            while (i < p.InputIds.Length && p.InputIds[i] == id)
                i++;
            bool image = id == ImagePad;
            int k = image ? p.Images[nextImage++] : p.Videos[nextVideo];
            var grid = Inputs[k].Grid;
            int rows = grid.H * grid.W;
            var all = Pixels(k, grid.PatchCount);
            int slice = image ? 0 : nextSlice;
            var pixels = new ReadOnlyMemory<float>(all, slice * rows * Columns, rows * Columns);
            if (!image && ++nextSlice == grid.T)
            {
                nextSlice = 0;
                nextVideo++;
            }
            var item = new VisionSegment(image ? VisionKind.Image : VisionKind.Video, new GridThw(1, grid.H, grid.W), pixels, Columns,
                MergeSize, id, new TextPart($"vision input {k}"), slice, image ? null : slice);
            Assert.That(item.TokenCount, Is.EqualTo(i - start), $"{p.Name}: the pad run at {start} does not match input {k}'s grid");
            segments.Add(item);
        }
        return new MultimodalPrompt(segments, [], []);
    }

    // Enough of qwen3_vl.jinja for Qwen3ChatTemplate.Detect to recognise it.
    public const string VlTemplateMarker = "<|im_start|><|vision_start|><tool_response>";

    /// <summary>
    /// The fixture's weights with a tokenizer made for its 256-token vocabulary: printable ASCII and the newline as
    /// single-byte tokens, and the chat and vision special tokens at the ids its config names.
    /// </summary>
    public static TempDirectory WithTokenizer(string fixture)
    {
        var dir = ApiFixture.NewTempDirectory();
        foreach (var file in new[] { "config.json", "model.safetensors", "preprocessor_config.json" })
            File.Copy(Path.Combine(PathOf(fixture), file), Path.Combine(dir.Path, file));

        var vocab = new Dictionary<string, int>();
        foreach (byte b in Enumerable.Range(0x20, 0x7f - 0x20).Select(i => (byte)i).Prepend((byte)'\n'))
            vocab[ByteLevelChar(b)] = vocab.Count;
        var added = new (int Id, string Content)[]
        {
            (248, "<|vision_start|>"), (249, "<|vision_end|>"), (250, "<|image_pad|>"), (251, "<|video_pad|>"),
            (252, "<|im_start|>"), (253, "<|im_end|>"), (254, "<|endoftext|>"),
        };
        var json = new Dictionary<string, object?>
        {
            ["version"] = "1.0",
            ["added_tokens"] = added.Select(a => new Dictionary<string, object>
            {
                ["id"] = a.Id, ["content"] = a.Content, ["single_word"] = false, ["lstrip"] = false, ["rstrip"] = false,
                ["normalized"] = false, ["special"] = true,
            }).ToArray(),
            ["normalizer"] = new { type = "NFC" },
            ["pre_tokenizer"] = new
            {
                type = "Sequence",
                pretokenizers = new object[]
                {
                    new { type = "Split", pattern = new { Regex = @"\s+|\S" }, behavior = "Isolated", invert = false },
                    new { type = "ByteLevel", add_prefix_space = false, trim_offsets = false, use_regex = false },
                },
            },
            ["post_processor"] = new { type = "ByteLevel", add_prefix_space = false, trim_offsets = false, use_regex = false },
            ["decoder"] = new { type = "ByteLevel", add_prefix_space = false, trim_offsets = false, use_regex = false },
            ["model"] = new Dictionary<string, object?>
            {
                ["type"] = "BPE", ["dropout"] = null, ["unk_token"] = null, ["continuing_subword_prefix"] = "",
                ["end_of_word_suffix"] = "", ["fuse_unk"] = false, ["byte_fallback"] = false, ["ignore_merges"] = false,
                ["vocab"] = vocab, ["merges"] = Array.Empty<string>(),
            },
        };
        dir.Write("tokenizer.json", JsonSerializer.Serialize(json));
        return dir;
    }

    // GPT-2's byte-to-character table: printable bytes stand for themselves, the rest move up past 255 in order.
    private static string ByteLevelChar(byte b)
    {
        if (b is >= 0x21 and <= 0x7e or >= 0xa1 and <= 0xac or >= 0xae)
            return ((char)b).ToString();
        int n = 0;
        for (int x = 0; x < b; x++)
            if (!(x is >= 0x21 and <= 0x7e or >= 0xa1 and <= 0xac or >= 0xae))
                n++;
        return ((char)(256 + n)).ToString();
    }

    private static GridThw Grid(JsonElement e)
    {
        var v = Ints(e);
        return new GridThw(v[0], v[1], v[2]);
    }

    private static int[] Ints(JsonElement e) => e.EnumerateArray().Select(x => x.GetInt32()).ToArray();
}

internal sealed record VisionCase(string Name, int[] InputIds, int[] Images, int[] Videos, int[] PositionIds, float[] LastLogits,
    int[] GreedyTokens, double[] Margins)
{
    public override string ToString() => Name;
}
