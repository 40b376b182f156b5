using System.Reflection;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using Qwen3Native.Interop;

namespace Qwen3Native.Tests.Interop;

/// <summary>The C# structs against the C layout that libclang computed from the header (NativeLayout).</summary>
[TestFixture]
public class LayoutTests
{
    private static readonly Type[] s_structs = typeof(NativeMethods).Assembly.GetTypes()
        .Where(t => t.Namespace == "Qwen3Native.Interop" && t.IsValueType && !t.IsEnum && t.Name.StartsWith("q3n_", StringComparison.Ordinal))
        .OrderBy(t => t.Name, StringComparer.Ordinal)
        .ToArray();

    private static readonly Dictionary<string, int> s_layout = typeof(NativeLayout)
        .GetFields(BindingFlags.Public | BindingFlags.Static)
        .Where(f => f.IsLiteral)
        .ToDictionary(f => f.Name, f => (int)f.GetRawConstantValue()!);

    public static IEnumerable<Type> Structs() => s_structs;

    [Test]
    public void EveryHeaderStructIsBound()
    {
        var expected = new[] { "q3n_model_info", "q3n_model_options", "q3n_sampling_params" };
        Assert.That(s_structs.Select(t => t.Name), Is.SupersetOf(expected));
    }

    [TestCaseSource(nameof(Structs))]
    public void SizeMatchesC(Type type)
    {
        Assert.That(s_layout.TryGetValue(type.Name + "_size", out int size), $"NativeLayout has no {type.Name}_size");
        Assert.That(Marshal.SizeOf(type), Is.EqualTo(size), "Marshal.SizeOf");
        Assert.That(ManagedSize(type), Is.EqualTo(size), "sizeof (the size a pointer to it steps by)");
    }

    [TestCaseSource(nameof(Structs))]
    public void EveryFieldOffsetMatchesC(Type type)
    {
        var fields = type.GetFields(BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.Instance);
        Assert.That(fields, Is.Not.Empty);
        Assert.Multiple(() =>
        {
            foreach (var field in fields)
            {
                string key = $"{type.Name}_{field.Name}_offset";
                Assert.That(s_layout.TryGetValue(key, out int offset), $"NativeLayout has no {key}");
                Assert.That((int)Marshal.OffsetOf(type, field.Name), Is.EqualTo(offset), key);
            }
        });
    }

    [TestCaseSource(nameof(Structs))]
    public void IsBlittable(Type type)
    {
        // Blittable structs go to native code as they are, without a marshalling copy.
        var isRefOrContainsRefs = typeof(RuntimeHelpers).GetMethod(nameof(RuntimeHelpers.IsReferenceOrContainsReferences))!
            .MakeGenericMethod(type);
        Assert.That((bool)isRefOrContainsRefs.Invoke(null, null)!, Is.False);
        Assert.That(type.StructLayoutAttribute?.Value, Is.EqualTo(LayoutKind.Sequential));
    }

    [Test]
    public void EveryLayoutConstantBelongsToABoundField()
    {
        var known = new HashSet<string>(StringComparer.Ordinal);
        foreach (var type in s_structs)
        {
            known.Add(type.Name + "_size");
            foreach (var field in type.GetFields(BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.Instance))
                known.Add($"{type.Name}_{field.Name}_offset");
        }
        Assert.That(s_layout.Keys.Where(k => !known.Contains(k)), Is.Empty, "constants without a C# struct field");
    }

    [Test]
    public void EnumsAreFourBytes()
    {
        // C enums are int-sized on every ABI the library targets; the struct offsets above depend on it.
        foreach (var type in new[] { typeof(q3n_status), typeof(q3n_device), typeof(q3n_dtype), typeof(q3n_load_format) })
            Assert.That(Marshal.SizeOf(Enum.GetUnderlyingType(type)), Is.EqualTo(4), type.Name);
    }

    private static int ManagedSize(Type type) =>
        (int)typeof(Unsafe).GetMethod(nameof(Unsafe.SizeOf))!.MakeGenericMethod(type).Invoke(null, null)!;
}
