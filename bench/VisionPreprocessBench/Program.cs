// Qwen3-VL image preprocessing on one CPU thread: for each photo, the median time of decoding the
// JPEG (native libjpeg-turbo), of preprocessing the decoded pixels (smart resize to the default
// pixel budget, bicubic resampling, rescale and normalise, 2 x 16 x 16 patches), and of both, over
// a fixed number of runs after a warm-up. Prints a table and writes JSON (device, date, commit).
//   VisionPreprocessBench [DATA_DIR] [RUNS] [OUT_DIR]
using System.Diagnostics;
using System.Globalization;
using System.Text;
using Qwen3Native.Vision;

string dataDir = args.Length > 0 ? args[0] : "bench/data";
int runs = args.Length > 1 ? int.Parse(args[1], CultureInfo.InvariantCulture) : 15;
string outDir = args.Length > 2 ? args[2] : "bench/results";
var files = Directory.GetFiles(dataDir, "*.jpg").OrderBy(f => f, StringComparer.Ordinal).ToArray();
if (files.Length == 0)
{
    Console.Error.WriteLine($"no .jpg files in {dataDir}");
    return 2;
}

static double Median(List<double> v)
{
    v.Sort();
    return v[v.Count / 2];
}

var json = new StringBuilder();
json.Append("{\n  \"benchmark\": \"vision_preprocess\",\n");
json.Append(CultureInfo.InvariantCulture, $"  \"device\": \"{Shell("sh", "-c \"grep -m1 'model name' /proc/cpuinfo | cut -d: -f2\"").Trim()}\",\n");
json.Append(CultureInfo.InvariantCulture, $"  \"date\": \"{DateTime.UtcNow:yyyy-MM-ddTHH:mm:ssZ}\",\n");
json.Append(CultureInfo.InvariantCulture, $"  \"commit\": \"{Environment.GetEnvironmentVariable("Q3N_COMMIT") ?? Shell("git", "rev-parse --short HEAD").Trim()}\",\n");
json.Append(CultureInfo.InvariantCulture, $"  \"threads\": 1,\n  \"runs\": {runs},\n  \"images\": [");
Console.WriteLine($"{"image",-22} {"pixels",9} {"grid",10} {"decode ms",10} {"preproc ms",11} {"total ms",9} {"img/s",7} {"Mpx/s",7}");
for (int i = 0; i < files.Length; i++)
{
    byte[] bytes = File.ReadAllBytes(files[i]);
    var decode = new List<double>();
    var preprocess = new List<double>();
    PreprocessedImage? last = null;
    int width = 0, height = 0;
    for (int r = -2; r <= runs; r++)  // runs -2..0 warm the JIT (tiered up by then) and the caches
    {
        long t0 = Stopwatch.GetTimestamp();
        var image = Qwen3Image.FromBytes(bytes);
        long t1 = Stopwatch.GetTimestamp();
        last = Qwen3VLImageProcessor.Preprocess(image);
        long t2 = Stopwatch.GetTimestamp();
        width = image.Width;
        height = image.Height;
        if (r <= 0) continue;
        decode.Add(Stopwatch.GetElapsedTime(t0, t1).TotalMilliseconds);
        preprocess.Add(Stopwatch.GetElapsedTime(t1, t2).TotalMilliseconds);
    }
    double d = Median(decode), p = Median(preprocess), total = d + p;
    double megapixels = width * (double)height / 1e6;
    string name = Path.GetFileName(files[i]);
    string grid = $"{last!.Grid.T}x{last.Grid.H}x{last.Grid.W}";
    Console.WriteLine(FormattableString.Invariant(
        $"{name,-22} {width * height,9} {grid,10} {d,10:F2} {p,11:F2} {total,9:F2} {1000 / total,7:F1} {megapixels * 1000 / total,7:F1}"));
    json.Append(i == 0 ? "\n" : ",\n");
    json.Append(FormattableString.Invariant(
        $"    {{\"file\": \"{name}\", \"width\": {width}, \"height\": {height}, \"grid_thw\": [{last.Grid.T}, {last.Grid.H}, {last.Grid.W}], \"image_tokens\": {last.ImageTokenCount}, \"decode_ms\": {d}, \"preprocess_ms\": {p}, \"images_per_s\": {1000 / total}, \"megapixels_per_s\": {megapixels * 1000 / total}}}"));
}
json.Append("\n  ]\n}\n");
Directory.CreateDirectory(outDir);
string outPath = Path.Combine(outDir, "vision-preprocess.json");
File.WriteAllText(outPath, json.ToString());
Console.WriteLine($"wrote {outPath}");
return 0;

static string Shell(string program, string arguments)
{
    try
    {
        using var p = Process.Start(new ProcessStartInfo(program, arguments) { RedirectStandardOutput = true, RedirectStandardError = true })!;
        string output = p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        return p.ExitCode == 0 ? output : "unknown";
    }
    catch (System.ComponentModel.Win32Exception)
    {
        return "unknown";
    }
}
