using Qwen3Native.Generation;
using Qwen3Native.Tests.Api;

namespace Qwen3Native.Tests.Logprobs;

/// <summary>Log-probabilities of generated and prompt tokens on the real-vocabulary fixture, against independent references.</summary>
[TestFixture]
public sealed class LogprobTests
{
    // The engine's log-softmax is fp32 with a double sum, its log-sum-exp about 12 (log of 151,936 near-uniform
    // terms): a few fp32 ulps there are ~1e-6. The second sequence's prefill may sum in another order than the
    // incremental decode it is compared with, which moves logits by ~1e-6 more. 1e-4 leaves room and still catches
    // any real mistake (a wrong position or token is off by far more on this fixture).
    private const double Tolerance = 1e-4;

    private Qwen3Model _model = null!;

    [OneTimeSetUp]
    public void LoadModel() => _model = ApiFixture.Load();

    [OneTimeTearDown]
    public void DisposeModel() => _model.Dispose();

    private static IEnumerable<ReferenceCase> Cases() => ApiFixture.Cases;

    [Test]
    public void SameStepLogprobsEqualLogSoftmaxOfThatStepsLogits()
    {
        // Read the logits and the log-probability of one and the same step, through the native sequence itself.
        var c = ApiFixture.Cases[0];
        using var sequence = NativeSequence.Create(_model.Handle);
        sequence.SetSampling(new SamplingOptions { Temperature = 1f, Logprobs = true, TopLogprobs = 20 }, seed: 5);
        sequence.Append(c.PromptIds);
        for (int step = 0; step < 6; step++)
        {
            sequence.Step();
            var reference = LogprobReference.LogSoftmax(sequence.GetLogits(_model.Info.VocabSize));
            int token = sequence.Sample();
            var lp = sequence.GetTokenLogprob(_model.Tokenizer);

            Assert.That(lp.TokenId, Is.EqualTo(token));
            Assert.That(lp.Logprob, Is.EqualTo(reference[token]).Within(1e-5), $"step {step}");
            var expectedTop = LogprobReference.TopIds(reference, 20);
            Assert.That(lp.TopLogprobs.Select(t => t.TokenId), Is.EqualTo(expectedTop), $"step {step}");
            foreach (var alt in lp.TopLogprobs)
                Assert.That(alt.Logprob, Is.EqualTo(reference[alt.TokenId]).Within(1e-5));
        }
    }

    [TestCaseSource(nameof(Cases))]
    public async Task GeneratedLogprobsEqualLogSoftmaxOfASecondSequencesLogits(ReferenceCase c)
    {
        var result = await _model.GenerateAsync(c.PromptIds,
            SamplingOptions.Greedy with { MaxTokens = 6, Logprobs = true, TopLogprobs = 20 });

        Assert.That(result.Logprobs, Is.Not.Null);
        var logprobs = result.Logprobs!;
        Assert.That(logprobs.Select(l => l.TokenId), Is.EqualTo(result.TokenIds));
        for (int k = 0; k < result.TokenIds.Count; k++)
        {
            var reference = LogprobReference.LogSoftmax(LogprobReference.Logits(_model, c.PromptIds.Concat(result.TokenIds.Take(k))));
            var lp = logprobs[k];
            Assert.That(lp.Logprob, Is.EqualTo(reference[lp.TokenId]).Within(Tolerance), $"step {k}");
            foreach (var alt in lp.TopLogprobs)
                Assert.That(alt.Logprob, Is.EqualTo(reference[alt.TokenId]).Within(Tolerance), $"step {k}, alternative {alt.TokenId}");
            // The reported alternatives are the most likely tokens: nothing left out beats the least likely one reported.
            var reported = lp.TopLogprobs.Select(t => t.TokenId).ToHashSet();
            double best = LogprobReference.TopIds(reference, 21).Where(id => !reported.Contains(id)).Select(id => reference[id]).First();
            Assert.That(lp.TopLogprobs[^1].Logprob, Is.GreaterThanOrEqualTo(best - Tolerance), $"step {k}");
        }
    }

    [TestCaseSource(nameof(Cases))]
    public async Task TopAlternativesAreSortedAndAgreeWithTheGreedyChoice(ReferenceCase c)
    {
        var updates = new List<GenerationUpdate>();
        await foreach (var u in _model.GenerateStreamAsync(c.PromptIds,
                           SamplingOptions.Greedy with { MaxTokens = 12, Logprobs = true, TopLogprobs = 20 }))
            updates.Add(u);

        var logprobs = updates.Where(u => u.Logprob is not null).Select(u => u.Logprob!).ToList();
        var tokens = updates.Where(u => u.TokenId >= 0).Select(u => u.TokenId).ToList();
        Assert.That(logprobs.Select(l => l.TokenId), Is.EqualTo(tokens), "one log-probability per generated token, in order");
        foreach (var lp in logprobs)
        {
            LogprobReference.AssertWellFormed(lp, 20);
            Assert.That(lp.TopLogprobs[0].TokenId, Is.EqualTo(lp.TokenId), "greedy picks the most likely token");
            Assert.That(lp.TopLogprobs[0].Logprob, Is.EqualTo(lp.Logprob));
            Assert.That(lp.Text, Is.EqualTo(_model.Tokenizer.Decode(lp.TokenId)));
        }
    }

