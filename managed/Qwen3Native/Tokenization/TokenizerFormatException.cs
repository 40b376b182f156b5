namespace Qwen3Native.Tokenization;

/// <summary>
/// A tokenizer.json that cannot be read, or that asks for a component this implementation does not provide
/// (for instance a non-BPE model or an unknown pre-tokenizer). Loading fails loudly rather than producing ids
/// that silently differ from the Hugging Face tokenizer.
/// </summary>
public class TokenizerFormatException : FormatException
{
    public TokenizerFormatException(string message) : base(message) { }

    public TokenizerFormatException(string message, Exception innerException) : base(message, innerException) { }
}
