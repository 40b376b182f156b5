namespace Qwen3Native.Chat;

/// <summary>
/// One piece of a message's content, in the list form that the Qwen3-VL chat template reads
/// (<c>{"type": "text" | "image" | "video", ...}</c>): a <see cref="TextPart"/>, an <see cref="ImagePart"/> or a
/// <see cref="VideoPart"/>. A message built from a string holds a single text part.
/// </summary>
public abstract class ChatContentPart
{
    // Only the three kinds the template knows; a caller-defined part would have no rendering.
    private protected ChatContentPart() { }

    public static implicit operator ChatContentPart(string text) => new TextPart(text);
}
