"""The amx path against the avx512bf16 path and torch SDPA, interleaved call
by call so that drift of the machine's speed cancels.

    python bench/amx_cost.py [THREADS,...] [ROUNDS]

Shapes (issue 17's three; bf16 Q, K and V):
  prefill   causal S4096 H32:8 D128 (torch: SDPA with enable_gqa, bf16)
  chunked   512 new tokens over 4096 cached, one sequence, H32:8 D128, bf16
            pages of 16 (paged_attention with cu_seqlens_q)
  mla       decode B8 context 4096, 128 query heads over one latent kv head,
            D576 / Dv512 (v_pages = kv_pages[..., :512]), bf16 latents
Prints, per shape and thread count, the median time of each variant, its
GFLOP/s (4 * pairs * D, causal pairs halved) and the median over rounds of
the per-round ratios. Without AMX the amx rows are skipped (the path is not
supported), and without torch the torch rows.
"""
import statistics
import sys
import time

import numpy as np

import cpuattn
from cpuattn import _threads

try:
    import ml_dtypes
    BF16 = ml_dtypes.bfloat16
except ImportError:   # pragma: no cover
    sys.exit("needs ml_dtypes")
try:
    import torch
except ImportError:
    torch = None


def _shapes(rng):
    h, hkv, d = 32, 8, 128
    s = 4096
    q = rng.standard_normal((1, s, h, d), dtype=np.float32).astype(BF16)
    k = rng.standard_normal((1, s, hkv, d), dtype=np.float32).astype(BF16)
    v = rng.standard_normal((1, s, hkv, d), dtype=np.float32).astype(BF16)
    shapes = {}
    pf_flops = 4.0 * h * s * s * d / 2
    torch_pf = None
    if torch is not None:
        tq, tk, tv = (torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
                      .transpose(1, 2).contiguous() for x in (q, k, v))
        torch_pf = lambda: torch.nn.functional.scaled_dot_product_attention(   # noqa: E731
            tq, tk, tv, is_causal=True, enable_gqa=True)
    shapes["prefill s4096 causal"] = (
        lambda: cpuattn.attention(q, k, v, causal=True), torch_pf, pf_flops)

    new, ctx, page = 512, 4096, 16
    total = ctx + new
    npages = total // page
    kp = rng.standard_normal((npages, page, hkv, d), dtype=np.float32).astype(BF16)
    vp = rng.standard_normal((npages, page, hkv, d), dtype=np.float32).astype(BF16)
    bt = rng.permutation(npages).astype(np.int32)[None]
    sl = np.array([total], np.int32)
    cu = np.array([0, new], np.int32)
    qc = rng.standard_normal((new, h, d), dtype=np.float32).astype(BF16)
    ch_flops = 4.0 * h * new * (ctx + new / 2) * d
    shapes["chunked 512 over 4096"] = (
        lambda: cpuattn.paged_attention(qc, kp, vp, bt, sl, cu_seqlens_q=cu), None, ch_flops)

    b, hm, dl, dv, ctx = 8, 128, 576, 512, 4096
    npg = b * ctx // page
    kv = rng.standard_normal((npg, page, 1, dl), dtype=np.float32).astype(BF16)
    btm = rng.permutation(npg).astype(np.int32).reshape(b, ctx // page)
    slm = np.full(b, ctx, np.int32)
    qm = rng.standard_normal((b, hm, dl), dtype=np.float32).astype(BF16)
    mla_flops = 2.0 * b * hm * ctx * (dl + dv)
    shapes["mla b8 ctx4096 h128 d576/512"] = (
        lambda: cpuattn.paged_attention(qm, kv, kv[..., :dv], btm, slm, scale=dl ** -0.5),
        None, mla_flops)
    return shapes


def main(threads=(16,), rounds=5):
    rng = np.random.default_rng(0)
    shapes = _shapes(rng)
    paths = [p for p in ("avx512bf16", "amx") if p in _threads.supported_isas()]
    print(f"cpuattn {cpuattn.__version__}, simd={cpuattn.info()['simd']}, paths {paths}, "
          f"torch {torch.__version__ if torch else 'absent'}, {rounds} rounds")
    old = _threads.get_isa()
    for nt in threads:
        cpuattn.set_num_threads(nt)
        if torch is not None:
            torch.set_num_threads(nt)
        for name, (fn, tfn, flops) in shapes.items():
            variants = {p: fn for p in paths}
            if tfn is not None:
                variants["torch"] = tfn
            times = {v: [] for v in variants}
            for var, f in variants.items():   # warm-up
                if var in paths:
                    _threads.set_isa(var)
                f()
            for _ in range(rounds):
                for var, f in variants.items():
                    if var in paths:
                        _threads.set_isa(var)
                    t0 = time.perf_counter()
                    f()
                    times[var].append(time.perf_counter() - t0)
            _threads.set_isa(old)
            line = [f"{nt:2d} thr  {name:30s}"]
            for var, t in times.items():
                med = statistics.median(t)
                line.append(f"{var} {med * 1e3:8.2f} ms {flops / med / 1e9:7.0f} GF/s")
            print(" | ".join(line))
            base = "avx512bf16" if "avx512bf16" in times else None
            for var in ("amx", "torch"):
                if var in times and base and var != base:
                    r = statistics.median(b / t for t, b in zip(times[var], times[base]))
                    print(f"        {var} speed-up over {base}: {r:.2f}x")
            if "amx" in times and "torch" in times:
                r = statistics.median(tt / a for a, tt in zip(times["amx"], times["torch"]))
                print(f"        amx speed-up over torch: {r:.2f}x")
        sys.stdout.flush()


if __name__ == "__main__":
    ths = tuple(int(x) for x in sys.argv[1].split(",")) if len(sys.argv) > 1 else (16,)
    main(ths, int(sys.argv[2]) if len(sys.argv) > 2 else 5)
