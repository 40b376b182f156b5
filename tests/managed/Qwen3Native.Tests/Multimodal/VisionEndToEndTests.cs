using Microsoft.Extensions.AI;
using Qwen3Native.AI;
using Qwen3Native.Chat;
using Qwen3Native.Generation;
using Qwen3Native.Tests.Api;
using Qwen3Native.Tests.Interop;
using Qwen3Native.Vision;
using AIChatMessage = Microsoft.Extensions.AI.ChatMessage;
using AIChatRole = Microsoft.Extensions.AI.ChatRole;
using ChatMessage = Qwen3Native.Chat.ChatMessage;

namespace Qwen3Native.Tests.Multimodal;

/// <summary>
/// Images and videos through the managed layer into the engine, against transformers on the Qwen3-VL fixtures: the
/// rotary positions, last logits and greedy tokens of every reference prompt; then the session, the chat client and
/// the refusals.
/// </summary>
/// <remarks>
/// Tolerances are the native suite's (tests/native/test_qwen3_vl.cpp): logits within relative L2 1e-4 of the fp32
/// reference (the engine computes in fp32 from the same bf16 weights; a wrong MRoPE axis or placeholder row moves them
/// by 1e-2 or more), and greedy tokens compared free-running up to the first step whose reference top1-top2 margin is
/// within 8 times the largest logit difference measured for that prompt (there the other token is a legitimate pick).
/// </remarks>
[TestFixture]
public class VisionEndToEndTests
{
    private static readonly string[] s_fixtures = ["bf16_dense_tied", "bf16_moe"];

    [TestCaseSource(nameof(s_fixtures))]
    public void ModelInfoReportsTheVisionFacts(string name)
    {
        var fixture = VisionFixture.Load(name);
        using var model = fixture.LoadModel();
        var info = model.Info;
        Assert.That(info.HasVision, Is.True);
        Assert.That((info.PatchSize, info.TemporalPatchSize, info.SpatialMergeSize), Is.EqualTo((16, 2, 2)));
        Assert.That(info.ImageTokenId, Is.EqualTo(fixture.ImagePad));
        Assert.That(info.VideoTokenId, Is.EqualTo(fixture.VideoPad));
        Assert.That((info.VisionStartTokenId, info.VisionEndTokenId), Is.EqualTo(((int?)248, (int?)249)));
        // preprocessor_config.json holds the released values.
        Assert.That(model.ImageProcessorOptions.MinPixels, Is.EqualTo(65_536));
        Assert.That(model.ImageProcessorOptions.MaxPixels, Is.EqualTo(16_777_216));
        Assert.That(model.ImageProcessorOptions.PatchSize, Is.EqualTo(info.PatchSize));
    }

    [TestCaseSource(nameof(s_fixtures))]
    public void PositionsAndLogitsMatchTransformers(string name)
    {
        var fixture = VisionFixture.Load(name);
        using var model = fixture.LoadModel();
        foreach (var p in fixture.Prompts)
        {
            using var sequence = NativeSequence.Create(model.Handle);
            sequence.Append(fixture.PromptOf(p).Segments);
            Assert.That(sequence.GetTokens(), Is.EqualTo(p.InputIds), $"{p.Name}: the engine's pad tokens");
            Assert.That(sequence.GetRopePositions(), Is.EqualTo(p.PositionIds), $"{p.Name}: get_rope_index's positions");
            sequence.Step();
            double rel = RelativeL2(sequence.GetLogits(model.Info.VocabSize), p.LastLogits);
            Assert.That(rel, Is.LessThan(1e-4), $"{p.Name}: relative L2 of the last logits");
        }
    }

    [TestCaseSource(nameof(s_fixtures))]
    public async Task GreedyTokensMatchTransformers(string name)
    {
        var fixture = VisionFixture.Load(name);
        using var model = fixture.LoadModel();
        foreach (var p in fixture.Prompts)
        {
            var prompt = fixture.PromptOf(p);
            using (var sequence = NativeSequence.Create(model.Handle))
            {
                sequence.Append(prompt.Segments);
                sequence.Step();
                double worst = MaxAbsDiff(sequence.GetLogits(model.Info.VocabSize), p.LastLogits);
                int steps = 0;
                while (steps < p.Margins.Length && p.Margins[steps] > 8 * worst)
                    steps++;
                Assert.That(steps, Is.GreaterThan(0), $"{p.Name}: no step is decided clearly enough to compare (logit error {worst})");
                TestContext.Out.WriteLine($"{name}/{p.Name}: greedy, {steps} of {p.Margins.Length} steps compared (largest logit error {worst:G3})");

                var result = await model.GenerateAsync(prompt, SamplingOptions.Greedy with { MaxTokens = steps, IgnoreEos = true });
                Assert.That(result.TokenIds, Is.EqualTo(p.GreedyTokens[..steps]), $"{p.Name}: greedy tokens");
                Assert.That(result.Usage.PromptTokens, Is.EqualTo(p.InputIds.Length));
            }
        }
    }

