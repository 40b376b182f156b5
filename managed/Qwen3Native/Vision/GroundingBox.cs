namespace Qwen3Native.Vision;

/// <summary>
/// A box from a grounding answer: corners (X1, Y1) top-left and (X2, Y2) bottom-right, either in Qwen3-VL's
/// normalised 0–1000 coordinates or, after <see cref="Qwen3VLGrounding.ToPixels"/>, in pixels of the original image.
/// </summary>
public sealed record GroundingBox(string? Label, double X1, double Y1, double X2, double Y2)
{
    public double Width => X2 - X1;
    public double Height => Y2 - Y1;
}
