using Qwen3Native.Generation;

namespace Qwen3Native.AI;

/// <summary>Defaults of a <see cref="Qwen3ChatClient"/>; each request's <c>ChatOptions</c> override them.</summary>
public sealed record Qwen3ChatClientOptions
{
    /// <summary>
    /// Hybrid Qwen3 models: whether the model reasons before answering when a request says nothing
    /// (<c>ChatOptions.Reasoning</c>, or an <c>enable_thinking</c> additional property). The template's default is true.
    /// </summary>
    public bool EnableThinking { get; init; } = true;

    /// <summary>Sampling that requests start from; null = the model's <see cref="Qwen3Model.GenerationDefaults"/>.</summary>
    public SamplingOptions? DefaultSampling { get; init; }

    /// <summary>Reported as the model id; null = the checkpoint directory's name.</summary>
    public string? ModelId { get; init; }

    /// <summary>Dispose the model together with the client.</summary>
    public bool OwnsModel { get; init; }
}
