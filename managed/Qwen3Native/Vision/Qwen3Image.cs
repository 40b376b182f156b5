using Qwen3Native.Interop;

namespace Qwen3Native.Vision;

/// <summary>Where a <see cref="Qwen3Image"/>'s pixels came from.</summary>
public enum Qwen3ImageFormat
{
    /// <summary>Raw RGB8 pixels given to <see cref="Qwen3Image.FromRgb"/>.</summary>
    RawRgb = 0,
    Jpeg = 1,
    Png = 2,
    WebP = 3,
}

/// <summary>Settings for decoding an encoded image into a <see cref="Qwen3Image"/>.</summary>
public sealed record Qwen3ImageDecodeOptions
{
    /// <summary>
    /// Largest width × height accepted. Checked against the file's header before any pixel is decoded or allocated,
    /// so a small file that claims a huge image (a decompression bomb) costs nothing.
    /// </summary>
    public long MaxPixels { get; init; } = Qwen3VLImageDefaults.MaxInputPixels;

    /// <summary>Largest encoded size read from a file or stream, in bytes.</summary>
    public long MaxEncodedBytes { get; init; } = 512L * 1024 * 1024;

    /// <summary>
    /// Turn JPEG and PNG images upright as their EXIF Orientation says, as transformers' <c>load_image</c> does (it
    /// calls PIL's <c>ImageOps.exif_transpose</c>).
    /// </summary>
    public bool ApplyExifOrientation { get; init; } = true;

    public static Qwen3ImageDecodeOptions Default { get; } = new();
}

/// <summary>
/// A still image as 8-bit RGB pixels, decoded by the engine (libjpeg-turbo, libpng, libwebp; the format is recognised
/// from the data, never from a file name) or wrapped from raw pixels. Conversions follow PIL's
/// <c>Image.convert("RGB")</c>, which the transformers Qwen3-VL processor uses: alpha is dropped without compositing,
/// 16-bit samples keep their high byte, palette and grayscale images are expanded, CMYK JPEGs are converted.
/// </summary>
public sealed class Qwen3Image
{
    private readonly byte[] _rgb;

    private Qwen3Image(byte[] rgb, int width, int height, Qwen3ImageFormat format, int exifOrientation)
    {
        _rgb = rgb;
        Width = width;
        Height = height;
        Format = format;
        ExifOrientation = exifOrientation;
    }

    public int Width { get; }
    public int Height { get; }

    /// <summary>Interleaved R, G, B bytes, row-major, no padding: Width · Height · 3 bytes.</summary>
    public ReadOnlyMemory<byte> Rgb => _rgb;

    public Qwen3ImageFormat Format { get; }

    /// <summary>The file's EXIF Orientation (1..8; 1 when it has none), whether or not it was applied.</summary>
    public int ExifOrientation { get; }

