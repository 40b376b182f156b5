using System.Buffers;
using System.Collections.Concurrent;
using System.Runtime.InteropServices;
using System.Text;

namespace Qwen3Native.Tokenization;

/// <summary>Options of a tokenizer.json "BPE" model that change how words are split.</summary>
internal sealed record BpeOptions(string? UnkToken, bool FuseUnk, bool IgnoreMerges);

/// <summary>
/// Byte-level BPE: a word's UTF-8 bytes start as single-byte tokens and the adjacent pair with the lowest merge
/// rank (leftmost on ties) is merged until no pair has a merge. This is the order Hugging Face's priority-queue
/// implementation produces, which is also the classic GPT-2 loop. A heap keeps it O(n log n), so a megabyte
/// "word" (one character repeated) is fine.
/// </summary>
internal sealed class BpeModel
{
    // Words longer than this (in chars) are not cached; long words are rare and would crowd the cache.
    private const int MaxCachedLength = 256;
    private const int CacheCapacity = 50_000;
    private const int LargeWordBytes = 1 << 16;

    private readonly Dictionary<string, int> _vocab;
    private readonly Dictionary<string, int>.AlternateLookup<ReadOnlySpan<char>> _vocabBySpan;
    private readonly string?[] _idToToken;
    // (left id << 32 | right id) -> (rank << 32 | merged id)
    private readonly PairMap _merges;
    private readonly int[] _byteToId = new int[256];
    private readonly int _unkId;
    private readonly bool _fuseUnk;
    private readonly bool _ignoreMerges;

    private readonly ConcurrentDictionary<string, int[]> _cache = new();
    private readonly ConcurrentDictionary<string, int[]>.AlternateLookup<ReadOnlySpan<char>> _cacheBySpan;
    private int _cacheCount;

    [ThreadStatic] private static Workspace? t_workspace;

    public BpeModel(Dictionary<string, int> vocab, IReadOnlyList<(string Left, string Right)> merges, BpeOptions options)
    {
        _vocab = vocab;
        _vocabBySpan = vocab.GetAlternateLookup<ReadOnlySpan<char>>();
        _cacheBySpan = _cache.GetAlternateLookup<ReadOnlySpan<char>>();

        int maxId = -1;
        foreach (var (token, id) in vocab)
        {
            if (id < 0) throw new TokenizerFormatException($"BPE vocabulary entry '{token}' has a negative id {id}.");
            maxId = Math.Max(maxId, id);
        }
        _idToToken = new string?[maxId + 1];
        foreach (var (token, id) in vocab) _idToToken[id] = token;

        _merges = new PairMap(merges.Count);
        for (int rank = 0; rank < merges.Count; rank++)
        {
            var (left, right) = merges[rank];
            if (!vocab.TryGetValue(left, out int a))
                throw new TokenizerFormatException($"Merge #{rank} '{left} {right}': '{left}' is not in the vocabulary.");
            if (!vocab.TryGetValue(right, out int b))
                throw new TokenizerFormatException($"Merge #{rank} '{left} {right}': '{right}' is not in the vocabulary.");
            if (!vocab.TryGetValue(left + right, out int merged))
                throw new TokenizerFormatException($"Merge #{rank} '{left} {right}': '{left + right}' is not in the vocabulary.");
            // A repeated pair keeps its last rank, as HF's map construction does.
            _merges.Set(Pair(a, b), ((ulong)(uint)rank << 32) | (uint)merged);
        }

        for (int b = 0; b < 256; b++)
            _byteToId[b] = vocab.TryGetValue(ByteLevel.ByteToChar[b].ToString(), out int id) ? id : -1;

        _unkId = -1;
        if (options.UnkToken is not null)
        {
            if (!vocab.TryGetValue(options.UnkToken, out _unkId))
                throw new TokenizerFormatException($"BPE unk_token '{options.UnkToken}' is not in the vocabulary.");
        }
        _fuseUnk = options.FuseUnk;
        _ignoreMerges = options.IgnoreMerges;
    }

    public int Count => _vocab.Count;

    public int IdCapacity => _idToToken.Length;

    public int MergeCount => _merges.Count;

    public int? TokenToId(string token) => _vocab.TryGetValue(token, out int id) ? id : null;

