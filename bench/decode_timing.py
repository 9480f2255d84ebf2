"""Quick timing of cpuattn.paged_attention alone on the suite's decode shapes
(and a few kernel-development variants), next to the read bandwidth measured
in the same process. For iterating on the decode kernel; the suite
(`python -m cpuattn bench`) is the reference for reported numbers.

    PYTHONPATH=src python bench/decode_timing.py [--threads N] [CASE ...]

Cases: b8, b8h, b8b (B8 ctx2048 H32:8 D128, fp32/fp16/bf16 pages), mqa
(B1 ctx131072 H4:1), b1long (B1 ctx32768 H32:8), tiny (B1 ctx16), and the
cache-resident compute cases l2, l2b (64 sequences sharing 64 tokens) and
b8s, mqas (32 sequences sharing 2048 / 8192 tokens). Pages are a random permutation.
"""
import argparse
import statistics
import time

import numpy as np

import cpuattn
from cpuattn import _roofline

CASES = {  # batch, heads, kv heads, context, page dtype, every sequence on the same pages
    "b8": (8, 32, 8, 2048, "float32", False),
    "b8h": (8, 32, 8, 2048, "float16", False),
    "b8b": (8, 32, 8, 2048, "bfloat16", False),
    "mqa": (1, 4, 1, 131072, "float32", False),
    "b1long": (1, 32, 8, 32768, "float32", False),
    "tiny": (1, 32, 8, 16, "float32", False),
    "l2": (64, 32, 8, 64, "float32", True),
    "l2b": (64, 32, 8, 64, "bfloat16", True),
    "b8s": (32, 32, 8, 2048, "float32", True),
    "mqas": (32, 4, 1, 8192, "float32", True),
}


def build(rng, batch, heads, kv_heads, ctx, dtype, shared, head_dim=128, page_size=16):
    if dtype == "bfloat16":
        import ml_dtypes
        dtype = ml_dtypes.bfloat16
    pages_per_seq = -(-ctx // page_size)
    num_pages = pages_per_seq * (1 if shared else batch)
    shape = (num_pages, page_size, kv_heads, head_dim)
    k_pages = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    v_pages = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    table = rng.permutation(num_pages).astype(np.int32)
    table = np.tile(table, (batch, 1)) if shared else table.reshape(batch, pages_per_seq)
    seq_lens = np.full(batch, ctx, np.int32)
    q = rng.standard_normal((batch, heads, head_dim), dtype=np.float32)
    kv_bytes = 2 * batch * ctx * kv_heads * head_dim * np.dtype(dtype).itemsize   # as read
    return (lambda: cpuattn.paged_attention(q, k_pages, v_pages, table, seq_lens)), kv_bytes


def median_time(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=cpuattn.get_num_threads())
    ap.add_argument("cases", nargs="*", default=["b8", "b8h", "b8b", "mqa", "b1long", "tiny"])
    args = ap.parse_args()
    cpuattn.set_num_threads(args.threads)
    bw = _roofline.read_bandwidth(repeats=5)["median_gbps"]
    print(f"threads {args.threads}, read bandwidth {bw:.1f} GB/s")
    rng = np.random.default_rng(0)
    for name in args.cases:
        fn, nbytes = build(rng, *CASES[name])
        t = median_time(fn, 2000 if name in ("tiny", "l2", "l2b") else 40)
        print(f"{name:7s} {t * 1e3:9.3f} ms  {nbytes / t / 1e9:6.1f} GB/s  "
              f"{100 * nbytes / t / 1e9 / bw:5.1f}% of read")


if __name__ == "__main__":
    main()
