namespace Qwen3Native; internal static class Placeholder { }
