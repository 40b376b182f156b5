// The build entry point: `dotnet run build.cs -- <target> [options]` (a .NET 10 file-based app).
//
// Targets
//   deps     install the Debian packages the native build needs (when run as root), else say which
//   native   configure and build the C++ engine with CMake (out/build); CUDA when nvcc is found
//   bindings regenerate bindings/NativeMethods.g.cs from native/include/qwen3native.h (build/bindgen, libclang)
//   build    native + the .NET projects
//   test     build, then run the C++ suites and the .NET suites; prints "N passed, N failed"
//   demo     build, then chat with the embedded default model through the qwen3 CLI
//   bench    build, then run the CPU decode benchmark on shared/configs/Qwen3-0.6B.json (dummy weights)
//   pack     build, then pack the Qwen3Native NuGet package (with the native library) into out/packages
// Options
//   --config Debug|Release   (default Release)
//   --cuda AUTO|ON|OFF       (default AUTO)
using System.Diagnostics;
using System.Text.RegularExpressions;
using System.Xml.Linq;

var root = Path.GetDirectoryName(Path.GetFullPath(AppContext.GetData("EntryPointFilePath") as string ?? "build.cs"))!;
Directory.SetCurrentDirectory(root);
var argsList = args.ToList();
string Option(string name, string fallback)
{
    var i = argsList.IndexOf(name);
    return i >= 0 && i + 1 < argsList.Count ? argsList[i + 1] : fallback;
}
var target = argsList.FirstOrDefault(a => !a.StartsWith("--")) ?? "help";
var buildType = Option("--config", "Release");
var cuda = Option("--cuda", "AUTO");
var buildDir = Path.Combine(root, "out", "build");
var jobs = Environment.ProcessorCount.ToString();

try
{
    switch (target)
    {
        case "deps": Deps(); break;
        case "native": Deps(); Native(); break;
        case "bindings": Deps(); Bindings(); break;
        case "build": Deps(); Native(); Run("dotnet", "build Qwen3Native.sln -c " + buildType); break;
        case "test": Deps(); Native(); return Test();
        case "demo": Deps(); Native(); Demo(); break;
        case "bench": Deps(); Native(); Bench(); break;
        case "pack": Deps(); Native(); Run("bash", "build/pack.sh"); break;
        default:
            Console.WriteLine("usage: dotnet run build.cs -- <deps|native|bindings|build|test|demo|bench|pack> [--config Release|Debug] [--cuda AUTO|ON|OFF]");
            return target == "help" ? 0 : 2;
    }
    return 0;
}
catch (BuildFailure e)
{
    Console.Error.WriteLine($"build.cs: {e.Message}");
    return 1;
}

void Deps()
{
    // What the native build needs, as (probe, Debian package).
    var needs = new (Func<bool> present, string package)[]
    {
        (() => OnPath("cmake"), "cmake"),
        (() => OnPath("g++"), "g++"),
        (() => File.Exists("/usr/include/nlohmann/json.hpp"), "nlohmann-json3-dev"),
        (() => File.Exists("/usr/include/gtest/gtest.h"), "libgtest-dev"),
        // build/bindgen and the managed test that checks bindings/NativeMethods.g.cs is current.
        (() => File.Exists("/usr/lib/python3/dist-packages/clang/cindex.py"), "python3-clang-14"),
        // Image decoding (native/src/image) and pkg-config, through which CMake finds libwebp.
        (() => File.Exists("/usr/include/jpeglib.h"), "libjpeg62-turbo-dev"),
        (() => File.Exists("/usr/include/png.h"), "libpng-dev"),
        (() => File.Exists("/usr/include/webp/decode.h"), "libwebp-dev"),
        (() => OnPath("pkg-config"), "pkg-config"),
    };
    var missing = needs.Where(n => !n.present()).Select(n => n.package).ToList();
    if (missing.Count == 0) return;
    if (Environment.UserName == "root" && OnPath("apt-get"))
    {
        Console.WriteLine($"installing: {string.Join(' ', missing)}");
        Run("apt-get", "update -qq");
        Run("apt-get", "install -y -qq --no-install-recommends " + string.Join(' ', missing));
        return;
    }
    throw new BuildFailure($"missing packages: {string.Join(' ', missing)} (install them with apt-get as root)");
}

void Native()
{
    Run("cmake", $"-S . -B {Quote(buildDir)} -DCMAKE_BUILD_TYPE={buildType} -DQWEN3_CUDA={cuda} -DQWEN3_IMAGES=ON");
    Run("cmake", $"--build {Quote(buildDir)} -j {jobs}");
}

