using System.Buffers.Binary;
using System.IO.Compression;
using System.Text;
using Qwen3Native.Tests.Interop;
using Qwen3Native.Vision;

namespace Qwen3Native.Tests.Vision;

/// <summary>
/// <see cref="Qwen3Image"/> and <see cref="Qwen3VLImageProcessor.PreprocessFile"/> over the engine's decoders. JPEG
/// references are djpeg's pixels (tests/fixtures/images/make_images.sh); PNGs are written here (stored deflate, so the
/// expected pixels are the ones written); every bad input gets its typed exception.
/// </summary>
public sealed class ImageDecodeTests
{
    private static string Fixture(string name) => RepositoryRoot.Combine("tests", "fixtures", "images", name);

    /// <summary>A binary PPM/PGM as djpeg writes it, as RGB.</summary>
    private static (byte[] Rgb, int Width, int Height) ReadPnm(string path)
    {
        byte[] b = File.ReadAllBytes(path);
        var fields = new List<string>();
        int pos = 0;
        while (fields.Count < 4)
        {
            while (char.IsWhiteSpace((char)b[pos])) pos++;
            int start = pos;
            while (!char.IsWhiteSpace((char)b[pos])) pos++;
            fields.Add(Encoding.ASCII.GetString(b, start, pos - start));
        }
        pos++;
        int w = int.Parse(fields[1]), h = int.Parse(fields[2]);
        bool gray = fields[0] == "P5";
        var rgb = new byte[w * h * 3];
        for (int i = 0; i < w * h; i++)
            for (int c = 0; c < 3; c++)
                rgb[i * 3 + c] = b[pos + (gray ? i : i * 3 + c)];
        return (rgb, w, h);
    }

    private static uint Crc32(ReadOnlySpan<byte> data)
    {
        uint crc = 0xFFFFFFFF;
        foreach (byte v in data)
        {
            crc ^= v;
            for (int k = 0; k < 8; k++) crc = (crc & 1) != 0 ? 0xEDB88320 ^ (crc >> 1) : crc >> 1;
        }
        return ~crc;
    }

    private static void Chunk(MemoryStream png, string type, ReadOnlySpan<byte> data)
    {
        Span<byte> u32 = stackalloc byte[4];
        BinaryPrimitives.WriteUInt32BigEndian(u32, (uint)data.Length);
        png.Write(u32);
        var typeAndData = new byte[4 + data.Length];
        Encoding.ASCII.GetBytes(type, typeAndData);
        data.CopyTo(typeAndData.AsSpan(4));
        png.Write(typeAndData);
        BinaryPrimitives.WriteUInt32BigEndian(u32, Crc32(typeAndData));
        png.Write(u32);
    }

    /// <summary>An 8-bit RGB (colour type 2) or RGBA (6) PNG; <paramref name="declared"/> overrides the IHDR size.</summary>
    private static byte[] Png(byte[] samples, int width, int height, int channels = 3, (uint W, uint H)? declared = null)
    {
        var png = new MemoryStream();
        png.Write([0x89, (byte)'P', (byte)'N', (byte)'G', 0x0D, 0x0A, 0x1A, 0x0A]);
        var ihdr = new byte[13];
        BinaryPrimitives.WriteUInt32BigEndian(ihdr, declared?.W ?? (uint)width);
        BinaryPrimitives.WriteUInt32BigEndian(ihdr.AsSpan(4), declared?.H ?? (uint)height);
        ihdr[8] = 8;
        ihdr[9] = (byte)(channels == 4 ? 6 : 2);
        Chunk(png, "IHDR", ihdr);
        var raw = new MemoryStream();
        for (int y = 0; y < height; y++)
        {
            raw.WriteByte(0); // filter: none
            raw.Write(samples, y * width * channels, width * channels);
        }
        var z = new MemoryStream();
        using (var deflate = new ZLibStream(z, CompressionLevel.Optimal, leaveOpen: true))
            deflate.Write(raw.ToArray());
        Chunk(png, "IDAT", z.ToArray());
        Chunk(png, "IEND", []);
        return png.ToArray();
    }

    private static byte[] Noise(int n, int seed)
    {
        var b = new byte[n];
        new Random(seed).NextBytes(b);
        return b;
    }

    /// <summary>The JPEG with an APP1 EXIF segment (big-endian TIFF, one Orientation entry) right after SOI.</summary>
    private static byte[] WithOrientation(byte[] jpeg, ushort orientation)
    {
        byte[] payload =
        [
            (byte)'E', (byte)'x', (byte)'i', (byte)'f', 0, 0,
            (byte)'M', (byte)'M', 0, 42, 0, 0, 0, 8,
            0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, (byte)(orientation >> 8), (byte)orientation, 0, 0,
            0, 0, 0, 0,
        ];
        var segment = new byte[4 + payload.Length];
        segment[0] = 0xFF;
        segment[1] = 0xE1;
        BinaryPrimitives.WriteUInt16BigEndian(segment.AsSpan(2), (ushort)(payload.Length + 2));
        payload.CopyTo(segment, 4);
        return [.. jpeg.AsSpan(0, 2), .. segment, .. jpeg.AsSpan(2)];
    }

