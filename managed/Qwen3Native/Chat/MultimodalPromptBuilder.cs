using Qwen3Native.Tokenization;
using Qwen3Native.Vision;

namespace Qwen3Native.Chat;

/// <summary>
/// Turns a rendered Qwen3-VL prompt and its images and videos into a <see cref="MultimodalPrompt"/>: what
/// transformers' <c>Qwen3VLProcessor</c> produces (spec §4.5), split into token runs and vision items so that the
/// pad tokens never have to exist as text. Each image becomes <c>[… &lt;|vision_start|&gt;] [image] [&lt;|vision_end|&gt; …]</c>;
/// each video becomes, per temporal patch, its time text ("&lt;0.2 seconds&gt;"), &lt;|vision_start|&gt;, one item of
/// grid (1, h, w) and &lt;|vision_end|&gt; — one item per slice, as get_rope_index splits videos.
/// </summary>
/// <remarks>
/// Text is tokenised in the runs that transformers' tokenizer would see: special tokens split the text, so each run
/// between two vision items (time text included) is encoded in one piece and the ids equal those of the expanded
/// prompt (<see cref="MultimodalPrompt.ToExpandedTokenIds"/>).
/// </remarks>
public sealed class MultimodalPromptBuilder
{
    private readonly Qwen3Tokenizer _tokenizer;
    private readonly Qwen3VLImageProcessorOptions _imageOptions;
    private readonly Qwen3VLVideoProcessorOptions _videoOptions;
    private readonly int _visionStart, _visionEnd, _imagePad, _videoPad;

    /// <exception cref="ArgumentException">The tokenizer lacks one of the vision special tokens (not a Qwen3 tokenizer).</exception>
    public MultimodalPromptBuilder(Qwen3Tokenizer tokenizer, Qwen3VLImageProcessorOptions? imageOptions = null,
        Qwen3VLVideoProcessorOptions? videoOptions = null)
    {
        ArgumentNullException.ThrowIfNull(tokenizer);
        _tokenizer = tokenizer;
        _imageOptions = imageOptions ?? Qwen3VLImageProcessorOptions.Default;
        _videoOptions = videoOptions ?? Qwen3VLVideoProcessorOptions.Default;
        _visionStart = AddedTokenId(tokenizer, VisionStartToken);
        _visionEnd = AddedTokenId(tokenizer, VisionEndToken);
        _imagePad = AddedTokenId(tokenizer, ImagePadToken);
        _videoPad = AddedTokenId(tokenizer, VideoPadToken);
    }

    public const string VisionStartToken = "<|vision_start|>";
    public const string VisionEndToken = "<|vision_end|>";
    public const string ImagePadToken = "<|image_pad|>";
    public const string VideoPadToken = "<|video_pad|>";

    public int VisionStartTokenId => _visionStart;
    public int VisionEndTokenId => _visionEnd;
    public int ImagePadTokenId => _imagePad;
    public int VideoPadTokenId => _videoPad;

    /// <summary>Prepares the output of <see cref="Qwen3ChatTemplate.RenderPrompt"/>.</summary>
    public MultimodalPrompt Build(ChatPrompt prompt, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(prompt);
        return Build(prompt.Text, prompt.Media, cancellationToken);
    }

