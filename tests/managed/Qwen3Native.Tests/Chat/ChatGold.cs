using System.Text.Json;
using Qwen3Native.Chat;

namespace Qwen3Native.Tests.Chat;

/// <summary>Reads tests/fixtures/chat/gold.json (written by make_gold.py from transformers) into typed cases.</summary>
internal static class ChatGold
{
    public const string MissingMessage = "gold.json missing: run make_gold.py (python3 tests/fixtures/chat/make_gold.py)";

    public sealed record Case(int Index, string Template, string Name, IReadOnlyList<ChatMessage> Messages,
        JsonElement Tools, bool AddGenerationPrompt, bool? EnableThinking, string Rendered)
    {
        public Qwen3ChatTemplate Renderer => Template switch
        {
            "qwen3" => Qwen3ChatTemplate.Hybrid,
            "qwen3_instruct_2507" => Qwen3ChatTemplate.Instruct2507,
            "qwen3_thinking_2507" => Qwen3ChatTemplate.Thinking2507,
            _ => throw new InvalidOperationException("unknown template " + Template),
        };

        public ChatTemplateOptions Options => new() { AddGenerationPrompt = AddGenerationPrompt, EnableThinking = EnableThinking };

        /// <summary>Tools built from name, description and parameters, the way a C# caller would.</summary>
        public IReadOnlyList<ToolDefinition>? TypedTools()
        {
            if (Tools.ValueKind != JsonValueKind.Array)
                return null;
            var list = new List<ToolDefinition>();
            foreach (var t in Tools.EnumerateArray())
            {
                var f = t.GetProperty("function");
                list.Add(new ToolDefinition(f.GetProperty("name").GetString()!,
                    f.TryGetProperty("description", out var d) ? d.GetString() : null,
                    f.TryGetProperty("parameters", out var p) ? p : null));
            }
            return list;
        }

        /// <summary>Tools passed through as whole JSON dictionaries.</summary>
        public IReadOnlyList<ToolDefinition>? JsonTools() =>
            Tools.ValueKind == JsonValueKind.Array ? Tools.EnumerateArray().Select(ToolDefinition.FromJson).ToList() : null;

        public override string ToString() => $"{Index:000}_{Template}_{Name}_agp{(AddGenerationPrompt ? 1 : 0)}_et{EnableThinking?.ToString() ?? "unset"}";
    }

    public static string FixtureDir
    {
        get
        {
            var dir = new DirectoryInfo(TestContext.CurrentContext.TestDirectory);
            while (dir is not null)
            {
                var candidate = Path.Combine(dir.FullName, "tests", "fixtures", "chat");
                if (Directory.Exists(candidate))
                    return candidate;
                dir = dir.Parent;
            }
            throw new DirectoryNotFoundException("tests/fixtures/chat not found above " + TestContext.CurrentContext.TestDirectory);
        }
    }

    /// <summary>QWEN3_CHAT_GOLD may name another file (e.g. gold.local.json from make_gold.py --local).</summary>
    public static string GoldPath => Environment.GetEnvironmentVariable("QWEN3_CHAT_GOLD") is { Length: > 0 } p
        ? p
        : Path.Combine(FixtureDir, "gold.json");

    private static List<Case>? s_cases;

    public static List<Case>? Load()
    {
        if (s_cases is not null)
            return s_cases;
        if (!File.Exists(GoldPath))
            return null;
        using var doc = JsonDocument.Parse(File.ReadAllBytes(GoldPath));
        var cases = new List<Case>();
        int i = 0;
        foreach (var c in doc.RootElement.EnumerateArray())
        {
            bool? et = c.TryGetProperty("enable_thinking", out var e) ? e.GetBoolean() : null;
            cases.Add(new Case(i++, c.GetProperty("template").GetString()!,
                c.TryGetProperty("name", out var n) ? n.GetString()! : "case",
                c.GetProperty("messages").EnumerateArray().Select(ToMessage).ToList(),
                c.GetProperty("tools").Clone(), c.GetProperty("add_generation_prompt").GetBoolean(), et,
                c.GetProperty("rendered").GetString()!));
        }
        return s_cases = cases;
    }

    public static ChatMessage ToMessage(JsonElement m)
    {
        var role = m.GetProperty("role").GetString() switch
        {
            "system" => ChatRole.System,
            "user" => ChatRole.User,
            "assistant" => ChatRole.Assistant,
            "tool" => ChatRole.Tool,
            var r => throw new InvalidOperationException("unknown role " + r),
        };
        string? content = m.TryGetProperty("content", out var c) && c.ValueKind == JsonValueKind.String ? c.GetString() : null;
        string? reasoning = m.TryGetProperty("reasoning_content", out var r2) && r2.ValueKind == JsonValueKind.String ? r2.GetString() : null;
        var calls = new List<ToolCall>();
        if (m.TryGetProperty("tool_calls", out var tcs) && tcs.ValueKind == JsonValueKind.Array)
        {
            foreach (var tc in tcs.EnumerateArray())
            {
                var f = tc.TryGetProperty("function", out var fn) ? fn : tc;
                string? id = tc.TryGetProperty("id", out var idEl) ? idEl.GetString() : null;
                calls.Add(ToolCall.FromJson(f.GetProperty("name").GetString()!, f.GetProperty("arguments"), id));
            }
        }
        string? name = m.TryGetProperty("name", out var nm) ? nm.GetString() : null;
        string? callId = m.TryGetProperty("tool_call_id", out var tid) ? tid.GetString() : null;
        return new ChatMessage(role, content, reasoning, calls, callId, name);
    }

    /// <summary>Assertion message pointing at the first differing character.</summary>
    public static string Diff(string expected, string actual)
    {
        int i = 0;
        while (i < expected.Length && i < actual.Length && expected[i] == actual[i])
            i++;
        static string Show(string s, int at) =>
            JsonSerializer.Serialize(s.Substring(Math.Max(0, at - 60), Math.Min(s.Length, at + 60) - Math.Max(0, at - 60)));
        return $"first difference at char {i} (expected length {expected.Length}, actual {actual.Length})\n" +
               $"expected: {Show(expected, i)}\nactual:   {Show(actual, i)}";
    }
}