    [TestCase("photo_420.jpg", "photo_420.djpeg.ppm")]
    [TestCase("photo_422_progressive.jpg", "photo_422_progressive.djpeg.ppm")]
    [TestCase("photo_gray.jpg", "photo_gray.djpeg.pgm")]
    public void JpegFileMatchesDjpeg(string jpeg, string reference)
    {
        var (rgb, w, h) = ReadPnm(Fixture(reference));
        var image = Qwen3Image.FromFile(Fixture(jpeg));
        Assert.That(image.Format, Is.EqualTo(Qwen3ImageFormat.Jpeg));
        Assert.That((image.Width, image.Height), Is.EqualTo((w, h)));
        Assert.That(image.Rgb.ToArray(), Is.EqualTo(rgb));
    }

    [Test]
    public void FileToPixelValuesInOneCallEqualsTheDjpegPixelsPreprocessed()
    {
        var (rgb, w, h) = ReadPnm(Fixture("photo_420.djpeg.ppm"));
        var expected = Qwen3VLImageProcessor.Preprocess(rgb, w, h);
        var got = Qwen3VLImageProcessor.PreprocessFile(Fixture("photo_420.jpg"));
        Assert.That(got.Grid, Is.EqualTo(expected.Grid));
        Assert.That(got.PixelValues, Is.EqualTo(expected.PixelValues));
        Assert.That(Qwen3Image.FromFile(Fixture("photo_420.jpg")).Preprocess().PixelValues, Is.EqualTo(expected.PixelValues));
    }

    [Test]
    public void ExifOrientationSixRotatesTheDjpegPixelsClockwise()
    {
        var (rgb, w, h) = ReadPnm(Fixture("photo_420.djpeg.ppm"));
        byte[] jpeg = WithOrientation(File.ReadAllBytes(Fixture("photo_420.jpg")), 6);
        var image = Qwen3Image.FromBytes(jpeg);
        Assert.That(image.ExifOrientation, Is.EqualTo(6));
        Assert.That((image.Width, image.Height), Is.EqualTo((h, w)));
        var got = image.Rgb.Span;
        // Output (x, y) shows stored (y, h - 1 - x): the stored bottom-left corner is now the top-left.
        for (int y = 0; y < w; y++)
            for (int x = 0; x < h; x++)
                for (int c = 0; c < 3; c++)
                    if (got[(y * h + x) * 3 + c] != rgb[((h - 1 - x) * w + y) * 3 + c])
                        Assert.Fail($"pixel ({x}, {y}) channel {c}");

        var stored = Qwen3Image.FromBytes(jpeg, new Qwen3ImageDecodeOptions { ApplyExifOrientation = false });
        Assert.That(stored.Rgb.ToArray(), Is.EqualTo(rgb));
    }

    [Test]
    public void PngRoundTripsAndAlphaIsDroppedNotComposited()
    {
        byte[] rgb = Noise(7 * 5 * 3, 1);
        Assert.That(Qwen3Image.FromBytes(Png(rgb, 7, 5)).Rgb.ToArray(), Is.EqualTo(rgb));
        // As transformers 5.17's processor (PIL convert("RGB")): the colour under a transparent pixel stays.
        var image = Qwen3Image.FromBytes(Png([10, 20, 30, 0, 200, 100, 50, 255], 2, 1, channels: 4));
        Assert.That(image.Rgb.ToArray(), Is.EqualTo(new byte[] { 10, 20, 30, 200, 100, 50 }));
    }

    [Test]
    public void StreamsAndFilesGiveTheSameImage()
    {
        byte[] png = Png(Noise(4 * 4 * 3, 2), 4, 4);
        var fromBytes = Qwen3Image.FromBytes(png);
        using var nonSeekable = new NonSeekableStream(png);
        Assert.That(Qwen3Image.FromStream(nonSeekable).Rgb.ToArray(), Is.EqualTo(fromBytes.Rgb.ToArray()));
        string path = Path.Combine(Path.GetTempPath(), $"q3n-image-{Guid.NewGuid():N}.jpg"); // the name says JPEG; the bytes win
        try
        {
            File.WriteAllBytes(path, png);
            var fromFile = Qwen3Image.FromFile(path);
            Assert.That(fromFile.Format, Is.EqualTo(Qwen3ImageFormat.Png));
            Assert.That(fromFile.Rgb.ToArray(), Is.EqualTo(fromBytes.Rgb.ToArray()));
        }
        finally
        {
            File.Delete(path);
        }
        Assert.Throws<ImageDecodeException>(() => Qwen3Image.FromStream(new MemoryStream(png), new Qwen3ImageDecodeOptions { MaxEncodedBytes = 10 }));
    }

