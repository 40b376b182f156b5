# Where a decode step's time goes, from cupti_trace.cpp's CSV. Steps are told apart by gaps of more
# than 20 us; of the full steps, the second to last is summed per kernel. "end-delta" is how long
# after the previous kernel's end a kernel ends (what it adds to the step under PDL, where kernels
# start early and wait), "duration" its own start to end.
#   python3 decode_timeline.py trace.csv [kernels-per-layer]
# With kernels-per-layer (9 for a Qwen3 dense FP8 step with the fused attention, 11 for Qwen3-MoE),
# also the average per position in a layer over layers 4-31.
import collections
import csv
import re
import subprocess
import sys


def demangle(names):
    out = subprocess.run(['c++filt'], input='\n'.join(names), capture_output=True, text=True).stdout.split('\n')
    tidy = []
    for n in out[:len(names)]:
        n = n.replace('(anonymous namespace)::', '').replace('q3n::cuda::', '').replace('moe::', '')
        tidy.append(re.sub(r'\(.*', '', re.sub(r'^void ', '', n))[:60])
    return tidy


def read_kernels(path):
    kernels = []
    with open(path) as f:
        for r in csv.DictReader(f):
            kernels.append((float(r['Start (ns)']), float(r['End (ns)']), r['Name']))
    return sorted(kernels)


def one_step(kernels):
    steps, current = [], [kernels[0]]
    for a, b in zip(kernels, kernels[1:]):
        if b[0] - a[1] > 20000:
            steps.append(current)
            current = []
        current.append(b)
    steps.append(current)
    full = [s for s in steps if len(s) > 100]
    return full[-2] if len(full) >= 2 else full[-1]


def main():
    step = one_step(read_kernels(sys.argv[1]))
    names = demangle([n for _, _, n in step])
    end_delta, prev_end = [], step[0][0]
    for start, end, _ in step:
        end_delta.append((end - prev_end) / 1e3)
        prev_end = max(prev_end, end)
    print(f'step span {(step[-1][1] - step[0][0]) / 1e3:.1f} us, {len(step)} kernels')
    total, count, duration = collections.Counter(), collections.Counter(), collections.Counter()
    for (start, end, _), name, delta in zip(step, names, end_delta):
        total[name] += delta
        count[name] += 1
        duration[name] += (end - start) / 1e3
    print(f"{'kernel':60s} {'n':>4s} {'end-delta us':>12s} {'per call':>9s} {'duration/call':>13s}")
    for name, t in total.most_common():
        print(f'{name:60s} {count[name]:4d} {t:12.1f} {t / count[name]:9.2f} {duration[name] / count[name]:13.2f}')
    if len(sys.argv) < 3:
        return
    per = int(sys.argv[2])
    first = next(i for i, n in enumerate(names) if 'rmsnorm' in n)
    sums = collections.defaultdict(lambda: [0.0, 0.0, 0])
    for layer in range(4, 32):
        for p in range(per):
            i = first + layer * per + p
            if i < len(step):
                sums[p][0] += end_delta[i]
                sums[p][1] += (step[i][1] - step[i][0]) / 1e3
                sums[p][2] += 1
    print('\nper layer (layers 4-31):')
    layer_total = 0.0
    for p in range(per):
        t, d, n = sums[p]
        if n:
            layer_total += t / n
            print(f'{p:2d} {names[first + p]:60s} end-delta {t / n:6.2f} us  duration {d / n:6.2f} us')
    print(f'layer total {layer_total:.1f} us')


if __name__ == '__main__':
    main()