    [Test]
    public async Task SampledTokensHaveTheModelsLogprobWhateverTheSampling()
    {
        // Penalties and temperature change the choice, not the reported distribution: it is the raw logits'.
        var c = ApiFixture.Cases[1];
        var sampling = new SamplingOptions
        {
            Temperature = 1.3f, TopK = 40, Seed = 11, MaxTokens = 5, RepetitionPenalty = 1.2f, Logprobs = true, TopLogprobs = 3,
        };
        var result = await _model.GenerateAsync(c.PromptIds, sampling);

        for (int k = 0; k < result.TokenIds.Count; k++)
        {
            var reference = LogprobReference.LogSoftmax(LogprobReference.Logits(_model, c.PromptIds.Concat(result.TokenIds.Take(k))));
            var lp = result.Logprobs![k];
            LogprobReference.AssertWellFormed(lp, 3);
            Assert.That(lp.Logprob, Is.EqualTo(reference[result.TokenIds[k]]).Within(Tolerance));
            Assert.That(lp.TopLogprobs.Select(t => t.TokenId), Is.EqualTo(LogprobReference.TopIds(reference, 3)));
        }
    }

    [Test]
    public async Task FirstStepLogprobsMatchTransformersLogits()
    {
        // reference.json stores only transformers' 64 largest logits, so the log-sum-exp is unknown; differences between
        // ranks cancel it: logprob_i - logprob_0 = logit_i - logit_0. The engine's logits match transformers' to ~1e-5.
        var references = LogprobReference.TransformersTopLogits();
        for (int n = 0; n < ApiFixture.Cases.Count; n++)
        {
            var c = ApiFixture.Cases[n];
            var (topIds, topLogits) = references[n];
            var result = await _model.GenerateAsync(c.PromptIds,
                SamplingOptions.Greedy with { MaxTokens = 1, Logprobs = true, TopLogprobs = SamplingOptions.MaxTopLogprobs });
            var top = result.Logprobs![0].TopLogprobs;

            Assert.That(top, Has.Count.EqualTo(20));
            for (int i = 0; i < top.Count; i++)
            {
                // Neighbours closer than the engine's agreement with transformers may come in either order.
                bool tiedWithNeighbour = (i > 0 && topLogits[i - 1] - topLogits[i] < 1e-3) || topLogits[i] - topLogits[i + 1] < 1e-3;
                if (!tiedWithNeighbour)
                    Assert.That(top[i].TokenId, Is.EqualTo(topIds[i]), $"case {n}, rank {i}");
                int rank = Array.IndexOf(topIds, top[i].TokenId);
                Assert.That(rank, Is.GreaterThanOrEqualTo(0), $"case {n}: {top[i].TokenId} is not among transformers' top 64");
                Assert.That(top[i].Logprob - top[0].Logprob, Is.EqualTo(topLogits[rank] - topLogits[0]).Within(Tolerance),
                    $"case {n}, rank {i}");
            }
            Assert.That(result.TokenIds[0], Is.EqualTo(topIds[0]));
        }
    }

    [TestCaseSource(nameof(Cases))]
    public async Task PromptLogprobsEqualLogSoftmaxOfEachPrefix(ReferenceCase c)
    {
        var result = await _model.GenerateAsync(c.PromptIds,
            SamplingOptions.Greedy with { MaxTokens = 1, PromptLogprobs = true, TopLogprobs = 4 });

        Assert.That(result.Logprobs, Is.Null, "only the prompt's were asked for");
        var prompt = result.PromptLogprobs!;
        Assert.That(prompt, Has.Count.EqualTo(c.PromptIds.Length - 1), "every prompt token but the first has a predecessor");
        for (int i = 0; i < prompt.Count; i++)
        {
            Assert.That(prompt[i].TokenId, Is.EqualTo(c.PromptIds[i + 1]));
            var reference = LogprobReference.LogSoftmax(LogprobReference.Logits(_model, c.PromptIds.Take(i + 1)));
            Assert.That(prompt[i].Logprob, Is.EqualTo(reference[c.PromptIds[i + 1]]).Within(Tolerance), $"prompt position {i + 1}");
            LogprobReference.AssertWellFormed(prompt[i], 4);
            Assert.That(prompt[i].TopLogprobs.Select(t => t.TokenId), Is.EqualTo(LogprobReference.TopIds(reference, 4)));
        }
    }

