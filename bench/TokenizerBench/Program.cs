// Encodes every text of the tokenizer gold corpus, single-threaded, for a fixed number of passes and
// prints MB/s (UTF-8 bytes of input per second) as one JSON line. The first pass warms the caches
// and the JIT and is not timed, as the Python side's first pass is not.
using System.Diagnostics;
using System.Text;
using System.Text.Json;
using Qwen3Native.Tokenization;

if (args.Length < 2)
{
    Console.Error.WriteLine("usage: TokenizerBench TOKENIZER_JSON GOLD_JSON [PASSES]");
    return 2;
}
var tokenizer = Qwen3Tokenizer.FromFile(args[0]);
using var gold = JsonDocument.Parse(File.ReadAllBytes(args[1]));
var texts = gold.RootElement.GetProperty("encode").EnumerateArray().Select(e => e.GetProperty("text").GetString()!).ToArray();
int passes = args.Length > 2 ? int.Parse(args[2]) : 20;
long bytes = texts.Sum(t => (long)Encoding.UTF8.GetByteCount(t));
long tokens = 0;
foreach (var t in texts) tokens += tokenizer.Encode(t).Length;  // warm-up pass
var sw = Stopwatch.StartNew();
for (int p = 0; p < passes; p++)
    foreach (var t in texts) tokens += tokenizer.Encode(t).Length;
sw.Stop();
double mbps = bytes * (double)passes / sw.Elapsed.TotalSeconds / 1e6;
// The same corpus as one document: per-call overheads out of the picture.
var document = string.Join("\n", texts);
long docBytes = Encoding.UTF8.GetByteCount(document);
tokens += tokenizer.Encode(document).Length;
var sw2 = Stopwatch.StartNew();
for (int p = 0; p < passes; p++) tokens += tokenizer.Encode(document).Length;
sw2.Stop();
double docMbps = docBytes * (double)passes / sw2.Elapsed.TotalSeconds / 1e6;
// Written by hand: reflection-based serialisation does not survive trimming of the published binary.
Console.WriteLine(FormattableString.Invariant(
    $"{{\"implementation\": \"Qwen3Native (C#)\", \"texts\": {texts.Length}, \"bytes_per_pass\": {bytes}, \"passes\": {passes}, \"seconds\": {sw.Elapsed.TotalSeconds}, \"mb_per_s\": {mbps}, \"document_mb_per_s\": {docMbps}}}"));
return 0;