    public string? IdToToken(int id) => (uint)id < (uint)_idToToken.Length ? _idToToken[id] : null;

    /// <summary>The merge of (<paramref name="left"/>, <paramref name="right"/>), for tests that check the merge order.</summary>
    internal bool TryGetMerge(int left, int right, out int rank, out int merged)
    {
        bool found = _merges.TryGetValue(Pair(left, right), out ulong m);
        rank = (int)(m >> 32);
        merged = (int)(uint)m;
        return found;
    }

    internal int ByteToId(byte b) => _byteToId[b];

    private static ulong Pair(int left, int right) => ((ulong)(uint)left << 32) | (uint)right;

    /// <summary>Appends the ids of one pre-tokenized word (plain text, before byte-level mapping).</summary>
    public void Encode(ReadOnlySpan<char> word, List<int> output)
    {
        if (word.IsEmpty) return;
        if (word.Length == 1 && word[0] < 0x80 && _byteToId[word[0]] >= 0 && !_ignoreMerges)
        {
            output.Add(_byteToId[word[0]]);
            return;
        }
        bool cacheable = word.Length <= MaxCachedLength;
        if (cacheable && _cacheBySpan.TryGetValue(word, out int[]? cached))
        {
            output.AddRange(cached);
            return;
        }

        var ws = t_workspace ??= new Workspace();
        if (Encoding.UTF8.GetMaxByteCount(word.Length) > ws.Bytes.Length)
            ws.EnsureBytes(Encoding.UTF8.GetByteCount(word));
        int byteCount = Encoding.UTF8.GetBytes(word, ws.Bytes);
        int start = output.Count;
        EncodeBytes(ws, byteCount, output);
        // A huge word grew the scratch buffers to tens of MB; do not keep that alive on this thread.
        if (byteCount > LargeWordBytes) t_workspace = null;

        if (cacheable)
        {
            int[] ids = CollectionsMarshal.AsSpan(output)[start..].ToArray();
            if (Interlocked.Increment(ref _cacheCount) > CacheCapacity)
            {
                // Bounded memory: start over rather than track recency; the working set refills quickly.
                _cache.Clear();
                Interlocked.Exchange(ref _cacheCount, 0);
            }
            _cache.TryAdd(word.ToString(), ids);
        }
    }

    private void EncodeBytes(Workspace ws, int byteCount, List<int> output)
    {
        byte[] bytes = ws.Bytes;
        if (_ignoreMerges)
        {
            // A word that is itself a vocabulary entry is emitted whole, without looking at merges.
            char[] chars = ArrayPool<char>.Shared.Rent(byteCount);
            for (int i = 0; i < byteCount; i++) chars[i] = ByteLevel.ByteToChar[bytes[i]];
            bool found = _vocabBySpan.TryGetValue(chars.AsSpan(0, byteCount), out int whole);
            ArrayPool<char>.Shared.Return(chars);
            if (found)
            {
                output.Add(whole);
                return;
            }
        }

        // Initial symbols: one per byte. A byte missing from the vocabulary becomes unk (fused if asked) or is
        // dropped when there is no unk token, which is what HF does.
        ws.EnsureSymbols(byteCount);
        int[] ids = ws.Ids;
        int m = 0;
        bool lastWasUnk = false;
        for (int i = 0; i < byteCount; i++)
        {
            int id = _byteToId[bytes[i]];
            if (id < 0)
            {
                if (_unkId < 0) continue;
                if (lastWasUnk && _fuseUnk) continue;
                ids[m++] = _unkId;
                lastWasUnk = true;
                continue;
            }
            ids[m++] = id;
            lastWasUnk = false;
        }
        if (m == 0) return;
        MergeAll(ws, m);
        for (int i = 0; i >= 0; i = ws.Next[i]) output.Add(ids[i]);
    }

