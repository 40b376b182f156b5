using System.Diagnostics;
using Qwen3Native.Chat;
using Qwen3Native.Vision;

namespace Qwen3Native.Tests.Multimodal;

/// <summary>Video files through ffmpeg: the typed error without it, and a real clip where it is installed.</summary>
[NonParallelizable] // one test changes PATH for the whole process
public class FfmpegTests
{
    [Test]
    public void MissingFfmpegIsATypedErrorThatPointsToFrames()
    {
        string empty = Directory.CreateTempSubdirectory("q3n-nopath-").FullName;
        string? saved = Environment.GetEnvironmentVariable("PATH");
        try
        {
            Environment.SetEnvironmentVariable("PATH", empty);
            var ex = Assert.Throws<FfmpegNotFoundException>(() => VideoPart.FromFile("/nonexistent/clip.mp4").Preprocess());
            Assert.That(ex!.Program, Is.EqualTo("ffmpeg"));
            Assert.That(ex.Message, Does.Contain("ffmpeg"));
            Assert.That(ex.Message, Does.Contain("VideoPart.FromFrames"));
            // Bytes take the same path through a temporary file, which is removed again.
            int before = Directory.GetFiles(Path.GetTempPath(), "qwen3native-video-*").Length;
            Assert.Throws<FfmpegNotFoundException>(() => VideoPart.FromBytes(new byte[] { 1, 2, 3 }).Preprocess());
            Assert.That(Directory.GetFiles(Path.GetTempPath(), "qwen3native-video-*"), Has.Length.EqualTo(before));
        }
        finally
        {
            Environment.SetEnvironmentVariable("PATH", saved);
            Directory.Delete(empty);
        }
    }

    [Test]
    public void ExplicitFfmpegPathThatDoesNotExist()
    {
        var options = new Qwen3VLVideoProcessorOptions { FfmpegPath = "/nonexistent/bin/ffmpeg" };
        var ex = Assert.Throws<FfmpegNotFoundException>(() => Qwen3VLVideoProcessor.PreprocessFile("/nonexistent/clip.mp4", options));
        Assert.That(ex!.Program, Is.EqualTo("/nonexistent/bin/ffmpeg"));
    }

    [Test]
    public void ProbeJsonGivesRateAndExactFrameCount()
    {
        const string json = "{\"streams\": [{\"width\": 160, \"height\": 120, \"r_frame_rate\": \"30/1\", \"avg_frame_rate\": \"30000/1001\"," +
                            " \"nb_frames\": \"299\", \"nb_read_packets\": \"300\"}], \"format\": {\"duration\": \"10.01\"}}";
        var info = FfmpegVideoReader.ParseProbeJson("x.mp4", json);
        Assert.That((info.Width, info.Height, info.FrameCount), Is.EqualTo((160, 120, 300)));
        Assert.That(info.Fps, Is.EqualTo(30000 / 1001.0));
        // No counts and no rate in the header: frames from duration · rate cannot be known.
        Assert.Throws<VideoInputException>(() => FfmpegVideoReader.ParseProbeJson("x.mp4",
            "{\"streams\": [{\"width\": 16, \"height\": 16, \"avg_frame_rate\": \"0/0\"}]}"));
        Assert.Throws<VideoDecodeException>(() => FfmpegVideoReader.ParseProbeJson("x.mp4", "{\"streams\": []}"));
    }

    [Test]
    public void RealTinyVideoFromTestsrc()
    {
        if (!CanRun("ffmpeg"))
            Assert.Ignore("ffmpeg is not on PATH on this machine: the real-video test needs it to make and decode a clip " +
                          "(the other video tests pass frames directly).");
        string dir = Directory.CreateTempSubdirectory("q3n-video-").FullName;
        try
        {
            // 3 s of 160x120 at 10 fps = 30 frames; sampled at 2 fps: int(30/10·2) = 6 frames,
            // round(linspace(0, 29, 6)) = 0, 5.8, 11.6, 17.4, 23.2, 29 → 0, 6, 12, 17, 23, 29.
            string clip = Path.Combine(dir, "clip.mp4");
            var make = Process.Start(new ProcessStartInfo("ffmpeg", ["-hide_banner", "-v", "error", "-f", "lavfi", "-i",
                "testsrc=duration=3:size=160x120:rate=10", "-pix_fmt", "yuv420p", clip]))!;
            make.WaitForExit();
            Assert.That(make.ExitCode, Is.EqualTo(0), "ffmpeg could not make the test clip");

            var video = VideoPart.FromFile(clip).Preprocess();
            Assert.That(video.FrameTimestamps, Is.EqualTo(new[] { 0.0, 0.6, 1.2, 1.7, 2.3, 2.9 }).Within(1e-9));
            // 6 frames of 120x160: 6·128·160 = 122880 in budget → 128x160 (120/32 = 3.75 → 4); grid (3, 8, 10), 20 tokens a slice.
            Assert.That(video.ResizedSize, Is.EqualTo(new ImageSize(128, 160)));
            Assert.That(video.Grid, Is.EqualTo(new GridThw(3, 8, 10)));
            Assert.That(video.PixelValues, Has.Length.EqualTo(3 * 80 * 1536));
            Assert.That(video.SliceTimestamps.Select(VideoTimestamps.Format),
                Is.EqualTo(new[] { "<0.3 seconds>", "<1.4 seconds>", "<2.6 seconds>" }));
            Assert.That(video.PixelValues.All(float.IsFinite) && video.PixelValues.Any(v => v != video.PixelValues[0]), Is.True);

            // Without ffprobe, ffmpeg alone finds the rate and the frame count: the same result.
            var noProbe = Qwen3VLVideoProcessor.PreprocessFile(clip, new Qwen3VLVideoProcessorOptions { FfprobePath = "/nonexistent/ffprobe" });
            Assert.That(noProbe.FrameTimestamps, Is.EqualTo(video.FrameTimestamps));
            Assert.That(noProbe.PixelValues, Is.EqualTo(video.PixelValues));

            // The same file through bytes, and fewer frames asked for.
            var fromBytes = VideoPart.FromBytes(File.ReadAllBytes(clip), sampleFps: 1).Preprocess();
            Assert.That(fromBytes.FrameTimestamps, Has.Count.EqualTo(4)); // int(30/10·1) = 3 → min_frames 4

            File.WriteAllBytes(Path.Combine(dir, "junk.mp4"), new byte[] { 1, 2, 3, 4, 5 });
            Assert.Throws<VideoDecodeException>(() => VideoPart.FromFile(Path.Combine(dir, "junk.mp4")).Preprocess());
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    private static bool CanRun(string program)
    {
        try
        {
            using var p = Process.Start(new ProcessStartInfo(program, ["-version"]) { RedirectStandardOutput = true, RedirectStandardError = true })!;
            p.StandardOutput.ReadToEnd();
            p.WaitForExit();
            return p.ExitCode == 0;
        }
        catch (System.ComponentModel.Win32Exception)
        {
            return false;
        }
    }
}
