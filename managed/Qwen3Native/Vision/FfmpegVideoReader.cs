using System.ComponentModel;
using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace Qwen3Native.Vision;

/// <summary>What a video file's header says about its first video stream.</summary>
internal readonly record struct VideoFileInfo(int Width, int Height, double? Fps, int FrameCount);

/// <summary>
/// Reads video files through the <c>ffmpeg</c> and <c>ffprobe</c> programs: the frame rate and frame count, then the
/// chosen frames by index as raw RGB24. No codec runs in this process; the programs are found on PATH (or given as
/// paths) each time a reader is opened.
/// </summary>
internal sealed partial class FfmpegVideoReader
{
    private const int ToolOutputTail = 4000;
    private readonly string _ffmpeg;
    private readonly string? _ffprobe;
    private readonly bool _hasFpsMode;

    private FfmpegVideoReader(string ffmpeg, string? ffprobe, bool hasFpsMode)
    {
        _ffmpeg = ffmpeg;
        _ffprobe = ffprobe;
        _hasFpsMode = hasFpsMode;
    }

    /// <summary>Checks that ffmpeg runs (<c>ffmpeg -version</c>) and notes which options it knows.</summary>
    /// <exception cref="FfmpegNotFoundException">It cannot be started, or fails.</exception>
    public static FfmpegVideoReader Open(string ffmpeg, string? ffprobe, CancellationToken cancellationToken)
    {
        ToolResult version;
        try
        {
            version = RunTool(ffmpeg, ["-hide_banner", "-version"], cancellationToken);
        }
        catch (Win32Exception e)
        {
            throw new FfmpegNotFoundException(ffmpeg, e);
        }
        if (version.ExitCode != 0)
            throw new FfmpegNotFoundException(ffmpeg, new IOException($"'{ffmpeg} -version' exited with {version.ExitCode}: {version.Stderr}"));
        return new FfmpegVideoReader(ffmpeg, ffprobe, HasFpsMode(version.Stdout));
    }

