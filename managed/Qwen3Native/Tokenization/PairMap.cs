using System.Numerics;
using System.Runtime.CompilerServices;

namespace Qwen3Native.Tokenization;

/// <summary>
/// Open-addressing map from a token pair to its merge (rank and merged id), the innermost lookup of BPE.
/// Dictionary&lt;ulong, …&gt; hashes a ulong as the XOR of its halves, which for (left, right) id pairs piles
/// every (x, x) pair and many near pairs into the same buckets; a multiplicative hash spreads them.
/// </summary>
internal sealed class PairMap
{
    private const ulong Empty = ulong.MaxValue; // (uint.MaxValue, uint.MaxValue) is never a real pair

    private readonly ulong[] _keys;
    private readonly ulong[] _values;
    private readonly int _shift;

    public PairMap(int capacity)
    {
        int size = (int)BitOperations.RoundUpToPowerOf2((uint)Math.Max(16, capacity * 2));
        _keys = new ulong[size];
        _values = new ulong[size];
        Array.Fill(_keys, Empty);
        _shift = 64 - BitOperations.Log2((uint)size);
    }

    public int Count { get; private set; }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private int Slot(ulong key) => (int)((key * 0x9E3779B97F4A7C15UL) >> _shift);

    /// <summary>Inserts or overwrites. The table never grows: it is sized for the merges list up front.</summary>
    public void Set(ulong key, ulong value)
    {
        int mask = _keys.Length - 1;
        for (int i = Slot(key); ; i = (i + 1) & mask)
        {
            if (_keys[i] == key)
            {
                _values[i] = value;
                return;
            }
            if (_keys[i] == Empty)
            {
                if (Count + 1 > _keys.Length / 2 + _keys.Length / 4)
                    throw new InvalidOperationException("PairMap is full.");
                _keys[i] = key;
                _values[i] = value;
                Count++;
                return;
            }
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public bool TryGetValue(ulong key, out ulong value)
    {
        ulong[] keys = _keys;
        int mask = keys.Length - 1;
        for (int i = Slot(key); ; i = (i + 1) & mask)
        {
            ulong k = keys[i];
            if (k == key)
            {
                value = _values[i];
                return true;
            }
            if (k == Empty)
            {
                value = 0;
                return false;
            }
        }
    }
}
