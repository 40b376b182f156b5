using Qwen3Native.Chat;

namespace Qwen3Native.Tests.Api;

/// <summary>Loading: model information, the checkpoint's metadata, progress and cancellation.</summary>
[TestFixture]
public class ModelTests
{
    [Test]
    public void InfoDescribesTheCheckpoint()
    {
        using var model = ApiFixture.Load();
        var info = model.Info;
        // config.json of real_vocab_tiny.
        Assert.That(info.Architecture, Is.EqualTo("Qwen3ForCausalLM"));
        Assert.That(info.VocabSize, Is.EqualTo(151936));
        Assert.That(info.HiddenSize, Is.EqualTo(48));
        Assert.That(info.IntermediateSize, Is.EqualTo(96));
        Assert.That(info.NumLayers, Is.EqualTo(2));
        Assert.That(info.NumAttentionHeads, Is.EqualTo(2));
        Assert.That(info.NumKeyValueHeads, Is.EqualTo(1));
        Assert.That(info.HeadDim, Is.EqualTo(32));
        Assert.That(info.MaxPositionEmbeddings, Is.EqualTo(4096));
        Assert.That(info.ContextLength, Is.EqualTo(4096), "default: min(max_position_embeddings, 32768)");
        Assert.That(info.KvCacheTokens, Is.EqualTo(4096));
        Assert.That(info.Device, Is.EqualTo(Qwen3Device.Cpu));
        Assert.That(info.WeightDtype, Is.EqualTo(Qwen3DataType.BF16));
        Assert.That(info.BosTokenId, Is.EqualTo(151643));
        Assert.That(info.EosTokenIds, Is.EquivalentTo(new[] { 151645, 151643 }), "config.json's eos, then generation_config.json's");
        Assert.That(info.ParameterCount, Is.GreaterThan(0));
        Assert.That(model.Directory, Is.EqualTo(Path.GetFullPath(ApiFixture.Directory)));
        Assert.That(model.HasTokenizer, Is.True);
        Assert.That(model.Tokenizer.VocabSize, Is.GreaterThan(151000));
        Assert.That(Qwen3Model.NativeVersion, Is.Not.Empty);
    }

    [Test]
    public void ContextAndKvOptionsReachTheEngine()
    {
        using var model = ApiFixture.Load(contextLength: 256, kvCacheTokens: 1024);
        Assert.That(model.Info.ContextLength, Is.EqualTo(256));
        Assert.That(model.Info.KvCacheTokens, Is.EqualTo(1024));
    }

    [Test]
    public void TemplateVariantIsDetectedFromTheCheckpoint()
    {
        using var dir = ApiFixture.NewTempDirectory();
        dir.CopyFromFixture("config.json");
        var options = ApiFixture.Options() with { LoadFormat = LoadFormat.Dummy };

        // chat_template.jinja wins over tokenizer_config.json, as in transformers.
        dir.Write("tokenizer_config.json", File.ReadAllText(Path.Combine(ApiFixture.Directory, "tokenizer_config.json")));
        using (var model = Qwen3Model.Load(dir.Path, options))
            Assert.That(model.ChatTemplate, Is.SameAs(Qwen3ChatTemplate.Hybrid));

        dir.Write("chat_template.jinja", "{% for message in messages %}{{ message.content }}{% endfor %}");
        using (var model = Qwen3Model.Load(dir.Path, options))
        {
            Assert.That(model.ChatTemplate, Is.SameAs(Qwen3ChatTemplate.Hybrid));
            Assert.That(model.ChatTemplateNote, Does.Contain("not one of the known Qwen3 templates"));
        }
    }

    [Test]
    public async Task LoadAsyncReportsProgressUpToOne()
    {
        var progress = new RecordingProgress();
        using var model = await Qwen3Model.LoadAsync(ApiFixture.Directory, ApiFixture.Options(), progress);
        Assert.That(progress.Values, Is.Not.Empty);
        Assert.That(progress.Values, Is.Ordered);
        Assert.That(progress.Values, Has.All.InRange(0f, 1f));
        Assert.That(progress.Values[^1], Is.EqualTo(1f));
    }

    [Test]
    public void LoadAsyncCancelledFromTheProgressCallback()
    {
        using var cts = new CancellationTokenSource();
        // Cancel at the first report: the engine's next progress call gets "stop" and abandons the load.
        var progress = new RecordingProgress(onReport: _ => cts.Cancel());
        Assert.CatchAsync<OperationCanceledException>(() => Qwen3Model.LoadAsync(ApiFixture.Directory, ApiFixture.Options(), progress, cts.Token));
        Assert.That(progress.Values, Has.Count.EqualTo(1), "no progress after the cancellation");
    }

    [Test]
    public void LoadAsyncWithACancelledToken()
    {
        Assert.CatchAsync<OperationCanceledException>(() =>
            Qwen3Model.LoadAsync(ApiFixture.Directory, ApiFixture.Options(), null, new CancellationToken(canceled: true)));
    }

    [Test]
    public void ExceptionFromTheProgressHandlerStopsTheLoadAndSurfaces()
    {
        var progress = new RecordingProgress(onReport: _ => throw new InvalidDataException("from the handler"));
        var ex = Assert.ThrowsAsync<InvalidDataException>(() => Qwen3Model.LoadAsync(ApiFixture.Directory, ApiFixture.Options(), progress));
        Assert.That(ex!.Message, Is.EqualTo("from the handler"));
    }

    /// <summary>Records reports synchronously on the loading thread (Progress&lt;T&gt; would post them elsewhere).</summary>
    private sealed class RecordingProgress(Action<float>? onReport = null) : IProgress<float>
    {
        private readonly List<float> _values = new();

        public List<float> Values
        {
            get { lock (_values) return _values.ToList(); }
        }

        public void Report(float value)
        {
            lock (_values) _values.Add(value);
            onReport?.Invoke(value);
        }
    }
}