    [Test]
    public async Task PromptLogprobsOfAPromptPrefilledInChunks()
    {
        // Longer than the loop's 512-token prefill chunk: the first token of the second chunk is predicted by the
        // first chunk's last logits, which the engine keeps from the step before.
        var c = ApiFixture.Cases[1];
        int[] prompt = Enumerable.Repeat(c.PromptIds, 16).SelectMany(x => x).Take(530).ToArray();
        using var model = ApiFixture.Load(contextLength: 1024);
        var result = await model.GenerateAsync(prompt, SamplingOptions.Greedy with { MaxTokens = 2, PromptLogprobs = true });

        var logprobs = result.PromptLogprobs!;
        Assert.That(logprobs, Has.Count.EqualTo(prompt.Length - 1));
        Assert.That(logprobs.Select(l => l.TokenId), Is.EqualTo(prompt.Skip(1)));
        foreach (int position in new[] { 1, 511, 512, 513, 529 })
        {
            var reference = LogprobReference.LogSoftmax(LogprobReference.Logits(model, prompt.Take(position)));
            Assert.That(logprobs[position - 1].Logprob, Is.EqualTo(reference[prompt[position]]).Within(Tolerance), $"position {position}");
            Assert.That(logprobs[position - 1].TopLogprobs, Is.Empty);
        }
        Assert.That(result.Stats.PromptTokens, Is.EqualTo(prompt.Length));
    }

    [Test]
    public async Task NothingIsReportedUnlessAsked()
    {
        var c = ApiFixture.Cases[0];
        var updates = new List<GenerationUpdate>();
        await foreach (var u in _model.GenerateStreamAsync(c.PromptIds, SamplingOptions.Greedy with { MaxTokens = 4 }))
            updates.Add(u);
        Assert.That(updates.Select(u => u.Logprob), Has.All.Null);
        Assert.That(updates[^1].PromptLogprobs, Is.Null);

        var result = await _model.GenerateAsync(c.PromptIds, SamplingOptions.Greedy with { MaxTokens = 4 });
        Assert.That(result.Logprobs, Is.Null);
        Assert.That(result.PromptLogprobs, Is.Null);
    }

    [Test]
    public async Task EveryGeneratedTokenHasOneLogprobWhenAStopStringEndsTheText()
    {
        // A stop string cuts the text inside a token; that token is still generated and still has its log-probability.
        var c = ApiFixture.Cases[0];
        var sampling = SamplingOptions.Greedy with { MaxTokens = 32, StopStrings = ["rate pro"], Logprobs = true };
        var streamed = new List<TokenLogprob>();
        GenerationUpdate? last = null;
        await foreach (var u in _model.GenerateStreamAsync(c.PromptIds, sampling))
        {
            if (u.Logprob is not null)
                streamed.Add(u.Logprob);
            last = u;
        }
        var result = await _model.GenerateAsync(c.PromptIds, sampling);

        Assert.That(last!.FinishReason, Is.EqualTo(FinishReason.Stop));
        Assert.That(streamed.Select(l => l.TokenId), Is.EqualTo(result.TokenIds));
        var logprobs = result.Logprobs!;
        Assert.That(logprobs.Select(l => l.TokenId), Is.EqualTo(result.TokenIds));
        Assert.That(logprobs.Select(l => l.TopLogprobs.Count), Has.All.Zero);
    }

    [Test]
    public void TopLogprobsIsValidated()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => _ = new SamplingOptions { TopLogprobs = 21 });
        Assert.Throws<ArgumentOutOfRangeException>(() => _ = new SamplingOptions { TopLogprobs = -1 });
        Assert.That(new SamplingOptions { TopLogprobs = 20 }.TopLogprobs, Is.EqualTo(20));
    }

    [Test]
    public async Task ChatTurnsCarryLogprobsOfTheWholeAnswerIncludingTheStopToken()
    {
        var c = ApiFixture.Cases[0];
        using var session = _model.CreateSession(new SessionOptions { EnableThinking = false });
        var sampling = SamplingOptions.Greedy with { MaxTokens = 6, Logprobs = true, TopLogprobs = 2, PromptLogprobs = true };

        var first = await session.ChatAsync(c.LastUserMessage, sampling);
        Assert.That(first.Logprobs!.Select(l => l.TokenId), Is.EqualTo(first.TokenIds));
        Assert.That(first.PromptLogprobs!.Select(l => l.TokenId), Is.EqualTo(c.PromptIds.Skip(1)), "the first turn processes the whole prompt");

        var second = await session.ChatAsync("And of Italy?", sampling);
        int[] tokens = session.GetTokens().ToArray();
        int promptLength = second.Usage.PromptTokens;
        var expected = tokens.Take(promptLength).TakeLast(second.PromptLogprobs!.Count);
        Assert.That(second.PromptLogprobs.Select(l => l.TokenId), Is.EqualTo(expected), "the turn's processed prompt tokens, in order");
        Assert.That(second.PromptLogprobs.Count, Is.InRange(second.Usage.PrefilledTokens - 1, second.Usage.PrefilledTokens),
            "tokens reused from the cache have none");
        Assert.That(second.Logprobs!.Select(l => l.TokenId), Is.EqualTo(second.TokenIds));
    }
}
