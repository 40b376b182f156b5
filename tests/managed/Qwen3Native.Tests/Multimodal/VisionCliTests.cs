using System.Text.Json;
using Qwen3Native.Tests.Api;
using Qwen3Native.Tests.Interop;

namespace Qwen3Native.Tests.Multimodal;

/// <summary>--image and --video of qwen3 generate and qwen3 chat, run in-process.</summary>
[TestFixture]
public sealed class VisionCliTests
{
    private static readonly string[] s_load = ["--device", "cpu", "--threads", "2"];

    private static string Photo => RepositoryRoot.Combine("tests", "fixtures", "images", "photo_420.jpg");

    private static async Task<(int Code, string Out, string Error)> RunAsync(string stdin, params string[] args)
    {
        using var output = new StringWriter();
        using var error = new StringWriter();
        int code = await Qwen3Native.Cli.Cli.RunAsync([.. args, .. s_load], new StringReader(stdin), output, error);
        return (code, output.ToString(), error.ToString());
    }

    [Test]
    public async Task GenerateAttachesTheImageToTheChatMessage()
    {
        using var dir = VisionFixture.WithTokenizer("bf16_dense_tied");
        dir.Write("chat_template.jinja", VisionFixture.VlTemplateMarker);
        var run = await RunAsync("", "generate", "-m", dir.Path, "--chat", "--image", Photo, "-p", "What is this?",
            "--temperature", "0", "--max-tokens", "3", "--json", "--context", "512");
        Assert.That(run.Code, Is.Zero, run.Error);
        var usage = JsonDocument.Parse(run.Out).RootElement.GetProperty("usage");
        Assert.That(usage.GetProperty("prompt_tokens").GetInt32(), Is.GreaterThan(60), "the image's tokens are in the prompt");
        Assert.That(usage.GetProperty("generated_tokens").GetInt32(), Is.EqualTo(3));
    }

    [Test]
    public async Task ChatAttachesImagesToTheNextMessage()
    {
        using var dir = VisionFixture.WithTokenizer("bf16_dense_tied");
        dir.Write("chat_template.jinja", VisionFixture.VlTemplateMarker);
        var run = await RunAsync($"What is this?\n/image {Photo}\nAnd this?\n", "chat", "-m", dir.Path, "--image", Photo,
            "--temperature", "0", "--max-tokens", "2", "--context", "512", "--stats");
        Assert.That(run.Code, Is.Zero, run.Error);
        Assert.That(run.Error, Does.Contain("attached to your next message"));
    }

    [Test]
    public async Task TextModelSaysItHasNoVision()
    {
        var run = await RunAsync("", "generate", "-m", ApiFixture.Directory, "--chat", "--image", Photo, "-p", "What is this?");
        Assert.That(run.Code, Is.EqualTo(1));
        Assert.That(run.Error, Does.Contain("no vision tower").And.Contain("Qwen3-VL"));

        run = await RunAsync("Hello\n", "chat", "-m", ApiFixture.Directory, "--image", Photo);
        Assert.That(run.Code, Is.EqualTo(1));
        Assert.That(run.Error, Does.Contain("no vision tower"));
    }

    [Test]
    public async Task MediaNeedsChatAndExistingFiles()
    {
        var run = await RunAsync("", "generate", "-m", ApiFixture.Directory, "--image", Photo, "-p", "What is this?");
        Assert.That(run.Code, Is.EqualTo(2));
        Assert.That(run.Error, Does.Contain("--chat"));

        run = await RunAsync("", "generate", "-m", ApiFixture.Directory, "--chat", "--video", "/no/such/clip.mp4", "-p", "Hi");
        Assert.That(run.Code, Is.EqualTo(2));
        Assert.That(run.Error, Does.Contain("--video").And.Contain("does not exist"));
    }
}
