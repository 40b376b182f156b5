namespace Qwen3Native.Chat;

/// <summary>
/// A rendered prompt and the images and videos its placeholders stand for, in the order the placeholders appear
/// (<see cref="Qwen3ChatTemplate.RenderPrompt"/>). Each <see cref="ImagePart"/> matches one
/// <see cref="Qwen3ChatTemplate.ImagePlaceholder"/>, each <see cref="VideoPart"/> one
/// <see cref="Qwen3ChatTemplate.VideoPlaceholder"/>.
/// </summary>
public sealed record ChatPrompt(string Text, IReadOnlyList<ChatContentPart> Media);
