using Qwen3Native.Tokenization;

namespace Qwen3Native.Generation;

/// <summary>
/// Follows a chat answer token by token to tell reasoning, answer and tool-call text apart while streaming. Qwen3's
/// vocabulary has one token per tag (&lt;think&gt; 151667, &lt;/think&gt; 151668, &lt;tool_call&gt; 151657,
/// &lt;/tool_call&gt; 151658), so the tags are recognised by id; the ids come from the tokenizer. The rules are
/// <see cref="Chat.ChatOutputParser"/>'s: a think block counts only at the start of the answer.
/// </summary>
internal sealed class OutputKindTracker
{
    private readonly Qwen3Tokenizer _tokenizer;
    private readonly int _thinkOpen;
    private readonly int _thinkClose;
    private readonly int _callOpen;
    private readonly int _callClose;
    private OutputKind _state;
    private bool _answerStarted;

    public OutputKindTracker(Qwen3Tokenizer tokenizer, bool startsInReasoning)
    {
        _tokenizer = tokenizer;
        _thinkOpen = tokenizer.TokenToId("<think>") ?? -1;
        _thinkClose = tokenizer.TokenToId("</think>") ?? -1;
        _callOpen = tokenizer.TokenToId("<tool_call>") ?? -1;
        _callClose = tokenizer.TokenToId("</tool_call>") ?? -1;
        _state = startsInReasoning ? OutputKind.Reasoning : OutputKind.Content;
        _answerStarted = startsInReasoning;
    }

    /// <summary>The kind of text that the next ordinary token continues.</summary>
    public OutputKind Current => _state;

    public OutputKind Classify(int token)
    {
        switch (_state)
        {
            case OutputKind.Content when token == _thinkOpen && !_answerStarted:
                _state = OutputKind.Reasoning;
                _answerStarted = true;
                return OutputKind.Markup;
            case OutputKind.Reasoning when token == _thinkClose:
                _state = OutputKind.Content;
                return OutputKind.Markup;
            case OutputKind.Content when token == _callOpen:
                _answerStarted = true;
                _state = OutputKind.ToolCall;
                return OutputKind.Markup;
            case OutputKind.ToolCall when token == _callClose:
                _state = OutputKind.Content;
                return OutputKind.Markup;
        }
        // Leading whitespace does not start the answer: the parser still accepts a think block after it.
        // A padding id past the tokenizer's vocabulary has no text: it starts nothing.
        if (!_answerStarted && _tokenizer.IdToToken(token) is not null && !string.IsNullOrWhiteSpace(_tokenizer.Decode(token)))
            _answerStarted = true;
        return _state;
    }
}