    /// <summary>Limited steps cut images and video slices in pieces, as the loop does with prompts over one chunk.</summary>
    [Test]
    public void ChunkedPrefillEqualsWholePrefill()
    {
        var fixture = VisionFixture.Load("bf16_dense_tied");
        using var model = fixture.LoadModel();
        foreach (var p in fixture.Prompts)
        {
            var prompt = fixture.PromptOf(p);
            using var whole = NativeSequence.Create(model.Handle);
            whole.Append(prompt.Segments);
            whole.Step();
            using var chunked = NativeSequence.Create(model.Handle);
            chunked.Append(prompt.Segments);
            while (chunked.Length - chunked.CachedLength > 5)
                chunked.StepLimited(5);
            chunked.Step();
            Assert.That(RelativeL2(chunked.GetLogits(model.Info.VocabSize), whole.GetLogits(model.Info.VocabSize)), Is.LessThan(1e-5), p.Name);
        }
    }

    /// <summary>A prompt longer than the loop's prefill chunk (512) is prefilled in limited steps that cut the image.</summary>
    [Test]
    public async Task LongMultimodalPromptIsPrefilledInChunks()
    {
        var fixture = VisionFixture.Load("bf16_dense_tied");
        using var model = fixture.LoadModel(contextLength: 1024);
        var grid = new GridThw(1, 40, 64); // 640 image tokens
        var prompt = new MultimodalPrompt(
        [
            new TokenSegment([113, 41, 248]),
            new VisionSegment(VisionKind.Image, grid, VisionFixture.Pixels(0, grid.PatchCount), VisionFixture.Columns, VisionFixture.MergeSize,
                fixture.ImagePad, new TextPart("image"), 0, null),
            new TokenSegment([249, 97, 2, 54]),
        ], [], []);
        Assert.That(prompt.TokenCount, Is.GreaterThan(512));

        int argmax;
        // Freed before the generation: the two sequences share a KV cache of one context.
        using (var whole = NativeSequence.Create(model.Handle))
        {
            whole.Append(prompt.Segments);
            whole.Step();
            var logits = whole.GetLogits(model.Info.VocabSize);
            argmax = Array.IndexOf(logits, logits.Max());
        }

        var result = await model.GenerateAsync(prompt, SamplingOptions.Greedy with { MaxTokens = 1, IgnoreEos = true });
        Assert.That(result.TokenIds, Is.EqualTo(new[] { argmax }));
        Assert.That(result.Usage.PromptTokens, Is.EqualTo(prompt.TokenCount));
    }

    // ---- Sessions and the chat client, on a copy of the fixture with a small tokenizer ----------------------------

