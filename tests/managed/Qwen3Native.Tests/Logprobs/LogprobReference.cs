using System.Text.Json;
using Qwen3Native.Generation;
using Qwen3Native.Tests.Api;

namespace Qwen3Native.Tests.Logprobs;

/// <summary>
/// Independent references for the engine's log-probabilities: logits from a second native sequence that runs the same
/// tokens from scratch, and a log-softmax of them computed here in double precision.
/// </summary>
internal static class LogprobReference
{
    /// <summary>The logits the engine gives after processing <paramref name="tokens"/> in one fresh prefill.</summary>
    public static float[] Logits(Qwen3Model model, IEnumerable<int> tokens)
    {
        using var sequence = NativeSequence.Create(model.Handle);
        sequence.Append(tokens.ToArray());
        sequence.Step();
        return sequence.GetLogits(model.Info.VocabSize);
    }

    public static double[] LogSoftmax(float[] logits)
    {
        double max = double.NegativeInfinity;
        foreach (float x in logits)
            max = Math.Max(max, x);
        double sum = 0;
        foreach (float x in logits)
            sum += Math.Exp(x - max);
        double lse = max + Math.Log(sum);
        var result = new double[logits.Length];
        for (int i = 0; i < logits.Length; i++)
            result[i] = logits[i] - lse;
        return result;
    }

    /// <summary>Ids of the <paramref name="k"/> largest values, largest first, ties by lower id (the engine's order).</summary>
    public static int[] TopIds(double[] values, int k) =>
        Enumerable.Range(0, values.Length).OrderByDescending(i => values[i]).ThenBy(i => i).Take(k).ToArray();

    /// <summary>reference.json's first-step top-64 ids and fp32 logits from transformers, per case.</summary>
    public static IReadOnlyList<(int[] TopIds, double[] TopLogits)> TransformersTopLogits()
    {
        using var doc = JsonDocument.Parse(File.ReadAllText(Path.Combine(ApiFixture.Directory, "reference.json")));
        return doc.RootElement.GetProperty("cases").EnumerateArray()
            .Select(c => (
                c.GetProperty("top_ids").EnumerateArray().Select(e => e.GetInt32()).ToArray(),
                c.GetProperty("top_logits").EnumerateArray().Select(e => e.GetDouble()).ToArray()))
            .ToArray();
    }

    /// <summary>The engine's contract for one entry: sorted alternatives, all log-probabilities &lt;= 0, a distribution's worth at most.</summary>
    public static void AssertWellFormed(TokenLogprob lp, int expectedTop)
    {
        Assert.That(lp.TopLogprobs, Has.Count.EqualTo(expectedTop));
        Assert.That(lp.Logprob, Is.LessThanOrEqualTo(0f));
        for (int i = 1; i < lp.TopLogprobs.Count; i++)
        {
            var (a, b) = (lp.TopLogprobs[i - 1], lp.TopLogprobs[i]);
            Assert.That(a.Logprob > b.Logprob || (a.Logprob == b.Logprob && a.TokenId < b.TokenId), Is.True,
                $"alternatives must be sorted by log-probability, ties by lower id: {a} then {b}");
        }
        Assert.That(lp.TopLogprobs.Select(t => t.TokenId).Distinct().Count(), Is.EqualTo(lp.TopLogprobs.Count));
        double mass = lp.TopLogprobs.Sum(t => Math.Exp(t.Logprob));
        Assert.That(mass, Is.LessThanOrEqualTo(1.0 + 1e-6), "probabilities of distinct tokens cannot add up to more than 1");
        if (lp.TopLogprobs.Count > 0)
            Assert.That(lp.Logprob, Is.LessThanOrEqualTo(lp.TopLogprobs[0].Logprob), "nothing is more likely than the top alternative");
    }
}