    /// <summary>
    /// Prepares a rendered prompt whose <see cref="Qwen3ChatTemplate.ImagePlaceholder"/> and
    /// <see cref="Qwen3ChatTemplate.VideoPlaceholder"/> occurrences stand, in order, for <paramref name="media"/>.
    /// Images are decoded and preprocessed, videos sampled, decoded and preprocessed, here.
    /// </summary>
    /// <exception cref="ArgumentException">The placeholders and the media do not match in number or kind, or the text
    /// has an &lt;|image_pad|&gt; or &lt;|video_pad|&gt; token outside a placeholder (which the engine would take for
    /// a vision item with no pixels).</exception>
    /// <remarks>Decoding and preprocessing errors propagate: see <see cref="Qwen3VLImageProcessor"/>,
    /// <see cref="Qwen3VLVideoProcessor"/> and <see cref="VideoPart.Preprocess"/>.</remarks>
    public MultimodalPrompt Build(string renderedPrompt, IReadOnlyList<ChatContentPart> media, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(renderedPrompt);
        ArgumentNullException.ThrowIfNull(media);
        string imagePlaceholder = VisionStartToken + ImagePadToken + VisionEndToken;
        string videoPlaceholder = VisionStartToken + VideoPadToken + VisionEndToken;

        var segments = new List<PromptSegment>();
        var images = new List<PreprocessedImage>();
        var videos = new List<PreprocessedVideo>();
        var pending = new List<int>();
        int pos = 0, item = 0;
        while (true)
        {
            int nextImage = renderedPrompt.IndexOf(imagePlaceholder, pos, StringComparison.Ordinal);
            int nextVideo = renderedPrompt.IndexOf(videoPlaceholder, pos, StringComparison.Ordinal);
            int at = nextImage < 0 ? nextVideo : nextVideo < 0 ? nextImage : Math.Min(nextImage, nextVideo);
            if (at < 0)
                break;
            bool isImage = at == nextImage;
            if (item >= media.Count)
                throw new ArgumentException(
                    $"The prompt has more image/video placeholders than the {media.Count} media given.", nameof(media));
            var part = media[item];
            string before = renderedPrompt.Substring(pos, at - pos);
            cancellationToken.ThrowIfCancellationRequested();
            if (isImage)
            {
                if (part is not ImagePart image)
                    throw new ArgumentException($"Placeholder {item} is an image, but media[{item}] is {Describe(part)}.", nameof(media));
                var decoded = image.Load(new Qwen3ImageDecodeOptions { MaxPixels = _imageOptions.MaxInputPixels });
                var pre = Qwen3VLImageProcessor.Preprocess(decoded, _imageOptions);
                images.Add(pre);
                EncodeText(before, pending);
                pending.Add(_visionStart);
                Flush(segments, pending);
                segments.Add(new VisionSegment(VisionKind.Image, pre.Grid, pre.PixelValues, pre.Columns, _imageOptions.MergeSize,
                    _imagePad, part, 0, null));
                pending.Add(_visionEnd);
            }
            else
            {
                if (part is not VideoPart video)
                    throw new ArgumentException($"Placeholder {item} is a video, but media[{item}] is {Describe(part)}.", nameof(media));
                var pre = video.Preprocess(_videoOptions, cancellationToken);
                videos.Add(pre);
                var sliceGrid = new GridThw(1, pre.Grid.H, pre.Grid.W);
                for (int t = 0; t < pre.Grid.T; t++)
                {
                    // Text before the video and the first time share one run: nothing special separates them.
                    EncodeText(t == 0 ? before + pre.TimestampText(0) : pre.TimestampText(t), pending);
                    pending.Add(_visionStart);
                    Flush(segments, pending);
                    segments.Add(new VisionSegment(VisionKind.Video, sliceGrid, pre.SlicePixelValues(t), pre.Columns, _videoOptions.MergeSize,
                        _videoPad, part, t, pre.SliceTimestamps[t]));
                    pending.Add(_visionEnd);
                }
            }
            pos = at + (isImage ? imagePlaceholder.Length : videoPlaceholder.Length);
            item++;
        }
        if (item != media.Count)
            throw new ArgumentException(
                $"The prompt has {item} image/video placeholders but {media.Count} media were given.", nameof(media));
        EncodeText(renderedPrompt.Substring(pos), pending);
        Flush(segments, pending);
        return new MultimodalPrompt(segments, images, videos);
    }

    private void EncodeText(string text, List<int> destination)
    {
        int start = destination.Count;
        _tokenizer.Encode(text, destination);
        for (int i = start; i < destination.Count; i++)
        {
            int id = destination[i];
            if (id == _imagePad || id == _videoPad)
                throw new ArgumentException(
                    $"The prompt text has a {(id == _imagePad ? ImagePadToken : VideoPadToken)} token outside an image or video " +
                    "placeholder; pass images and videos as content parts, not as token text.", "renderedPrompt");
        }
    }

    private static void Flush(List<PromptSegment> segments, List<int> pending)
    {
        if (pending.Count == 0)
            return;
        segments.Add(new TokenSegment(pending.ToArray()));
        pending.Clear();
    }

    private static string Describe(ChatContentPart part) => part switch
    {
        ImagePart => "an image",
        VideoPart => "a video",
        TextPart => "text",
        null => "null",
        _ => part.GetType().Name,
    };

    private static int AddedTokenId(Qwen3Tokenizer tokenizer, string content)
    {
        foreach (var t in tokenizer.AddedTokens)
            if (t.Content == content)
                return t.Id;
        throw new ArgumentException($"The tokenizer has no added token {content}; it is not a Qwen3-VL tokenizer.", nameof(tokenizer));
    }
}
