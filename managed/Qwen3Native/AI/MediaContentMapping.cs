using Microsoft.Extensions.AI;
using Qwen3Native.Chat;

namespace Qwen3Native.AI;

/// <summary>
/// Maps Microsoft.Extensions.AI image and video contents to chat content parts: <see cref="DataContent"/> with an
/// image/* or video/* media type, and <see cref="UriContent"/> naming a local file (file:// or a path). Nothing is
/// fetched from the network, and nothing is decoded here: images and videos are read when the prompt is prepared.
/// </summary>
internal static class MediaContentMapping
{
    /// <summary>The part for an image or video content; null for any other content type.</summary>
    /// <exception cref="NotSupportedException">Data or a file of a media type other than image/* or video/*.</exception>
    /// <exception cref="UnsupportedUriSchemeException">A URI that is not a local file.</exception>
    public static ChatContentPart? ToPart(AIContent content)
    {
        switch (content)
        {
            case DataContent data:
                if (data.HasTopLevelMediaType("image"))
                    return ImagePart.FromBytes(data.Data.Span);
                if (data.HasTopLevelMediaType("video"))
                    return VideoPart.FromBytes(data.Data.Span);
                throw new NotSupportedException(
                    $"Qwen3-VL takes images and videos; a DataContent of media type '{data.MediaType}' cannot be rendered.");
            case UriContent uri:
                string path = LocalPath(uri.Uri);
                if (uri.HasTopLevelMediaType("image"))
                    return ImagePart.FromFile(path);
                if (uri.HasTopLevelMediaType("video"))
                    return VideoPart.FromFile(path);
                throw new NotSupportedException(
                    $"Qwen3-VL takes images and videos; a UriContent of media type '{uri.MediaType}' ({path}) cannot be rendered.");
            default:
                return null;
        }
    }

    internal static string LocalPath(Uri uri)
    {
        if (!uri.IsAbsoluteUri)
            return Uri.UnescapeDataString(uri.OriginalString);
        if (uri.IsFile && (string.IsNullOrEmpty(uri.Host) || uri.IsLoopback))
            return uri.LocalPath;
        // A UNC-style file://server/share URI would reach across the network too.
        throw new UnsupportedUriSchemeException(uri);
    }
}