    [Test]
    public void DecompressionBombIsAnImageSizeExceptionFromTheHeader()
    {
        byte[] bomb = Png(Noise(4 * 4 * 3, 3), 4, 4, declared: (100_000, 100_000));
        var e = Assert.Throws<ImageSizeException>(() => Qwen3Image.FromBytes(bomb))!;
        Assert.That((e.Width, e.Height), Is.EqualTo((100_000L, 100_000L)));
        string path = Path.Combine(Path.GetTempPath(), $"q3n-bomb-{Guid.NewGuid():N}.png");
        try
        {
            File.WriteAllBytes(path, bomb);
            Assert.Throws<ImageSizeException>(() => Qwen3VLImageProcessor.PreprocessFile(path));
        }
        finally
        {
            File.Delete(path);
        }
        // A caller's own limit, inclusive.
        byte[] small = Png(Noise(5 * 3 * 3, 4), 5, 3);
        Assert.That(Qwen3Image.FromBytes(small, new Qwen3ImageDecodeOptions { MaxPixels = 15 }).Width, Is.EqualTo(5));
        Assert.Throws<ImageSizeException>(() => Qwen3Image.FromBytes(small, new Qwen3ImageDecodeOptions { MaxPixels = 14 }));
    }

    [Test]
    public void OneByOneDecodesAndPreprocesses()
    {
        var image = Qwen3Image.FromBytes(Png([9, 8, 7], 1, 1));
        Assert.That(image.Rgb.ToArray(), Is.EqualTo(new byte[] { 9, 8, 7 }));
        var pre = image.Preprocess();
        Assert.That(pre.ResizedSize, Is.EqualTo(new ImageSize(256, 256))); // scaled up to min_pixels
    }

    [Test]
    public void VeryWideImageDecodesButTheProcessorRefusesItsAspectRatio()
    {
        var image = Qwen3Image.FromBytes(Png(Noise(20000 * 3, 5), 20000, 1));
        Assert.That((image.Width, image.Height), Is.EqualTo((20000, 1)));
        var e = Assert.Throws<ImageSizeException>(() => image.Preprocess())!;
        Assert.That(e.Message, Does.Contain("aspect ratio"));
    }

    [Test]
    public void BadBytesGiveTypedErrorsAndTheNextImageStillDecodes()
    {
        byte[] jpeg = File.ReadAllBytes(Fixture("photo_420.jpg"));
        var truncated = Assert.Throws<ImageDecodeException>(() => Qwen3Image.FromBytes(jpeg.AsSpan(0, jpeg.Length / 2)))!;
        Assert.That(truncated.Status, Is.EqualTo(Qwen3Status.InvalidArgument));
        Assert.That(truncated.Message, Does.Contain("truncated"));

        byte[] png = Png(Noise(8 * 8 * 3, 6), 8, 8);
        Assert.That(Assert.Throws<ImageDecodeException>(() => Qwen3Image.FromBytes(png.AsSpan(0, png.Length - 20)))!.Status,
            Is.EqualTo(Qwen3Status.InvalidArgument));

        var empty = Assert.Throws<ImageDecodeException>(() => Qwen3Image.FromBytes([]))!;
        Assert.That(empty.Status, Is.EqualTo(Qwen3Status.InvalidArgument));
        Assert.That(empty.Message, Does.Contain("empty"));

        var random = Assert.Throws<ImageDecodeException>(() => Qwen3Image.FromBytes(Noise(1000, 7)))!;
        Assert.That(random.Status, Is.EqualTo(Qwen3Status.Unsupported));

        var gif = Assert.Throws<ImageDecodeException>(() => Qwen3Image.FromBytes("GIF89a\x01\0\x01\0"u8))!;
        Assert.That(gif.Status, Is.EqualTo(Qwen3Status.Unsupported));
        Assert.That(gif.Message, Does.Contain("GIF"));

        byte[] wrongMagic = (byte[])png.Clone();
        wrongMagic[1] = (byte)'X';
        Assert.Throws<ImageDecodeException>(() => Qwen3Image.FromBytes(wrongMagic));

        Assert.Throws<FileNotFoundException>(() => Qwen3Image.FromFile(Fixture("no-such-image.png")));
        Assert.That(Qwen3Image.FromBytes(png).Width, Is.EqualTo(8));
    }

    [Test]
    public void FromRgbChecksItsArguments()
    {
        var image = Qwen3Image.FromRgb(new byte[] { 1, 2, 3, 4, 5, 6 }, 2, 1);
        Assert.That(image.Format, Is.EqualTo(Qwen3ImageFormat.RawRgb));
        Assert.That(image.Rgb.ToArray(), Is.EqualTo(new byte[] { 1, 2, 3, 4, 5, 6 }));
        Assert.Throws<ArgumentException>(() => Qwen3Image.FromRgb(new byte[5], 2, 1));
        Assert.Throws<ImageSizeException>(() => Qwen3Image.FromRgb([], 0, 1));
    }

    private sealed class NonSeekableStream(byte[] data) : Stream
    {
        private readonly MemoryStream _inner = new(data);
        public override bool CanRead => true;
        public override bool CanSeek => false;
        public override bool CanWrite => false;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
        public override int Read(byte[] buffer, int offset, int count) => _inner.Read(buffer, offset, Math.Min(count, 3));
        public override void Flush() { }
        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
    }
}
