using System.Runtime.InteropServices;
using System.Text.Json;
using Qwen3Native.Interop;

namespace Qwen3Native.Tests.Interop;

/// <summary>Calls through the generated bindings into the real library (out/build, copied beside the tests).</summary>
[TestFixture]
public class NativeSmokeTests
{
    private static string Fixture(string name) => RepositoryRoot.Combine("tests", "fixtures", "qwen3", name);

    private static SafeModelHandle LoadOnCpu(string name)
    {
        var options = NativeDefaults.ModelOptions();
        options.device = q3n_device.Q3N_DEVICE_CPU;
        var status = SafeModelHandle.Load(Fixture(name), options, out var model);
        Assert.That(status, Is.EqualTo(q3n_status.Q3N_OK), () => NativeUtf8.LastError());
        return model;
    }

    [Test]
    public void AbiVersionMatchesTheBindings()
    {
        Assert.That(NativeMethods.q3n_abi_version(), Is.EqualTo(NativeMethods.AbiVersion));
        Assert.That(NativeLibraryLoader.LoadedFrom, Is.Not.Null, "the resolver, not the runtime's own probing, loaded the library");
    }

    [Test]
    public void VersionStringIsNotEmpty()
    {
        Assert.That(NativeUtf8.VersionString(), Is.Not.Empty);
    }

    [Test]
    public void StatusNamesAreTheEnumMemberNames()
    {
        Assert.Multiple(() =>
        {
            foreach (var status in Enum.GetValues<q3n_status>())
                Assert.That(NativeUtf8.StatusName(status), Is.EqualTo(status.ToString()));
        });
    }

    [Test]
    public void InitFunctionsSetStructSizeToTheBoundSize()
    {
        // The library's sizeof, compared with the C# struct: the layout check libclang cannot make.
        Assert.That(NativeDefaults.ModelOptions().struct_size, Is.EqualTo((uint)Marshal.SizeOf<q3n_model_options>()));
        Assert.That(NativeDefaults.SamplingParams().struct_size, Is.EqualTo((uint)Marshal.SizeOf<q3n_sampling_params>()));
    }

    [Test]
    public void LoadingAMissingDirectoryFailsWithIoAndAMessage()
    {
        string missing = Path.Combine(Path.GetTempPath(), "q3n-missing-" + Guid.NewGuid().ToString("N"));
        var status = SafeModelHandle.Load(missing, out var model);
        string error = NativeUtf8.LastError();
        using (model)
        {
            Assert.That(status, Is.EqualTo(q3n_status.Q3N_ERR_IO));
            Assert.That(model.IsInvalid, Is.True);
            Assert.That(error, Is.Not.Empty);
        }
    }

    [Test]
    public void StringsWithNulAreRejectedBeforeTheCall()
    {
        Assert.Throws<ArgumentException>(() => SafeModelHandle.Load(Fixture("bf16_tied") + "\0/elsewhere", out _));
    }

    [Test]
    public void LoadsBf16TiedAndStepsOneSequenceToTheReferenceToken()
    {
        using var reference = JsonDocument.Parse(File.ReadAllText(Path.Combine(Fixture("bf16_tied"), "reference.json")));
        int[] prompt = reference.RootElement.GetProperty("prompts").EnumerateArray().Last().EnumerateArray().Select(e => e.GetInt32()).ToArray();
        int expected = reference.RootElement.GetProperty("greedy").GetProperty("tokens")[0].GetInt32();

        using var model = LoadOnCpu("bf16_tied");
        Assert.That(model.GetInfo(out var info), Is.EqualTo(q3n_status.Q3N_OK), () => NativeUtf8.LastError());
        Assert.That(info.vocab_size, Is.EqualTo(512));
        Assert.That(info.hidden_size, Is.EqualTo(128));
        Assert.That(info.num_layers, Is.EqualTo(2));
        Assert.That(info.device, Is.EqualTo(q3n_device.Q3N_DEVICE_CPU));
        Assert.That(info.weight_dtype, Is.EqualTo(q3n_dtype.Q3N_DTYPE_BF16));

        Assert.That(SafeSequenceHandle.Create(model, out var sequence), Is.EqualTo(q3n_status.Q3N_OK), () => NativeUtf8.LastError());
        using (sequence)
        {
            Assert.That(sequence.LastToken(out int none), Is.EqualTo(q3n_status.Q3N_OK));
            Assert.That(none, Is.EqualTo(-1));
            Assert.That(sequence.Append(prompt), Is.EqualTo(q3n_status.Q3N_OK), () => NativeUtf8.LastError());
            Assert.That(model.Step([sequence], NativeMethods.Q3N_STEP_SAMPLE), Is.EqualTo(q3n_status.Q3N_OK), () => NativeUtf8.LastError());
            Assert.That(sequence.LastToken(out int token), Is.EqualTo(q3n_status.Q3N_OK));
            Assert.That(token, Is.EqualTo(expected), "greedy token after the fixture's last prompt (transformers reference)");
        }
    }

    [Test]
    public void ModelDisposedBeforeItsSequenceIsFreedWithTheSequence()
    {
        var model = LoadOnCpu("bf16_tied");
        Assert.That(SafeSequenceHandle.Create(model, out var sequence), Is.EqualTo(q3n_status.Q3N_OK));
        model.Dispose();
        // The sequence's reference defers q3n_model_free: the handle is disposed but not yet released.
        Assert.That(model.IsClosed, Is.False);
        Assert.That(sequence.Append([1, 2, 3]), Is.EqualTo(q3n_status.Q3N_OK), () => NativeUtf8.LastError());
        sequence.Dispose();
        Assert.That(sequence.IsClosed, Is.True);
        Assert.That(model.IsClosed, Is.True, "the last sequence's release frees the model");
        Assert.That(sequence.Model, Is.Null);
    }

    [Test]
    public void UseAfterDisposeThrowsObjectDisposed()
    {
        var model = LoadOnCpu("bf16_tied");
        Assert.That(SafeSequenceHandle.Create(model, out var sequence), Is.EqualTo(q3n_status.Q3N_OK));
        sequence.Dispose();
        sequence.Dispose();
        Assert.Throws<ObjectDisposedException>(() => sequence.Append([1]));
        Assert.Throws<ObjectDisposedException>(() => sequence.LastToken(out _));
        model.Dispose();
        Assert.Throws<ObjectDisposedException>(() => model.GetInfo(out _));
        Assert.Throws<ObjectDisposedException>(() => SafeSequenceHandle.Create(model, out _));
    }
}
