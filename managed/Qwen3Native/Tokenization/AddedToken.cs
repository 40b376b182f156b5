namespace Qwen3Native.Tokenization;

/// <summary>
/// A token declared in tokenizer.json's "added_tokens" (chat markers such as &lt;|im_end|&gt;, &lt;think&gt;).
/// Flags keep the Hugging Face meaning: <see cref="Special"/> tokens are dropped by
/// <c>Decode(..., skipSpecialTokens: true)</c>; <see cref="Normalized"/> tokens are matched after NFC;
/// <see cref="LStrip"/>/<see cref="RStrip"/> swallow neighbouring whitespace; <see cref="SingleWord"/> tokens
/// only match when not glued to word characters.
/// </summary>
public sealed record AddedToken(int Id, string Content, bool Special, bool Normalized, bool LStrip, bool RStrip, bool SingleWord);
