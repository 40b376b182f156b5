using Qwen3Native.Generation;

namespace Qwen3Native.Tests.Api;

[TestFixture]
public class StopStringMatcherTests
{
    [Test]
    public void HoldsBackAPossibleStartAndReleasesItWhenItCannotMatch()
    {
        var m = new StopStringMatcher(["</answer>"]);
        Assert.That(m.Push("The end </an", out bool matched), Is.EqualTo("The end "));
        Assert.That(matched, Is.False);
        Assert.That(m.Push("chor", out matched), Is.EqualTo("</anchor"));
        Assert.That(matched, Is.False);
        Assert.That(m.Flush(), Is.Empty);
    }

    [Test]
    public void MatchAcrossPushesDropsTheStopAndTheRest()
    {
        var m = new StopStringMatcher(["STOP", "END"]);
        Assert.That(m.Push("abc S", out bool matched), Is.EqualTo("abc "));
        Assert.That(m.Push("TO", out matched), Is.Empty);
        Assert.That(m.Push("P and more", out matched), Is.Empty);
        Assert.That(matched, Is.True);
    }

    [Test]
    public void EarliestOfSeveralStopsWins()
    {
        var m = new StopStringMatcher(["xyz", "b"]);
        Assert.That(m.Push("a b xyz", out bool matched), Is.EqualTo("a "));
        Assert.That(matched, Is.True);
    }

    [Test]
    public void FlushReleasesAHeldPrefixAtTheEnd()
    {
        var m = new StopStringMatcher(["<|end|>"]);
        Assert.That(m.Push("text <|e", out _), Is.EqualTo("text "));
        Assert.That(m.Flush(), Is.EqualTo("<|e"));
    }

    [Test]
    public void NoStopsPassEverythingThrough()
    {
        var m = new StopStringMatcher([]);
        Assert.That(m.Push("anything", out bool matched), Is.EqualTo("anything"));
        Assert.That(matched, Is.False);
    }
}
