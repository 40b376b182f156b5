using Qwen3Native.Generation;
using Qwen3Native.Tests.Api;

namespace Qwen3Native.Tests.Logprobs;

/// <summary>
/// The model's vocabulary is padded past the tokenizer's (151,936 rows against 151,669 tokens). A random-weight model
/// can pick a padding id; it has no text, and neither decoding nor its log-probability may fail on it.
/// </summary>
[TestFixture]
public sealed class PaddingTokenTests
{
    [Test]
    public async Task APaddingIdIsGeneratedWithoutTextAndWithItsLogprob()
    {
        using var model = ApiFixture.Load();
        // Found by search: this seeded prompt of random ids makes the fixture's greedy continuation pick 151762.
        var random = new Random(1234);
        int[] prompt = Enumerable.Range(0, 64).Select(_ => random.Next(model.Info.VocabSize)).ToArray();
        var result = await model.GenerateAsync(prompt,
            SamplingOptions.Greedy with { MaxTokens = 16, IgnoreEos = true, Logprobs = true, TopLogprobs = 2 });

        var padding = result.TokenIds.Where(id => model.Tokenizer.IdToToken(id) is null).ToArray();
        Assume.That(padding, Is.Not.Empty, "the greedy continuation no longer reaches a padding id; the test needs another prompt");
        var known = result.TokenIds.Where(id => model.Tokenizer.IdToToken(id) is not null).ToArray();
        Assert.That(result.Text, Is.EqualTo(model.Tokenizer.Decode(known)), "padding ids are dropped from the text, as HF drops them");
        var lp = result.Logprobs!.First(l => l.TokenId == padding[0]);
        Assert.That(lp.Text, Is.Empty);
        Assert.That(lp.Logprob, Is.LessThan(0f));
    }
}
