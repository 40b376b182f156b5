// The console app that PackageTests builds against the Qwen3Native package from out/packages.
// Usage: App <model directory> <comma-separated prompt ids> <tokens to generate>
// Prints "tokens: a,b,c" and "library: <path>" (where the engine was loaded from) for the test to check.
using Qwen3Native;
using Qwen3Native.Generation;

if (args.Length != 3)
{
    Console.Error.WriteLine("usage: App <model directory> <prompt ids, comma-separated> <tokens to generate>");
    return 2;
}
int[] prompt = args[1].Split(',').Select(int.Parse).ToArray();
int maxTokens = int.Parse(args[2]);

// Two threads: the CI machine has two cores.
using var model = Qwen3Model.Load(args[0], new ModelOptions { Device = Qwen3Device.Cpu, Threads = 2 });
var result = await model.GenerateAsync(prompt, SamplingOptions.Greedy with { MaxTokens = maxTokens });
Console.WriteLine("tokens: " + string.Join(",", result.TokenIds));

// The loader's choice is internal to the package; the process's own mappings show which file it loaded, so the test can
// tell the package's copy from any other libqwen3native.so on the machine.
// A line is "address perms offset dev inode path"; only the path holds a '/'.
foreach (string path in File.ReadLines("/proc/self/maps")
             .Where(line => line.Contains('/') && line.EndsWith("/libqwen3native.so", StringComparison.Ordinal))
             .Select(line => line[line.IndexOf('/')..])
             .Distinct())
{
    Console.WriteLine("library: " + path);
}
return 0;
