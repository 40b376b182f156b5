using System.Text.Json;
using Qwen3Native.Vision;

namespace Qwen3Native.Tests.Vision;

/// <summary>
/// Compares with tests/fixtures/vision/gold.json, written by make_gold.py from transformers' processor on the CPU.
/// Resized pixels may differ by one 8-bit step where the processor ran another resize path (PIL, CUDA), so values
/// are compared within 1/127.5 and the share of exact matches is checked separately.
/// </summary>
public sealed class VisionGoldTests
{
    private const float OneStep = 1f / 127.5f + 1e-6f;

    private static string? FindGold()
    {
        for (var dir = new DirectoryInfo(TestContext.CurrentContext.TestDirectory); dir is not null; dir = dir.Parent)
        {
            string candidate = Path.Combine(dir.FullName, "tests", "fixtures", "vision", "gold.json");
            if (File.Exists(candidate)) return candidate;
        }
        return null;
    }

    [Test]
    public void MatchesTransformersProcessor()
    {
        string? path = FindGold();
        if (path is null) Assert.Ignore("gold.json not generated yet: run tests/fixtures/vision/make_gold.py on a machine with transformers");
        using var doc = JsonDocument.Parse(File.ReadAllText(path!));
        foreach (var c in doc.RootElement.GetProperty("cases").EnumerateArray())
        {
            string name = c.GetProperty("name").GetString()!;
            int w = c.GetProperty("width").GetInt32(), h = c.GetProperty("height").GetInt32();
            if (c.TryGetProperty("error", out var err))
            {
                TestContext.Out.WriteLine($"{name}: transformers refused it ({err.GetString()}); not compared");
                continue;
            }
            var options = new Qwen3VLImageProcessorOptions
            {
                MinPixels = c.GetProperty("min_pixels").GetInt64(),
                MaxPixels = c.GetProperty("max_pixels").GetInt64(),
            };
            var r = Qwen3VLImageProcessor.Preprocess(ImageProcessorTests.MakeImage(w, h), w, h, options);
            int[] thw = c.GetProperty("image_grid_thw").EnumerateArray().Select(e => e.GetInt32()).ToArray();
            Assert.That(new[] { r.Grid.T, r.Grid.H, r.Grid.W }, Is.EqualTo(thw), $"{name}: image_grid_thw");
            Assert.That(new[] { r.Rows, r.Columns }, Is.EqualTo(c.GetProperty("shape").EnumerateArray().Select(e => e.GetInt32()).ToArray()), $"{name}: shape");
            Assert.That(r.ImageTokenCount, Is.EqualTo(c.GetProperty("num_image_tokens").GetInt32()), $"{name}: tokens");

            int exact = 0, total = 0;
            void Compare(int row, int col, double expected)
            {
                float got = r.PixelValues[(long)row * r.Columns + col];
                Assert.That(got, Is.EqualTo((float)expected).Within(OneStep), $"{name}: [{row},{col}]");
                if (Math.Abs(got - expected) < 1e-6) exact++;
                total++;
            }
            foreach (var s in c.GetProperty("samples").EnumerateArray())
                Compare(s[0].GetInt32(), s[1].GetInt32(), s[2].GetDouble());
            int col0 = 0;
            foreach (var v in c.GetProperty("first_row").EnumerateArray()) Compare(0, col0++, v.GetDouble());
            col0 = 0;
            foreach (var v in c.GetProperty("last_row").EnumerateArray()) Compare(r.Rows - 1, col0++, v.GetDouble());

            int block = 0, blockLen = 4 * r.Columns;
            foreach (var v in c.GetProperty("block_sums").EnumerateArray())
            {
                double sum = 0;
                for (int i = 0; i < blockLen; i++) sum += r.PixelValues[(long)block * blockLen + i];
                Assert.That(sum, Is.EqualTo(v.GetDouble()).Within(blockLen * 0.002), $"{name}: token block {block} sum");
                block++;
            }
            TestContext.Out.WriteLine($"{name}: {exact}/{total} sampled values exact");
            Assert.That(exact, Is.GreaterThanOrEqualTo(total * 0.95), $"{name}: too few exact values; resampling differs");
        }
    }
}