void Bindings()
{
    // Debian's interpreter: python3-clang-14 installs there, not into a pyenv or venv python3 on PATH.
    var python = File.Exists("/usr/bin/python3") ? "/usr/bin/python3" : "python3";
    Run(python, "build/bindgen/bindgen.py");
}

int Test()
{
    var results = Path.Combine(root, "out", "test-results");
    if (Directory.Exists(results)) Directory.Delete(results, true);
    Directory.CreateDirectory(results);

    int passed = 0, failed = 0;

    // C++: one GoogleTest binary (also registered with CTest for IDEs).
    var nativeXml = Path.Combine(results, "native.xml");
    var nativeExit = Run(Path.Combine(buildDir, "q3n_tests"), $"--gtest_output=xml:{Quote(nativeXml)}", check: false);
    if (File.Exists(nativeXml))
    {
        var suites = XDocument.Load(nativeXml).Root!;
        int total = (int)suites.Attribute("tests")!, fails = (int)suites.Attribute("failures")! + (int)suites.Attribute("errors")!;
        int disabled = (int?)suites.Attribute("disabled") ?? 0, skipped = suites.Descendants("skipped").Count();
        passed += total - fails - disabled - skipped;
        failed += fails;
        Console.WriteLine($"native: {total - fails - disabled - skipped} passed, {fails} failed, {skipped + disabled} skipped");
    }
    else
    {
        Console.WriteLine($"native: the test binary exited with {nativeExit} and wrote no results");
        failed += 1;
    }
    if (nativeExit != 0 && failed == 0) failed += 1;

    // .NET: NUnit through dotnet test, read back from each suite's TRX report. The package suite
    // packs the library and restores it into a fresh console app.
    foreach (var (name, project) in new[] { ("managed", "tests/managed/Qwen3Native.Tests"), ("package", "tests/managed/Qwen3Native.PackageTests") })
    {
        var trx = Path.Combine(results, name + ".trx");
        var exit = Run("dotnet", $"test {project} -c {buildType} --logger \"trx;LogFileName={trx}\" --results-directory {Quote(results)}", check: false);
        if (File.Exists(trx))
        {
            XNamespace ns = "http://microsoft.com/schemas/VisualStudio/TeamTest/2010";
            var counters = XDocument.Load(trx).Descendants(ns + "Counters").First();
            int p = (int)counters.Attribute("passed")!, f = (int)counters.Attribute("failed")! + (int)counters.Attribute("error")! + (int)counters.Attribute("timeout")! + (int)counters.Attribute("aborted")!;
            passed += p;
            failed += f;
            Console.WriteLine($"{name}: {p} passed, {f} failed");
            if (exit != 0 && f == 0) failed += 1;
        }
        else
        {
            Console.WriteLine($"{name}: dotnet test exited with {exit} and wrote no results");
            failed += 1;
        }
    }

    Console.WriteLine($"{passed} passed, {failed} failed");
    return failed == 0 ? 0 : 1;
}

void Demo()
{
    // The embedded default model: a tiny Qwen3 checkpoint in the official layout with the real
    // tokenizer and chat template (tests/fixtures/qwen3/real_vocab_tiny, random weights: the answer
    // is word salad, but every stage a real checkpoint goes through runs).
    Run("dotnet", $"run --project managed/Qwen3Native.Cli -c {buildType} -- generate --model tests/fixtures/qwen3/real_vocab_tiny " +
        "--chat --no-think --prompt \"What is the capital of France?\" --max-tokens 24 --seed 42 --stats");
}

void Bench()
{
    var config = Path.Combine(root, "..", "shared", "configs", "Qwen3-0.6B.json");
    if (!File.Exists(config)) throw new BuildFailure($"{config} not found: the benchmarks read the model configs in shared/configs beside the checkout");
    Run(Path.Combine(buildDir, "bench_cpu_decode"), $"--config {Quote(config)} --prompt 128 --tokens 32");
}

int Run(string file, string arguments, bool check = true)
{
    Console.WriteLine($"> {file} {arguments}");
    var psi = new ProcessStartInfo(file, arguments) { UseShellExecute = false };
    using var p = Process.Start(psi) ?? throw new BuildFailure($"cannot start {file}");
    p.WaitForExit();
    if (check && p.ExitCode != 0) throw new BuildFailure($"{file} exited with {p.ExitCode}");
    return p.ExitCode;
}

static bool OnPath(string name) =>
    (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':').Any(d => File.Exists(Path.Combine(d, name)));

static string Quote(string s) => Regex.IsMatch(s, @"[\s""]") ? "\"" + s.Replace("\"", "\\\"") + "\"" : s;

sealed class BuildFailure(string message) : Exception(message);