    /// <summary>Decodes a JPEG, PNG or WebP file.</summary>
    /// <exception cref="FileNotFoundException">The file does not exist.</exception>
    /// <exception cref="ImageDecodeException">Empty, corrupt, truncated, too long, or not a supported format.</exception>
    /// <exception cref="ImageSizeException">More than <see cref="Qwen3ImageDecodeOptions.MaxPixels"/> pixels.</exception>
    public static Qwen3Image FromFile(string path, Qwen3ImageDecodeOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(path);
        options ??= Qwen3ImageDecodeOptions.Default;
        using var stream = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1, FileOptions.SequentialScan);
        return FromStream(stream, options);
    }

    /// <summary>Reads the stream to its end (at most <see cref="Qwen3ImageDecodeOptions.MaxEncodedBytes"/>) and decodes it.</summary>
    /// <inheritdoc cref="FromFile" path="/exception"/>
    public static Qwen3Image FromStream(Stream stream, Qwen3ImageDecodeOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(stream);
        options ??= Qwen3ImageDecodeOptions.Default;
        if (stream.CanSeek && stream.Length - stream.Position > options.MaxEncodedBytes)
            throw TooLong(options);
        using var buffer = new MemoryStream();
        var chunk = new byte[81920];
        int read;
        while ((read = stream.Read(chunk, 0, chunk.Length)) > 0)
        {
            if (buffer.Length + read > options.MaxEncodedBytes) throw TooLong(options);
            buffer.Write(chunk, 0, read);
        }
        return FromBytes(buffer.GetBuffer().AsSpan(0, (int)buffer.Length), options);
    }

    /// <summary>Decodes an encoded JPEG, PNG or WebP image held in memory.</summary>
    /// <exception cref="ImageDecodeException">Empty, corrupt, truncated, or not a supported format.</exception>
    /// <exception cref="ImageSizeException">More than <see cref="Qwen3ImageDecodeOptions.MaxPixels"/> pixels.</exception>
    public static unsafe Qwen3Image FromBytes(ReadOnlySpan<byte> encoded, Qwen3ImageDecodeOptions? options = null)
    {
        options ??= Qwen3ImageDecodeOptions.Default;
        ArgumentOutOfRangeException.ThrowIfLessThan(options.MaxPixels, 1);
        fixed (byte* data = encoded)
        {
            // The header first: a size over the limit becomes the same ImageSizeException the processor throws,
            // carrying the declared width and height, and the engine never starts on the pixels.
            q3n_image_info info = default;
            info.struct_size = (uint)sizeof(q3n_image_info);
            var status = NativeMethods.q3n_image_probe(data, (nuint)encoded.Length, &info);
            if (status != q3n_status.Q3N_OK) throw Failure(status, "Reading the image header");
            long stored = (long)info.stored_width * info.stored_height;
            if (stored > options.MaxPixels || stored * 3 > Array.MaxLength)
                throw new ImageSizeException(nameof(encoded), info.stored_width, info.stored_height,
                    $"The image is {info.stored_width}x{info.stored_height} = {stored} pixels, more than the limit of " +
                    $"{Math.Min(options.MaxPixels, Array.MaxLength / 3)} pixels.");

            q3n_image_decode_options decode = default;
            NativeMethods.q3n_image_decode_options_init(&decode, (nuint)sizeof(q3n_image_decode_options));
            decode.max_pixels = (ulong)options.MaxPixels;
            decode.apply_exif_orientation = options.ApplyExifOrientation ? 1u : 0u;
            nint image = 0;
            status = NativeMethods.q3n_image_decode(data, (nuint)encoded.Length, &decode, &image);
            if (status != q3n_status.Q3N_OK) throw Failure(status, "Decoding the image");
            try
            {
                info = default;
                info.struct_size = (uint)sizeof(q3n_image_info);
                NativeCall.Check(NativeMethods.q3n_image_get_info(image, &info), "Reading the decoded image's size");
                var rgb = new byte[(long)info.width * info.height * 3];
                nuint count = 0;
                fixed (byte* p = rgb)
                    NativeCall.Check(NativeMethods.q3n_image_get_pixels(image, p, (nuint)rgb.Length, &count), "Copying the decoded pixels");
                return new Qwen3Image(rgb, (int)info.width, (int)info.height, (Qwen3ImageFormat)info.format, (int)info.exif_orientation);
            }
            finally
            {
                NativeMethods.q3n_image_free(image);
            }
        }
    }

    /// <summary>Wraps a copy of raw RGB8 pixels (interleaved R, G, B, row-major, no padding).</summary>
    /// <exception cref="ImageSizeException">A side is not positive.</exception>
    /// <exception cref="ArgumentException"><paramref name="rgb"/> is not width · height · 3 bytes long.</exception>
    public static Qwen3Image FromRgb(ReadOnlySpan<byte> rgb, int width, int height)
    {
        if (width <= 0 || height <= 0)
            throw new ImageSizeException(width <= 0 ? nameof(width) : nameof(height), width, height,
                $"Image dimensions must be positive, got {width}x{height} (width x height).");
        long expected = (long)width * height * 3;
        if (rgb.Length != expected)
            throw new ArgumentException($"Expected {expected} bytes for a {width}x{height} RGB8 image, got {rgb.Length}.", nameof(rgb));
        return new Qwen3Image(rgb.ToArray(), width, height, Qwen3ImageFormat.RawRgb, 1);
    }

    /// <summary>Qwen3-VL preprocessing of this image (<see cref="Qwen3VLImageProcessor.Preprocess(Qwen3Image, Qwen3VLImageProcessorOptions?)"/>).</summary>
    public PreprocessedImage Preprocess(Qwen3VLImageProcessorOptions? options = null) =>
        Qwen3VLImageProcessor.Preprocess(this, options);

    private static ImageDecodeException TooLong(Qwen3ImageDecodeOptions options) =>
        new(Qwen3Status.InvalidArgument, $"The encoded image is longer than the limit of {options.MaxEncodedBytes} bytes.");

    // Must run right after the failing call, on its thread (q3n_last_error is per thread).
    private static Qwen3NativeException Failure(q3n_status status, string operation) =>
        status is q3n_status.Q3N_ERR_INVALID_ARGUMENT or q3n_status.Q3N_ERR_UNSUPPORTED
            ? new ImageDecodeException((Qwen3Status)status, NativeCall.Describe(status, operation))
            : NativeCall.ToException(status, operation);
}
