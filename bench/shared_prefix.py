"""Shared-prefix decode against the same call over private copies of the
prefix (issue 16): B sequences with one P-token prompt and N tokens each of
their own, H32:8 D128 fp32 pages, page 16. Both calls are PagedPlans run in
turn (interleaved rounds); prints the medians, their ratio and whether the
results are bitwise equal. Then the fp32 causal prefill rate beside it: the shared call does all of
the private call's arithmetic, so that rate bounds it. Run
`python bench/cpu_check.py` around it.

    PYTHONPATH=src python bench/shared_prefix.py [threads] [rounds] [B] [P] [N]
"""
import sys
import time

import numpy as np

import cpuattn


def main(threads=2, rounds=9, batch=32, prefix=8192, own=256):
    h, hkv, d, ps = 32, 8, 128, 16
    rng = np.random.default_rng(0)
    common, mine = prefix // ps, -(-own // ps)
    num_pages = batch * (common + mine)
    k = rng.standard_normal((num_pages, ps, hkv, d), dtype=np.float32)
    v = rng.standard_normal((num_pages, ps, hkv, d), dtype=np.float32)
    private = rng.permutation(num_pages).astype(np.int32).reshape(batch, common + mine)
    for b in range(1, batch):   # the same prompt in every sequence's own pages
        k[private[b, :common]] = k[private[0, :common]]
        v[private[b, :common]] = v[private[0, :common]]
    shared = private.copy()
    shared[:, :common] = private[0, :common]
    lens = np.full(batch, prefix + own, np.int32)
    q = rng.standard_normal((batch, h, d), dtype=np.float32)
    cpuattn.set_num_threads(threads)
    plans = {name: cpuattn.PagedPlan(t, lens, page_size=ps, num_pages=num_pages)
             for name, t in (("private", private), ("shared", shared))}
    outs = {name: p.run(q, k, v) for name, p in plans.items()}   # warm-up, plans made
    times = {name: [] for name in plans}
    for _ in range(rounds):
        for name, p in plans.items():
            t0 = time.perf_counter()
            p.run(q, k, v)
            times[name].append(time.perf_counter() - t0)
    med = {name: float(np.median(t)) for name, t in times.items()}
    flops = 4.0 * batch * h * (prefix + own) * d
    for name in plans:
        print(f"{name:8s} {med[name] * 1e3:8.1f} ms  {flops / med[name] / 1e9:6.1f} GFLOP/s  "
              f"(rounds: {' '.join(f'{t * 1e3:.0f}' for t in times[name])})")
    print(f"B{batch} prefix {prefix} + {own} own, {threads} threads: shared is "
          f"{med['private'] / med['shared']:.2f}x the speed of private; bitwise equal: "
          f"{np.array_equal(outs['private'], outs['shared'])}")
    # the compute ceiling beside it: fp32 causal prefill S2048 H32:8 D128
    s = 2048
    pq = rng.standard_normal((1, s, h, d), dtype=np.float32)
    pk = rng.standard_normal((1, s, hkv, d), dtype=np.float32)
    pt = []
    for _ in range(3):
        t0 = time.perf_counter()
        cpuattn.attention(pq, pk, pk, causal=True)
        pt.append(time.perf_counter() - t0)
    pre = 2.0 * s * s * h * d / float(np.median(pt)) / 1e9
    print(f"fp32 causal prefill S2048 H32:8 D128: {pre:.1f} GFLOP/s; the shared call runs at "
          f"{flops / med['shared'] / 1e9 / pre:.2f} of it")


if __name__ == "__main__":
    main(*(int(x) for x in sys.argv[1:]))
