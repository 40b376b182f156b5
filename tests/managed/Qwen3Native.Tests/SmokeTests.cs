namespace Qwen3Native.Tests;

public class SmokeTests
{
    [Test]
    public void AssemblyLoads() => Assert.That(typeof(Qwen3Native.Placeholder).Assembly.GetName().Name, Is.EqualTo("Qwen3Native"));
}
