using Microsoft.Extensions.AI;
using Qwen3Native.AI;
using Qwen3Native.Generation;

namespace Qwen3Native.Tests.Api;

/// <summary>Disposal in any order, and use after dispose.</summary>
[TestFixture]
public class LifetimeTests
{
    private static readonly SamplingOptions Short = SamplingOptions.Greedy with { MaxTokens = 2 };

    [Test]
    public async Task ModelDisposedBeforeItsSession()
    {
        var c = ApiFixture.Cases[0];
        var model = ApiFixture.Load();
        var session = model.CreateSession(new SessionOptions { EnableThinking = false });
        await session.ChatAsync(c.LastUserMessage, Short);

        model.Dispose();

        var ex = Assert.ThrowsAsync<ObjectDisposedException>(() => session.ChatAsync("again", Short));
        Assert.That(ex!.ObjectName, Does.Contain(nameof(Qwen3Model)));
        Assert.DoesNotThrow(session.Dispose, "the session still owns its sequence and frees it after the model");
        Assert.DoesNotThrow(session.Dispose);
        Assert.DoesNotThrow(model.Dispose);
    }

    [Test]
    public async Task SessionDisposedBeforeItsModel()
    {
        var c = ApiFixture.Cases[0];
        using var model = ApiFixture.Load();
        var session = model.CreateSession(new SessionOptions { EnableThinking = false });
        await session.ChatAsync(c.LastUserMessage, Short);

        session.Dispose();

        Assert.ThrowsAsync<ObjectDisposedException>(() => session.ChatAsync("again", Short));
        Assert.Throws<ObjectDisposedException>(() => _ = session.CachedTokenCount);
        Assert.Throws<ObjectDisposedException>(() => session.GetTokens());
        Assert.Throws<ObjectDisposedException>(() => session.AddMessage(Qwen3Native.Chat.ChatMessage.User("x")));
        // The model is unaffected.
        var result = await model.GenerateAsync(c.PromptIds, Short);
        Assert.That(result.TokenIds, Has.Count.EqualTo(2));
    }

    [Test]
    public void ModelUseAfterDisposeThrowsObjectDisposed()
    {
        var c = ApiFixture.Cases[0];
        var model = ApiFixture.Load();
        model.Dispose();

        Assert.Throws<ObjectDisposedException>(() => model.CreateSession());
        Assert.ThrowsAsync<ObjectDisposedException>(() => model.GenerateAsync(c.PromptIds, Short));
        Assert.Throws<ObjectDisposedException>(() => model.GenerateStreamAsync(c.PromptIds, Short));
        Assert.Throws<ObjectDisposedException>(() => new Qwen3ChatClient(model));
        // What was read at load time stays readable.
        Assert.That(model.Info.Architecture, Is.EqualTo("Qwen3ForCausalLM"));
    }

    [Test]
    public void ModelDisposedDuringAStreamStopsItWithObjectDisposed()
    {
        var c = ApiFixture.Cases[0];
        var model = ApiFixture.Load();
        using var session = model.CreateSession(new SessionOptions { EnableThinking = false });
        int received = 0;
        Assert.ThrowsAsync<ObjectDisposedException>(async () =>
        {
            await foreach (var _ in session.ChatStreamAsync(c.LastUserMessage, SamplingOptions.Greedy with { MaxTokens = 100 }))
                if (++received == 2)
                    model.Dispose();
        });
        Assert.That(session.GetTokens(), Is.Empty, "the failed turn freed its sequence");
    }

    [Test]
    public async Task ChatClientDisposalInAnyOrder()
    {
        var model = ApiFixture.Load();
        var client = new Qwen3ChatClient(model);
        await client.GetResponseAsync("Hello", new ChatOptions { MaxOutputTokens = 2, Temperature = 0 });
        model.Dispose();
        Assert.ThrowsAsync<ObjectDisposedException>(() => client.GetResponseAsync("Hello"));
        client.Dispose();
        client.Dispose();
        Assert.ThrowsAsync<ObjectDisposedException>(() => client.GetResponseAsync("Hello"));

        // OwnsModel: the client takes the model with it.
        var owned = ApiFixture.Load();
        var owner = new Qwen3ChatClient(owned, new Qwen3ChatClientOptions { OwnsModel = true });
        owner.Dispose();
        Assert.Throws<ObjectDisposedException>(() => owned.CreateSession());
    }
}
