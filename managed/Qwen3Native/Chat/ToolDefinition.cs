using System.Text;
using System.Text.Json;

namespace Qwen3Native.Chat;

/// <summary>
/// A function the model may call, rendered into the system prompt as
/// <c>{"type": "function", "function": {"name": …, "description": …, "parameters": …}}</c>.
/// </summary>
public sealed class ToolDefinition
{
    private readonly JsonElement? _whole;

    /// <param name="name">Function name.</param>
    /// <param name="description">Left out of the rendering when null.</param>
    /// <param name="parameters">JSON schema of the arguments; left out when null.</param>
    public ToolDefinition(string name, string? description, JsonElement? parameters)
    {
        ArgumentNullException.ThrowIfNull(name);
        Name = name;
        Description = description;
        Parameters = parameters?.Clone();
    }

    private ToolDefinition(JsonElement whole, string name, string? description, JsonElement? parameters)
    {
        _whole = whole;
        Name = name;
        Description = description;
        Parameters = parameters;
    }

    public string Name { get; }

    public string? Description { get; }

    public JsonElement? Parameters { get; }

    /// <summary>
    /// A tool given as the whole dictionary a transformers caller would pass (OpenAI shape, any extra keys, any
    /// key order); it is rendered exactly as given, only reformatted the way Python's json.dumps writes it.
    /// </summary>
    public static ToolDefinition FromJson(JsonElement tool)
    {
        if (tool.ValueKind != JsonValueKind.Object)
            throw new ArgumentException("A tool must be a JSON object.", nameof(tool));
        tool = tool.Clone();
        var fn = tool.TryGetProperty("function", out var f) && f.ValueKind == JsonValueKind.Object ? f : tool;
        string name = fn.TryGetProperty("name", out var n) && n.ValueKind == JsonValueKind.String ? n.GetString()! : string.Empty;
        string? description = fn.TryGetProperty("description", out var d) && d.ValueKind == JsonValueKind.String ? d.GetString() : null;
        JsonElement? parameters = fn.TryGetProperty("parameters", out var p) ? p : null;
        return new ToolDefinition(tool, name, description, parameters);
    }

    /// <summary>Parses <paramref name="json"/> and calls <see cref="FromJson(JsonElement)"/>.</summary>
    public static ToolDefinition FromJson(string json)
    {
        using var doc = JsonDocument.Parse(json);
        return FromJson(doc.RootElement);
    }

    internal void WriteTo(StringBuilder sb)
    {
        if (_whole is { } whole)
        {
            PythonJson.Write(sb, whole);
            return;
        }
        sb.Append("{\"type\": \"function\", \"function\": {\"name\": ");
        PythonJson.WriteString(sb, Name);
        if (Description is not null)
        {
            sb.Append(", \"description\": ");
            PythonJson.WriteString(sb, Description);
        }
        if (Parameters is { } p)
        {
            sb.Append(", \"parameters\": ");
            PythonJson.Write(sb, p);
        }
        sb.Append("}}");
    }
}
