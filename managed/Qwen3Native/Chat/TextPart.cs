namespace Qwen3Native.Chat;

/// <summary>Text inside a multipart message, rendered verbatim.</summary>
public sealed class TextPart : ChatContentPart
{
    public TextPart(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        Text = text;
    }

    public string Text { get; }

    public override string ToString() => Text;
}
