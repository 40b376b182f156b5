namespace Qwen3Native.AI;

/// <summary>
/// A <see cref="Microsoft.Extensions.AI.UriContent"/> whose URI is not a local file. The library reads local files
/// only and never fetches from the network; download the content and pass it as a
/// <see cref="Microsoft.Extensions.AI.DataContent"/> instead.
/// </summary>
public sealed class UnsupportedUriSchemeException : NotSupportedException
{
    public UnsupportedUriSchemeException(Uri uri)
        : base($"Only local files (file:// URIs or paths) can be read; the URI scheme '{uri.Scheme}' of {Redact(uri)} is not " +
               "supported, and nothing is downloaded. Fetch the content yourself and pass it as a DataContent.")
    {
        Uri = uri;
        Scheme = uri.Scheme;
    }

    public Uri Uri { get; }

    public string Scheme { get; }

    // A data: URI can be megabytes long, and a URL's query may carry credentials; neither belongs in a message.
    private static string Redact(Uri uri) =>
        uri.Scheme == "data" ? "a data: URI" : uri.GetLeftPart(UriPartial.Path);
}