    /// <summary>
    /// <c>-fps_mode</c> replaced <c>-vsync</c> in ffmpeg 5.1; later releases warn about or drop the old name, older
    /// ones lack the new. Development builds ("N-…", "git-…") are taken as recent.
    /// </summary>
    private static bool HasFpsMode(string versionText)
    {
        var m = VersionPattern().Match(versionText);
        if (!m.Success) return true;
        int major = int.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture);
        int minor = m.Groups[2].Success ? int.Parse(m.Groups[2].Value, CultureInfo.InvariantCulture) : 0;
        return major > 5 || (major == 5 && minor >= 1);
    }

    public VideoFileInfo Probe(string path, CancellationToken cancellationToken)
    {
        if (_ffprobe is not null)
        {
            ToolResult? probe = null;
            try
            {
                // -count_packets reads the container without decoding: an exact frame count even where the header has none.
                probe = RunTool(_ffprobe, ["-v", "error", "-select_streams", "v:0", "-count_packets", "-show_entries",
                    "stream=width,height,avg_frame_rate,r_frame_rate,nb_frames,nb_read_packets,duration:format=duration",
                    "-of", "json", path], cancellationToken);
            }
            catch (Win32Exception)
            {
                // No ffprobe: ffmpeg alone can answer, more slowly.
            }
            if (probe is { } p)
            {
                if (p.ExitCode != 0)
                    throw new VideoDecodeException(path, $"ffprobe could not read the video (exit code {p.ExitCode}).", p.Stderr);
                return ParseProbeJson(path, p.Stdout);
            }
        }
        return ProbeWithFfmpeg(path, cancellationToken);
    }

    internal static VideoFileInfo ParseProbeJson(string path, string json)
    {
        try
        {
            using var doc = JsonDocument.Parse(json);
            if (!doc.RootElement.TryGetProperty("streams", out var streams) || streams.GetArrayLength() == 0)
                throw new VideoDecodeException(path, "The file has no video stream.", json);
            var s = streams[0];
            int width = s.TryGetProperty("width", out var w) ? w.GetInt32() : 0;
            int height = s.TryGetProperty("height", out var h) ? h.GetInt32() : 0;
            double? fps = Rate(s, "avg_frame_rate") ?? Rate(s, "r_frame_rate");
            long frames = Count(s, "nb_read_packets") ?? Count(s, "nb_frames") ?? 0;
            if (frames <= 0)
            {
                double? duration = Seconds(s) ?? (doc.RootElement.TryGetProperty("format", out var f) ? Seconds(f) : null);
                if (duration is { } d && fps is { } r)
                    frames = (long)Math.Round(d * r);
            }
            if (frames <= 0)
                throw new VideoInputException($"The video '{path}' has no frames.", nameof(path));
            if (frames > int.MaxValue)
                throw new VideoSizeException(nameof(path), frames, width, height, $"The video '{path}' has {frames} frames, too many to index.");
            return new VideoFileInfo(width, height, fps, (int)frames);
        }
        catch (Exception e) when (e is JsonException or InvalidOperationException or FormatException or KeyNotFoundException)
        {
            throw new VideoDecodeException(path, "ffprobe's description of the video could not be read.", json, e);
        }

        static double? Rate(JsonElement s, string name)
        {
            if (!s.TryGetProperty(name, out var v) || v.ValueKind != JsonValueKind.String) return null;
            string text = v.GetString()!;
            int slash = text.IndexOf('/');
            double num, den = 1;
            if (slash < 0 ? !double.TryParse(text, NumberStyles.Float, CultureInfo.InvariantCulture, out num)
                : !double.TryParse(text.AsSpan(0, slash), NumberStyles.Float, CultureInfo.InvariantCulture, out num)
                  || !double.TryParse(text.AsSpan(slash + 1), NumberStyles.Float, CultureInfo.InvariantCulture, out den))
                return null;
            double rate = num / den; // "0/0" when the stream does not say
            return double.IsFinite(rate) && rate > 0 ? rate : null;
        }

        static long? Count(JsonElement s, string name) =>
            s.TryGetProperty(name, out var v) && v.ValueKind == JsonValueKind.String
            && long.TryParse(v.GetString(), NumberStyles.Integer, CultureInfo.InvariantCulture, out long n) && n > 0 ? n : null;

        static double? Seconds(JsonElement e) =>
            e.TryGetProperty("duration", out var v) && v.ValueKind == JsonValueKind.String
            && double.TryParse(v.GetString(), NumberStyles.Float, CultureInfo.InvariantCulture, out double d) && d > 0 ? d : null;
    }

    /// <summary>Without ffprobe: size and rate from ffmpeg's stream description, the frame count by copying the stream to nowhere.</summary>
    private VideoFileInfo ProbeWithFfmpeg(string path, CancellationToken cancellationToken)
    {
        var run = RunTool(_ffmpeg, ["-hide_banner", "-nostdin", "-i", path, "-map", "0:v:0", "-c", "copy", "-f", "null", "-"], cancellationToken);
        if (run.ExitCode != 0)
            throw new VideoDecodeException(path, $"ffmpeg could not read the video (exit code {run.ExitCode}).", run.Stderr);
        var stream = StreamPattern().Match(run.Stderr);
        if (!stream.Success)
            throw new VideoDecodeException(path, "The file has no video stream.", run.Stderr);
        int width = int.Parse(stream.Groups[1].Value, CultureInfo.InvariantCulture);
        int height = int.Parse(stream.Groups[2].Value, CultureInfo.InvariantCulture);
        var fpsMatch = FpsPattern().Match(run.Stderr, stream.Index);
        double? fps = fpsMatch.Success && double.TryParse(fpsMatch.Groups[1].Value, NumberStyles.Float, CultureInfo.InvariantCulture, out double r) && r > 0
            ? r : null;
        var counts = FramePattern().Matches(run.Stderr);
        int frames = counts.Count > 0 ? int.Parse(counts[^1].Groups[1].Value, CultureInfo.InvariantCulture) : 0;
        if (frames <= 0)
            throw new VideoInputException($"The video '{path}' has no frames.", nameof(path));
        return new VideoFileInfo(width, height, fps, frames);
    }

    /// <summary>
    /// The frames at <paramref name="indices"/> (ascending, distinct), decoded and converted to RGB24 by ffmpeg, one
    /// array per frame as they arrive.
    /// </summary>
    public IEnumerable<byte[]> ReadFrames(string path, int[] indices, int width, int height, CancellationToken cancellationToken)
    {
        // Frames chosen by their number in decoding order, which is what the processor's indices count; autorotation is
        // off because the Python decoders do not rotate either, and the size must match the probed one.
        string select = "select='" + string.Join('+', indices.Select(i => "eq(n," + i.ToString(CultureInfo.InvariantCulture) + ")")) + "'";
        var args = new List<string> { "-hide_banner", "-nostdin", "-v", "error", "-noautorotate", "-i", path, "-map", "0:v:0", "-vf", select };
        args.AddRange(_hasFpsMode ? ["-fps_mode", "passthrough"] : ["-vsync", "0"]);
        args.AddRange(["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]);

        using var process = Start(_ffmpeg, args);
        var stderr = new StringBuilder();
        var stderrDone = DrainAsync(process.StandardError, stderr);
        using var cancel = cancellationToken.Register(() => Kill(process));
        var stdout = process.StandardOutput.BaseStream;
        int frameBytes = checked(width * height * 3);
        int got = 0;
        try
        {
            for (; got < indices.Length; got++)
            {
                var frame = new byte[frameBytes];
                int filled = 0;
                while (filled < frameBytes)
                {
                    int n = stdout.Read(frame, filled, frameBytes - filled);
                    if (n == 0) break;
                    filled += n;
                }
                cancellationToken.ThrowIfCancellationRequested();
                if (filled < frameBytes)
                    break;
                yield return frame;
            }
        }
        finally
        {
            if (!process.HasExited && got < indices.Length)
                Kill(process); // the consumer stopped early or failed
        }
        process.WaitForExit();
        stderrDone.Wait(CancellationToken.None);
        cancellationToken.ThrowIfCancellationRequested();
        if (process.ExitCode != 0)
            throw new VideoDecodeException(path, $"ffmpeg could not decode the video (exit code {process.ExitCode}).", Tail(stderr));
        if (got < indices.Length)
            throw new VideoDecodeException(path,
                $"ffmpeg delivered {got} of the {indices.Length} frames asked for (frame numbers up to {indices[^1]}); " +
                "the file may be truncated or its frame count misreported.", Tail(stderr));
    }

    private readonly record struct ToolResult(int ExitCode, string Stdout, string Stderr);

    private static ToolResult RunTool(string program, IReadOnlyList<string> args, CancellationToken cancellationToken)
    {
        using var process = Start(program, args);
        var stdout = new StringBuilder();
        var stderr = new StringBuilder();
        var outDone = DrainAsync(process.StandardOutput, stdout, limit: int.MaxValue);
        var errDone = DrainAsync(process.StandardError, stderr);
        using (cancellationToken.Register(() => Kill(process)))
        {
            process.WaitForExit();
            Task.WaitAll(outDone, errDone);
        }
        cancellationToken.ThrowIfCancellationRequested();
        return new ToolResult(process.ExitCode, stdout.ToString(), Tail(stderr));
    }

    private static Process Start(string program, IEnumerable<string> args)
    {
        var psi = new ProcessStartInfo(program)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            RedirectStandardInput = false,
            UseShellExecute = false,
            CreateNoWindow = true,
        };
        foreach (var a in args) psi.ArgumentList.Add(a);
        return Process.Start(psi) ?? throw new Win32Exception($"'{program}' could not be started.");
    }

    /// <summary>Reads a stream to its end so the tool never blocks on a full pipe; keeps the last characters only.</summary>
    private static async Task DrainAsync(StreamReader reader, StringBuilder into, int limit = 4 * ToolOutputTail)
    {
        var buffer = new char[4096];
        int n;
        while ((n = await reader.ReadAsync(buffer).ConfigureAwait(false)) > 0)
        {
            lock (into)
            {
                into.Append(buffer, 0, n);
                if (into.Length > limit) into.Remove(0, into.Length - limit);
            }
        }
    }

    private static string Tail(StringBuilder sb)
    {
        lock (sb)
            return sb.Length <= ToolOutputTail ? sb.ToString() : sb.ToString(sb.Length - ToolOutputTail, ToolOutputTail);
    }

    private static void Kill(Process process)
    {
        try
        {
            if (!process.HasExited) process.Kill(entireProcessTree: true);
        }
        catch (InvalidOperationException)
        {
            // exited meanwhile
        }
    }

    [GeneratedRegex(@"version (?:n)?(\d+)(?:\.(\d+))?")]
    private static partial Regex VersionPattern();

    [GeneratedRegex(@"Stream #\d+:\d+[^\n]*?: Video: [^\n]*?, (\d{1,5})x(\d{1,5})")]
    private static partial Regex StreamPattern();

    [GeneratedRegex(@"([\d.]+) fps")]
    private static partial Regex FpsPattern();

    [GeneratedRegex(@"frame=\s*(\d+)")]
    private static partial Regex FramePattern();
}
