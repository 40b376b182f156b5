using Qwen3Native.Vision;

namespace Qwen3Native.Chat;

/// <summary>Where an <see cref="ImagePart"/>'s pixels come from.</summary>
public enum ImageSourceKind
{
    File,
    EncodedBytes,
    Decoded,
}

/// <summary>
/// An image inside a message. Files and encoded bytes (JPEG, PNG, WebP) are decoded by the engine when the prompt is
/// prepared, not when the part is made, so a conversation can be built and rendered without the native library;
/// <see cref="Load"/> decodes on demand and keeps the result.
/// </summary>
public sealed class ImagePart : ChatContentPart
{
    private readonly string? _path;
    private readonly byte[]? _encoded;
    private Qwen3Image? _image;

    private ImagePart(ImageSourceKind kind, string? path, byte[]? encoded, Qwen3Image? image)
    {
        SourceKind = kind;
        _path = path;
        _encoded = encoded;
        _image = image;
    }

    public ImageSourceKind SourceKind { get; }

    /// <summary>The file for <see cref="ImageSourceKind.File"/>; null otherwise.</summary>
    public string? Path => _path;

    /// <summary>A JPEG, PNG or WebP file, read when the prompt is prepared.</summary>
    public static ImagePart FromFile(string path)
    {
        ArgumentException.ThrowIfNullOrEmpty(path);
        return new ImagePart(ImageSourceKind.File, path, null, null);
    }

    /// <summary>An encoded JPEG, PNG or WebP image; the bytes are copied.</summary>
    public static ImagePart FromBytes(ReadOnlySpan<byte> encoded) =>
        new(ImageSourceKind.EncodedBytes, null, encoded.ToArray(), null);

    /// <summary>
    /// Reads the stream to its end now (a stream can be read once, and a conversation may be prepared more than
    /// once), at most <see cref="Qwen3ImageDecodeOptions.MaxEncodedBytes"/> of <paramref name="options"/>.
    /// </summary>
    /// <exception cref="ImageDecodeException">The stream is longer than the limit.</exception>
    public static ImagePart FromStream(Stream stream, Qwen3ImageDecodeOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(stream);
        long limit = (options ?? Qwen3ImageDecodeOptions.Default).MaxEncodedBytes;
        using var buffer = new MemoryStream();
        var chunk = new byte[81920];
        int read;
        while ((read = stream.Read(chunk, 0, chunk.Length)) > 0)
        {
            if (buffer.Length + read > limit)
                throw new ImageDecodeException(Qwen3Status.InvalidArgument, $"The encoded image is longer than the limit of {limit} bytes.");
            buffer.Write(chunk, 0, read);
        }
        return new ImagePart(ImageSourceKind.EncodedBytes, null, buffer.ToArray(), null);
    }

    /// <summary>Raw RGB8 pixels (interleaved R, G, B, row-major, no padding); copied.</summary>
    /// <exception cref="ImageSizeException">A side is not positive.</exception>
    /// <exception cref="ArgumentException"><paramref name="rgb"/> is not width · height · 3 bytes long.</exception>
    public static ImagePart FromRgb(ReadOnlySpan<byte> rgb, int width, int height) =>
        new(ImageSourceKind.Decoded, null, null, Qwen3Image.FromRgb(rgb, width, height));

    public static ImagePart FromImage(Qwen3Image image)
    {
        ArgumentNullException.ThrowIfNull(image);
        return new ImagePart(ImageSourceKind.Decoded, null, null, image);
    }

    /// <summary>The decoded image (decoding a file or bytes the first time).</summary>
    /// <inheritdoc cref="Qwen3Image.FromFile" path="/exception"/>
    public Qwen3Image Load(Qwen3ImageDecodeOptions? options = null)
    {
        if (_image is { } image)
            return image;
        // Two threads may both decode; either result is the same image.
        image = SourceKind == ImageSourceKind.File
            ? Qwen3Image.FromFile(_path!, options)
            : Qwen3Image.FromBytes(_encoded!, options);
        return _image = image;
    }

    public override string ToString() => SourceKind switch
    {
        ImageSourceKind.File => "image: " + _path,
        ImageSourceKind.EncodedBytes => $"image: {_encoded!.Length} encoded bytes",
        _ => $"image: {_image!.Width}x{_image.Height}",
    };
}