    private void MergeAll(Workspace ws, int m)
    {
        int[] ids = ws.Ids, prev = ws.Prev, next = ws.Next;
        for (int i = 0; i < m; i++)
        {
            prev[i] = i - 1;
            next[i] = i + 1 < m ? i + 1 : -1;
        }
        var heap = ws.Heap;
        heap.Clear();
        for (int i = 0; i + 1 < m; i++)
        {
            if (_merges.TryGetValue(Pair(ids[i], ids[i + 1]), out ulong merge))
                heap.Append((uint)(merge >> 32), i);
        }
        heap.Heapify();

        while (heap.TryPop(out uint rank, out int pos))
        {
            // Entries go stale when a neighbour merged first. The pair now at pos must still be the queued one;
            // ranks identify pairs, so comparing ranks is HF's "same merged id" test.
            if (ids[pos] < 0) continue;
            int right = next[pos];
            if (right < 0) continue;
            if (!_merges.TryGetValue(Pair(ids[pos], ids[right]), out ulong current) || (uint)(current >> 32) != rank) continue;

            int newId = (int)(uint)current;
            ids[pos] = newId;
            ids[right] = -1;
            int after = next[right];
            next[pos] = after;
            if (after >= 0) prev[after] = pos;

            int before = prev[pos];
            if (before >= 0 && _merges.TryGetValue(Pair(ids[before], newId), out ulong left))
                heap.Push((uint)(left >> 32), before);
            if (after >= 0 && _merges.TryGetValue(Pair(newId, ids[after]), out ulong rightMerge))
                heap.Push((uint)(rightMerge >> 32), pos);
        }
    }

    /// <summary>Per-thread scratch buffers so that encoding allocates nothing per word beyond its result.</summary>
    private sealed class Workspace
    {
        public byte[] Bytes = new byte[1024];
        public int[] Ids = new int[256];
        public int[] Prev = new int[256];
        public int[] Next = new int[256];
        public readonly MergeHeap Heap = new();

        public void EnsureBytes(int count)
        {
            if (Bytes.Length < count) Bytes = new byte[Math.Max(count, Bytes.Length * 2)];
        }

        public void EnsureSymbols(int count)
        {
            if (Ids.Length >= count) return;
            int size = Math.Max(count, Ids.Length * 2);
            Ids = new int[size];
            Prev = new int[size];
            Next = new int[size];
        }
    }

    /// <summary>
    /// Min-heap of (rank &lt;&lt; 32 | position): lowest rank first, leftmost among equal ranks. Four children per node
    /// halve the depth, and one 8-byte entry per node keeps sift-downs to one cache line per level; both matter for
    /// megabyte-long words.
    /// </summary>
    private sealed class MergeHeap
    {
        private long[] _keys = new long[256];
        private int _count;

        public void Clear() => _count = 0;

        /// <summary>Adds an entry without restoring heap order; call <see cref="Heapify"/> before popping.</summary>
        public void Append(uint rank, int pos)
        {
            if (_count == _keys.Length) Array.Resize(ref _keys, _count * 2);
            _keys[_count++] = ((long)rank << 32) | (uint)pos;
        }

        public void Heapify()
        {
            for (int i = (_count - 2) >> 2; i >= 0; i--)
                SiftDown(i, _keys[i]);
        }

        public void Push(uint rank, int pos)
        {
            if (_count == _keys.Length) Array.Resize(ref _keys, _count * 2);
            long key = ((long)rank << 32) | (uint)pos;
            long[] keys = _keys;
            int i = _count++;
            while (i > 0)
            {
                int parent = (i - 1) >> 2;
                if (keys[parent] <= key) break;
                keys[i] = keys[parent];
                i = parent;
            }
            keys[i] = key;
        }

        public bool TryPop(out uint rank, out int pos)
        {
            if (_count == 0)
            {
                rank = 0;
                pos = 0;
                return false;
            }
            long top = _keys[0];
            rank = (uint)(top >> 32);
            pos = (int)(uint)top;
            _count--;
            if (_count > 0) SiftDown(0, _keys[_count]);
            return true;
        }

        private void SiftDown(int i, long key)
        {
            long[] keys = _keys;
            int count = _count;
            while (true)
            {
                int first = (i << 2) + 1;
                if (first >= count) break;
                int best = first;
                long bestKey = keys[first];
                int last = Math.Min(first + 4, count);
                for (int c = first + 1; c < last; c++)
                {
                    if (keys[c] < bestKey)
                    {
                        bestKey = keys[c];
                        best = c;
                    }
                }
                if (bestKey >= key) break;
                keys[i] = bestKey;
                i = best;
            }
            keys[i] = key;
        }
    }
}
