namespace Qwen3Native.Vision;

/// <summary>
/// The released Qwen3-VL <c>preprocessor_config.json</c> values (spec §4.6), shared by every Qwen3-VL size.
/// </summary>
public static class Qwen3VLImageDefaults
{
    public const int PatchSize = 16;
    public const int TemporalPatchSize = 2;
    public const int MergeSize = 2;

    /// <summary>patch_size · merge_size: one LLM token covers a Factor×Factor pixel square.</summary>
    public const int Factor = PatchSize * MergeSize;

    /// <summary><c>size.shortest_edge</c>, which despite its name is a pixel count: 64 tokens × 32².</summary>
    public const long MinPixels = 65_536;

    /// <summary><c>size.longest_edge</c>, a pixel count: 16384 tokens × 32².</summary>
    public const long MaxPixels = 16_777_216;

    /// <summary>smart_resize refuses anything more elongated than this (long side / short side).</summary>
    public const double MaxAspectRatio = 200.0;

    public const float ImageMean = 0.5f;
    public const float ImageStd = 0.5f;

    /// <summary>
    /// Default cap on the pixel count of an input image, checked before anything is allocated. Twice PIL's
    /// MAX_IMAGE_PIXELS, the point where PIL itself refuses an image as a decompression bomb, so anything the
    /// Python stack accepts is accepted here too.
    /// </summary>
    public const long MaxInputPixels = 2L * 89_478_485;

    /// <summary>Token ids of the placeholders (spec §4.5).</summary>
    public const int VisionStartTokenId = 151652;
    public const int VisionEndTokenId = 151653;
    public const int ImagePadTokenId = 151655;
    public const int VideoPadTokenId = 151656;
}
