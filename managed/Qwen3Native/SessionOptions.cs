using Qwen3Native.Chat;
using Qwen3Native.Generation;

namespace Qwen3Native;

/// <summary>How a <see cref="Qwen3Session"/> renders and samples its turns. Every property has a working default.</summary>
public sealed record SessionOptions
{
    /// <summary>A system message that opens the conversation (and stays after <see cref="Qwen3Session.Reset"/>).</summary>
    public string? SystemPrompt { get; init; }

    /// <summary>
    /// Hybrid Qwen3 models only: false pre-fills an empty think block so that the model answers at once; true (the
    /// template's default) lets it reason first. The 2507 Instruct and Thinking templates ignore it.
    /// </summary>
    public bool EnableThinking { get; init; } = true;

    /// <summary>Functions the model may call; rendered into the system prompt by the chat template.</summary>
    public IReadOnlyList<ToolDefinition>? Tools { get; init; }

    /// <summary>Sampling for turns that pass none; null = the model's <see cref="Qwen3Model.GenerationDefaults"/>.</summary>
    public SamplingOptions? Sampling { get; init; }

    /// <summary>Overrides the template detected from the checkpoint (<see cref="Qwen3Model.ChatTemplate"/>).</summary>
    public Qwen3ChatTemplate? ChatTemplate { get; init; }
}
