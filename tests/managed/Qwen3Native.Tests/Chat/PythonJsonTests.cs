using System.Text.Json;
using Qwen3Native.Chat;

namespace Qwen3Native.Tests.Chat;

/// <summary>Expected values are what python3's json.dumps(json.loads(x), ensure_ascii=False) prints.</summary>
public class PythonJsonTests
{
    private static string Dump(string json)
    {
        using var doc = JsonDocument.Parse(json);
        return PythonJson.Serialize(doc.RootElement);
    }

    [TestCase("1E5", "100000.0")]
    [TestCase("1e-5", "1e-05")]
    [TestCase("1e16", "1e+16")]
    [TestCase("1e15", "1000000000000000.0")]
    [TestCase("0.1", "0.1")]
    [TestCase("-0.0", "-0.0")]
    [TestCase("1e400", "Infinity")]
    [TestCase("-1e400", "-Infinity")]
    [TestCase("-0", "0")]
    [TestCase("12345678901234567890", "12345678901234567890")]
    [TestCase("5e-324", "5e-324")]
    [TestCase("1.7976931348623157e308", "1.7976931348623157e+308")]
    [TestCase("123456789012345680.0", "1.2345678901234568e+17")]
    [TestCase("0.001", "0.001")]
    [TestCase("0.0001", "0.0001")]
    [TestCase("2.5E-4", "0.00025")]
    [TestCase("1.0", "1.0")]
    [TestCase("100", "100")]
    [TestCase("-1.5e-7", "-1.5e-07")]
    [TestCase("9007199254740993.0", "9007199254740992.0")]
    [TestCase("1e22", "1e+22")]
    [TestCase("3.14159", "3.14159")]
    public void NumbersPrintLikePython(string json, string expected) => Assert.That(Dump(json), Is.EqualTo(expected));

    [Test]
    public void ObjectsKeepOrderUseSpacedSeparatorsAndLastDuplicateWins() =>
        Assert.That(Dump("{\"a\":1,\"b\":[],\"c\":{},\"a\":3}"), Is.EqualTo("{\"a\": 3, \"b\": [], \"c\": {}}"));

    [Test]
    public void NestedArraysAndLiterals() =>
        Assert.That(Dump("[1,[true,false,null],{\"k\":[{}]}]"), Is.EqualTo("[1, [true, false, null], {\"k\": [{}]}]"));

    [Test]
    public void StringsEscapeOnlyQuotesBackslashAndControls()
    {
        string s = "q\"\\ \u0001\u001f\u007f é \u2028 \b\f\n\r\t/ 😀";
        using var doc = JsonDocument.Parse(JsonSerializer.Serialize(s));
        Assert.That(PythonJson.Serialize(doc.RootElement),
            Is.EqualTo("\"q\\\"\\\\ \\u0001\\u001f\u007f é \u2028 \\b\\f\\n\\r\\t/ 😀\""));
    }
}
