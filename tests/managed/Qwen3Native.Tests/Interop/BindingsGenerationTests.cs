using System.Diagnostics;

namespace Qwen3Native.Tests.Interop;

/// <summary>bindings/NativeMethods.g.cs must be exactly what build/bindgen makes of the current header.</summary>
[TestFixture]
public class BindingsGenerationTests
{
    private const string InstallHint =
        "The bindings generator needs Debian's python3-clang-14: run `apt-get install -y python3-clang-14` " +
        "(or `dotnet run build.cs -- deps` as root). Set QWEN3NATIVE_PYTHON to use a Python other than /usr/bin/python3.";

    // bindgen.py's exit status for a missing libclang or Python binding.
    private const int MissingDependency = 3;

    [Test]
    public void RegeneratingGivesTheCommittedFileByteForByte()
    {
        string committed = RepositoryRoot.Combine("bindings", "NativeMethods.g.cs");
        byte[] generated = Generate();
        byte[] current = File.ReadAllBytes(committed);
        if (!generated.AsSpan().SequenceEqual(current))
        {
            Assert.Fail($"{committed} is not what the generator makes of native/include/qwen3native.h; " +
                        $"run `dotnet run build.cs -- bindings` and commit the result.\n{FirstDifference(current, generated)}");
        }
    }

    [Test]
    public void TwoRunsGiveIdenticalOutput()
    {
        Assert.That(Generate(), Is.EqualTo(Generate()));
    }

    private static byte[] Generate()
    {
        string output = Path.Combine(Path.GetTempPath(), $"NativeMethods.{Guid.NewGuid():N}.g.cs");
        try
        {
            var psi = new ProcessStartInfo(Python())
            {
                UseShellExecute = false,
                RedirectStandardOutput = true,
                RedirectStandardError = true,
                WorkingDirectory = RepositoryRoot.Path,
            };
            psi.ArgumentList.Add(RepositoryRoot.Combine("build", "bindgen", "bindgen.py"));
            psi.ArgumentList.Add("--output");
            psi.ArgumentList.Add(output);
            Process process;
            try
            {
                process = Process.Start(psi)!;
            }
            catch (System.ComponentModel.Win32Exception e)
            {
                Assert.Fail($"cannot start {psi.FileName}: {e.Message}. {InstallHint}");
                throw;
            }
            using (process)
            {
                var stderr = process.StandardError.ReadToEndAsync();
                process.StandardOutput.ReadToEnd();
                process.WaitForExit();
                if (process.ExitCode == MissingDependency)
                    Assert.Fail($"{InstallHint}\n{stderr.Result}");
                Assert.That(process.ExitCode, Is.Zero, $"bindgen failed:\n{stderr.Result}");
            }
            return File.ReadAllBytes(output);
        }
        finally
        {
            File.Delete(output);
        }
    }

    private static string Python()
    {
        string? chosen = Environment.GetEnvironmentVariable("QWEN3NATIVE_PYTHON");
        if (!string.IsNullOrEmpty(chosen)) return chosen;
        // Debian's interpreter, where python3-clang-14 installs; a pyenv or venv python3 earlier on PATH lacks it.
        return File.Exists("/usr/bin/python3") ? "/usr/bin/python3" : "python3";
    }

    private static string FirstDifference(byte[] committed, byte[] generated)
    {
        string[] a = System.Text.Encoding.UTF8.GetString(committed).Split('\n');
        string[] b = System.Text.Encoding.UTF8.GetString(generated).Split('\n');
        for (int i = 0; i < Math.Max(a.Length, b.Length); i++)
        {
            string left = i < a.Length ? a[i] : "<end of file>", right = i < b.Length ? b[i] : "<end of file>";
            if (left != right)
                return $"first difference at line {i + 1}:\n  committed: {left}\n  generated: {right}";
        }
        return "the files differ only in line endings or encoding";
    }
}