    [Test]
    public async Task SessionFeedsImagesAndReusesTheCacheOnlyForTheSameImage()
    {
        using var dir = VisionFixture.WithTokenizer("bf16_dense_tied");
        using var model = Qwen3Model.Load(dir.Path, new ModelOptions { Device = Qwen3Device.Cpu, Threads = 2, ContextLength = 512 });
        var sampling = SamplingOptions.Greedy with { MaxTokens = 4, IgnoreEos = true };
        var photo = ImagePart.FromFile(RepositoryRoot.Combine("tests", "fixtures", "images", "photo_420.jpg"));
        using var session = model.CreateSession(new SessionOptions { ChatTemplate = Qwen3ChatTemplate.VL });

        var first = await session.ChatAsync([ChatMessage.User(photo, "What is this?")], sampling);

        // The same conversation prepared by hand and run without a session gives the same tokens.
        var rendered = Qwen3ChatTemplate.VL.RenderPrompt([ChatMessage.User(photo, "What is this?")]);
        var prompt = new MultimodalPromptBuilder(model.Tokenizer, model.ImageProcessorOptions, model.VideoProcessorOptions).Build(rendered);
        var direct = await model.GenerateAsync(prompt, sampling);
        Assert.That(first.TokenIds, Is.EqualTo(direct.TokenIds));
        Assert.That(first.Usage.PromptTokens, Is.EqualTo(prompt.TokenCount));
        var image = prompt.VisionItems.Single();
        int imageStart = prompt.Segments.TakeWhile(s => s is not VisionSegment).Sum(s => s.TokenCount);
        Assert.That(session.GetTokens().Skip(imageStart).Take(image.TokenCount), Is.All.EqualTo(model.Info.ImageTokenId));

        // The next turn keeps the image in the cache.
        var second = await session.ChatAsync("And now?", sampling);
        Assert.That(second.Usage.CachedPromptTokens, Is.GreaterThan(imageStart + image.TokenCount));

        // The same pad tokens for another image of the same size: the cache is reused up to the image, not past it.
        session.Reset();
        var flipped = ImagePart.FromImage(Flipped(photo.Load()));
        var third = await session.ChatAsync([ChatMessage.User(flipped, "What is this?")], sampling);
        Assert.That(third.Usage.CachedPromptTokens, Is.LessThanOrEqualTo(imageStart));
        Assert.That(third.Usage.CachedPromptTokens, Is.GreaterThan(0));

        // And the first image again after it: reused up to where the flipped one began, then processed.
        session.Reset();
        var fourth = await session.ChatAsync([ChatMessage.User(photo, "What is this?")], sampling);
        Assert.That(fourth.Usage.CachedPromptTokens, Is.LessThanOrEqualTo(imageStart));
        Assert.That(fourth.TokenIds, Is.EqualTo(first.TokenIds), "a fresh prefill of the first image answers as the first turn did");
    }

    [Test]
    public async Task ChatClientTakesDataContentImages()
    {
        using var dir = VisionFixture.WithTokenizer("bf16_dense_tied");
        dir.Write("chat_template.jinja", VisionFixture.VlTemplateMarker);
        using var model = Qwen3Model.Load(dir.Path, new ModelOptions { Device = Qwen3Device.Cpu, Threads = 2, ContextLength = 512 });
        Assert.That(model.ChatTemplate.Kind, Is.EqualTo(Qwen3TemplateKind.Qwen3VL));
        using IChatClient client = new Qwen3ChatClient(model);
        byte[] jpeg = File.ReadAllBytes(RepositoryRoot.Combine("tests", "fixtures", "images", "photo_420.jpg"));
        var message = new AIChatMessage(AIChatRole.User, [new DataContent(jpeg, "image/jpeg"), new TextContent("What is this?")]);
        var response = await client.GetResponseAsync([message], new ChatOptions { Temperature = 0, MaxOutputTokens = 3 });
        Assert.That(response.Usage!.InputTokenCount, Is.GreaterThan(60), "the image's pad tokens count as prompt tokens");
        Assert.That(response.Usage.OutputTokenCount, Is.EqualTo(3));
    }

    // ---- Refusals ---------------------------------------------------------------------------------------------

    [Test]
    public async Task TextModelGivenAnImageThrowsTheTypedExceptionAndKeepsItsState()
    {
        using var model = ApiFixture.Load();
        Assert.That(model.Info.HasVision, Is.False);
        Assert.That(model.Info.ImageTokenId, Is.Null);
        using var session = model.CreateSession(new SessionOptions { EnableThinking = false });
        await session.ChatAsync("Hello", SamplingOptions.Greedy with { MaxTokens = 2 });
        int cached = session.CachedTokenCount;
        var messages = session.Messages.ToArray();

        var image = ChatMessage.User(ImagePart.FromRgb(new byte[4 * 4 * 3], 4, 4), "What is this?");
        // Thrown by the call itself, before a turn starts.
        var ex = Assert.Throws<UnsupportedInputException>(() => session.ChatStreamAsync([image]));
        Assert.That(ex!.Status, Is.EqualTo(Qwen3Status.Unsupported));
        Assert.That(ex.Message, Does.Contain("vision"));
        Assert.ThrowsAsync<UnsupportedInputException>(() => session.ChatAsync([image]));
        Assert.Throws<UnsupportedInputException>(() => session.AddMessage(image));
        Assert.That(session.Messages, Is.EqualTo(messages));
        Assert.That(session.CachedTokenCount, Is.EqualTo(cached), "the cached conversation is kept");

        // The engine's own refusal maps to the same type.
        using var sequence = NativeSequence.Create(model.Handle);
        var native = Assert.Throws<UnsupportedInputException>(() =>
            sequence.AppendVision(VisionKind.Image, new GridThw(1, 2, 2), new float[4 * VisionFixture.Columns]));
        Assert.That(native!.Message, Does.Contain("Q3N_ERR_UNSUPPORTED"));
    }

