"""Cost of attention sinks and ALiBi over the same call without them,
interleaved call by call so that drift of the machine's speed cancels.

    python bench/feature_cost.py [THREADS] [ROUNDS]

Shapes: decode B8 context 2048 H32:8 D128 over fp32 pages, and causal
prefill S2048 H32:8 D128 fp32 (the issue's two). Prints, per shape and
keyword, the median over rounds of (time with it) / (time without it, the
same round), and the medians of each.
"""
import statistics
import sys
import time

import numpy as np

import cpuattn


def main(threads=2, rounds=9):
    cpuattn.set_num_threads(threads)
    rng = np.random.default_rng(0)
    h, hkv, d = 32, 8, 128
    sinks = rng.standard_normal(h).astype(np.float32)
    slopes = (2.0 ** (-8.0 * (np.arange(h) + 1) / h)).astype(np.float32)
    variants = {"none": {}, "sinks": {"sinks": sinks}, "alibi": {"alibi_slopes": slopes}}
    q = rng.standard_normal((1, 2048, h, d), dtype=np.float32)
    k = rng.standard_normal((1, 2048, hkv, d), dtype=np.float32)
    v = rng.standard_normal((1, 2048, hkv, d), dtype=np.float32)
    kp = rng.standard_normal((1024, 16, hkv, d), dtype=np.float32)
    vp = rng.standard_normal((1024, 16, hkv, d), dtype=np.float32)
    bt = rng.permutation(1024).astype(np.int32).reshape(8, 128)
    sl = np.full(8, 2048, np.int32)
    qd = rng.standard_normal((8, h, d), dtype=np.float32)
    shapes = {
        "decode b8 ctx2048": (lambda **kw: cpuattn.paged_attention(qd, kp, vp, bt, sl, **kw), 5),
        "prefill s2048 causal": (lambda **kw: cpuattn.attention(q, k, v, causal=True, **kw), 1),
    }
    print(f"{threads} threads, {rounds} rounds, cpuattn {cpuattn.__version__} "
          f"simd={cpuattn.info()['simd']}")
    for name, (fn, calls) in shapes.items():
        for kw in variants.values():
            fn(**kw)
        times = {v: [] for v in variants}
        for _ in range(rounds):
            for var, kw in variants.items():
                per = []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    fn(**kw)
                    per.append(time.perf_counter() - t0)
                times[var].append(statistics.median(per))
        base = times["none"]
        for var in ("sinks", "alibi"):
            ratio = statistics.median(t / b for t, b in zip(times[var], base))
            print(f"{name}: {var} {ratio:.3f} x without (medians {statistics.median(base) * 1e3:.2f}"
                  f" -> {statistics.median(times[var]) * 1e3:.2f} ms; goal <= 1.03)")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
