"""Decode cost per token and kv head for each KV storage type, same shape,
fp32 queries (context 4096, H32:8, D128, page 16), interleaved rounds.

    python bench/lowbit_cost.py THREADS BATCH

BATCH 1 keeps the pages in a 32 MB L3 (compute cost), 16 reads 268 MB of
bf16 pages. Prints the best median of 5 rounds, the ratio to bf16 pages and
ns per token and kv head."""
import sys
import time

import ml_dtypes
import numpy as np

import cpuattn


def main():
    threads, batch = (int(a) for a in sys.argv[1:3])
    rng = np.random.default_rng(0)
    ctx, h, hkv, d, ps = 4096, 32, 8, 128, 16
    npg = batch * ctx // ps
    bt = rng.permutation(npg).astype(np.int32).reshape(batch, ctx // ps)
    lens = np.full(batch, ctx, np.int32)
    q = rng.standard_normal((batch, h, d)).astype(np.float32)
    x = rng.standard_normal((npg, ps, hkv, d)).astype(np.float32)
    cases = {"float32": (x, None), "bfloat16": (x.astype(ml_dtypes.bfloat16), None)}
    for t in ("int8", "int4", "float8_e4m3fn", "float8_e5m2"):
        cases[t] = cpuattn.quantize_kv(x, t)
    cpuattn.set_num_threads(threads)
    best = {}
    for _ in range(5):
        for t, (pages, scale) in cases.items():
            def call():
                return cpuattn.paged_attention(q, pages, pages, bt, lens, k_scale=scale,
                                               v_scale=scale)
            call()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
            best[t] = min(best.get(t, np.inf), float(np.median(times)))
    rows = batch * ctx * hkv
    for t, s in best.items():
        print(f"{t:15s} {s * 1e3:8.2f} ms  {best['bfloat16'] / s:5.2f}x bf16  "
              f"{s / rows * 1e9 * threads:6.1f} ns per token and kv head per thread")


if __name__ == "__main__":
    main()