    // ---- Processor options from the checkpoint ------------------------------------------------------------------

    [Test]
    public void ProcessorOptionsComeFromTheCheckpointFiles()
    {
        using var dir = ApiFixture.NewTempDirectory();
        var (image, video) = CheckpointMetadata.ReadProcessorOptions(dir.Path);
        Assert.That(image, Is.EqualTo(Qwen3VLImageProcessorOptions.Default));
        Assert.That(video, Is.EqualTo(Qwen3VLVideoProcessorOptions.Default));

        dir.Write("preprocessor_config.json", """
            { "size": { "longest_edge": 1000000, "shortest_edge": 3136 }, "patch_size": 14, "temporal_patch_size": 2,
              "merge_size": 2, "image_mean": [0.48, 0.45, 0.40], "image_std": [0.26, 0.26, 0.27], "max_pixels": 802816 }
            """);
        (image, video) = CheckpointMetadata.ReadProcessorOptions(dir.Path);
        Assert.That((image.MinPixels, image.MaxPixels, image.PatchSize), Is.EqualTo((3136L, 802816L, 14)), "max_pixels wins over size");
        Assert.That(image.ImageMean, Is.EqualTo(new[] { 0.48f, 0.45f, 0.40f }));
        Assert.That(image.ImageStd, Is.EqualTo(new[] { 0.26f, 0.26f, 0.27f }));
        Assert.That((video.PatchSize, video.ImageMean), Is.EqualTo((14, image.ImageMean)), "a video shares the image settings");
        Assert.That(video.MaxPixels, Is.EqualTo(Qwen3VLVideoDefaults.MaxPixels), "but keeps its own pixel budget");

        dir.Write("video_preprocessor_config.json", """
            { "size": { "longest_edge": 2000000, "shortest_edge": 4096 }, "fps": 1.5, "min_frames": 2, "max_frames": 64 }
            """);
        (_, video) = CheckpointMetadata.ReadProcessorOptions(dir.Path);
        Assert.That((video.MinPixels, video.MaxPixels, video.Fps, video.MinFrames, video.MaxFrames),
            Is.EqualTo((4096L, 2000000L, 1.5, 2, 64)));

        dir.Write("preprocessor_config.json", """{ "patch_size": "sixteen" }""");
        var bad = Assert.Throws<ModelLoadException>(() => CheckpointMetadata.ReadProcessorOptions(dir.Path));
        Assert.That(bad!.Status, Is.EqualTo(Qwen3Status.BadConfig));
        Assert.That(bad.Message, Does.Contain("patch_size"));
    }

    // ---- Helpers ------------------------------------------------------------------------------------------------

    private static Qwen3Image Flipped(Qwen3Image image)
    {
        var rgb = image.Rgb.ToArray();
        int row = image.Width * 3;
        var flipped = new byte[rgb.Length];
        for (int y = 0; y < image.Height; y++)
            rgb.AsSpan(y * row, row).CopyTo(flipped.AsSpan((image.Height - 1 - y) * row, row));
        return Qwen3Image.FromRgb(flipped, image.Width, image.Height);
    }

    private static double RelativeL2(float[] actual, float[] expected)
    {
        double num = 0, den = 0;
        for (int i = 0; i < expected.Length; i++)
        {
            double d = actual[i] - (double)expected[i];
            num += d * d;
            den += (double)expected[i] * expected[i];
        }
        return Math.Sqrt(num / den);
    }

    private static double MaxAbsDiff(float[] actual, float[] expected)
    {
        double worst = 0;
        for (int i = 0; i < expected.Length; i++)
            worst = Math.Max(worst, Math.Abs(actual[i] - (double)expected[i]));
        return worst;
    }
}
