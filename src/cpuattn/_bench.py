"""The cpuattn benchmark suite: ``python -m cpuattn bench``.

Each case runs, in this one process, on the same inputs and thread count:

- ``cpuattn``: the kernel under test;
- ``torch_sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on a
  ``(B, H, S, D)`` view of the same data (decode: over a contiguous cache
  of the same context), when torch is installed;
- ``torch_paged`` (decode only): the PyTorch way over pages, an
  ``index_select`` gather of the pages through the block table, then SDPA;
  the gather is timed too;
- ``reference``: ``cpuattn.reference_attention`` (numpy, float64), only
  where it stays small (about 2 s and 512 MiB at most).

Times are medians of repeated calls after a warm-up call; the number of
repeats follows a time budget. Rates are set against ceilings measured in
the same run (:mod:`cpuattn._roofline`): GFLOP/s against fp32 GEMM
throughput for prefill and backward, GB/s of K/V read against streaming
read bandwidth for decode. torch and ml_dtypes are optional: what needs a
missing one is reported, not failed.
"""
import fnmatch
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

import cpuattn
from cpuattn import _roofline, _threads, _validate

IMPLS = ("cpuattn", "torch_sdpa", "torch_paged", "reference")

# Time budget per implementation and case (seconds) and repeat caps.
FULL = {"budget": 2.0, "max_reps": 300, "gemm_n": 2048, "roof_repeats": 5}
QUICK = {"budget": 0.25, "max_reps": 30, "gemm_n": 2048, "roof_repeats": 3}

# The numpy reference runs only below these (float64, materialised scores).
REF_MAX_SECONDS = 2.0
REF_MAX_BYTES = 512 << 20


@dataclass
class Case:
    """One benchmark shape. ``kind`` is "prefill", "decode" or "backward"."""
    name: str
    kind: str
    batch: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    seq: int                  # prefill/backward: seq_q = seq_k; decode: context length
    causal: bool = True
    dtype: str = "float32"    # q/k/v dtype (prefill/backward); page dtype (decode)
    page_size: int = 16
    note: str = ""
    busy: bool = False        # decode beside busy processes: default threads vs 1 thread
    torch_first: bool = False  # run in a fresh process that imports torch before cpuattn
    call: str = "paged_attention"   # decode: "paged_attention", "plan" (PagedPlan.run),
    #   "plan_full" (run with cu_seqlens_q, out= and lse), "step" (one plan, `layers` runs)
    layers: int = 1           # decode "step": runs per step (one model's layers)
    features: str = ""        # "sinks" or "alibi": the call with attention sinks / ALiBi
    prefix: int = 0           # decode: the first `prefix` tokens of every sequence are one
    share: bool = False       #   prompt, on pages all share (True) or on private copies

    def shape(self):
        """A short human description of the shape."""
        h = f"h{self.num_heads}:{self.num_kv_heads}"
        dt = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int8": "int8",
              "int4": "int4", "float8_e4m3fn": "e4m3", "float8_e5m2": "e5m2"}[self.dtype]
        extra = f" +{self.features}" if self.features else ""
        if self.prefix:
            extra += f" prefix{self.prefix} {'shared' if self.share else 'private'}"
        if self.kind == "decode":
            steps = f" x{self.layers}" if self.layers > 1 else ""
            return (f"b{self.batch} ctx{self.seq} {h} d{self.head_dim} p{self.page_size} "
                    f"kv={dt}{steps}{extra}")
        c = " causal" if self.causal else ""
        return f"b{self.batch} s{self.seq} {h} d{self.head_dim} {dt}{c}{extra}"

    def flops(self):
        """Floating point operations of the attention maths (no softmax):
        prefill 4*B*H*Sq*Sk*D, backward 2.5x that, halved when causal."""
        f = 4.0 * self.batch * self.num_heads * self.seq * self.seq * self.head_dim
        if self.kind == "decode":
            return 4.0 * self.batch * self.num_heads * self.seq * self.head_dim * self.layers
        if self.kind == "backward":
            f *= 2.5
        return f / 2 if self.causal else f

    def kv_bytes(self):
        """Bytes of K and V a decode step must read: every cached token once
        (low-bit pages: their codes and scales); for "write_kv" the new
        token's rows it stores, for "merge" the two states it reads."""
        d = self.head_dim
        row = {"float32": 4 * d, "int8": d + 4, "float8_e4m3fn": d + 4, "float8_e5m2": d + 4,
               "int4": d // 2 + 2 * -(-d // 32)}.get(self.dtype, 2 * d)
        if self.call == "write_kv":
            return 2.0 * self.batch * self.num_kv_heads * row
        if self.call == "merge":
            return 2.0 * self.batch * self.num_heads * (4 * d + 4)
        tokens = self.batch * self.seq
        if self.share:   # the shared prefix once
            tokens -= (self.batch - 1) * (self.prefix // self.page_size * self.page_size)
        return 2.0 * tokens * self.num_kv_heads * row * self.layers


def _dram_batch(base=16, ctx=4096, hkv=8, d=128, item=4, cap=64):
    """Batch of the DRAM-sized decode case: 16 (B16 ctx4096 H32:8 D128 fp32
    reads 512 MiB), more when that is not 4x the last-level cache."""
    llc = _roofline.last_level_cache_bytes() or 0
    per_seq = 2 * ctx * hkv * d * item
    return int(min(cap, max(base, -(-4 * llc // per_seq))))


def busy_processes():
    """How many busy processes the busy-core case runs beside the kernel:
    a quarter of the usable CPUs, at least one (1 of 2 here, 4 of 16)."""
    return max(1, cpuattn.info()["usable_cpus"] // 4)


class _busy:
    """Busy-looping Python subprocesses for the duration of a with block."""

    def __init__(self, n):
        self.n = n
        self.procs = []

    def __enter__(self):
        import subprocess
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                      for _ in range(self.n)]
        time.sleep(0.2)   # let them start spinning
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def _run_busy(c, settings, fn):
    """Time fn at the default threads and on 1 thread, alternating in rounds
    beside busy processes; returns the cpuattn entry and the busy record."""
    default = cpuattn.get_num_threads()
    times = {default: [], 1: []}
    out = None
    rounds = 4
    sub = dict(settings, budget=settings["budget"] / (2 * rounds))
    with _busy(busy_processes()) as b:
        try:
            for _ in range(rounds):
                for n in (default, 1):
                    cpuattn.set_num_threads(n)
                    t, out = _time_calls(fn, sub)
                    times[n] += t
        finally:
            cpuattn.set_num_threads(default)
    med = {n: statistics.median(t) for n, t in times.items()}
    entry = {"status": "ok", "median_s": med[default], "min_s": min(times[default]),
             "reps": len(times[default]), "times_s": times[default],
             "gbps": c.kv_bytes() / med[default] / 1e9}
    busy = {"busy_processes": b.n, "threads": default, "median_s": med[default],
            "median_s_1thread": med[1], "times_s_1thread": times[1],
            "ratio_default_over_1thread": med[default] / med[1]}
    return entry, busy, out


CASES = [
    Case("prefill_causal_s2048_fp32", "prefill", 1, 32, 8, 128, 2048, True, "float32",
         note="Llama-3-8B-like GQA prefill"),
    Case("prefill_b4_s512_d64_fp32", "prefill", 4, 12, 12, 64, 512, False, "float32",
         note="BERT-base-like encoder"),
    Case("prefill_causal_s2048_bf16", "prefill", 1, 32, 8, 128, 2048, True, "bfloat16",
         note="bf16 q/k/v (ml_dtypes)"),
    Case("prefill_causal_s4096_bf16", "prefill", 1, 32, 8, 128, 4096, True, "bfloat16",
         note="bf16 prefill at 4096: the amx path's shape (torch: oneDNN on AMX where present)"),
    *[Case(f"prefill_causal_s2048_fp32_{f}", "prefill", 1, 32, 8, 128, 2048, True, "float32",
           features=f, note=f"prefill_causal_s2048_fp32 with {f}") for f in ("sinks", "alibi")],
    Case("decode_b8_ctx2048_fp32", "decode", 8, 32, 8, 128, 2048, dtype="float32",
         note="batched decode, fp32 pages"),
    *[Case(f"decode_b8_ctx2048_fp32_{f}", "decode", 8, 32, 8, 128, 2048, dtype="float32",
           features=f, note=f"decode_b8_ctx2048_fp32 with {f}") for f in ("sinks", "alibi")],
    Case("decode_b8_ctx2048_fp16", "decode", 8, 32, 8, 128, 2048, dtype="float16",
         note="fp32 q over fp16 pages"),
    Case("decode_b8_ctx2048_bf16", "decode", 8, 32, 8, 128, 2048, dtype="bfloat16",
         note="fp32 q over bf16 pages"),
    Case("decode_mqa_ctx131072_fp32", "decode", 1, 4, 1, 128, 131072, dtype="float32",
         note="one long MQA sequence: needs split-KV"),
    Case("decode_b1_ctx32768_fp32", "decode", 1, 32, 8, 128, 32768, dtype="float32",
         note="one long GQA sequence: fewer kv heads than cores"),
    Case("decode_dram_b16_ctx4096_fp32", "decode", _dram_batch(), 32, 8, 128, 4096,
         dtype="float32", note="DRAM-sized decode: KV >= 4x the last-level cache"),
    # low-bit pages against bf16 pages, same shape: context 4096, H32:8, D128,
    # page 16, fp32 queries; batch 16 (268 MB of bf16 pages), more where that
    # is not 4x the last-level cache, so that every case reads from DRAM
    *[Case(f"decode_dram_ctx4096_{tag}", "decode", _dram_batch(item=2), 32, 8, 128, 4096,
           dtype=dtype, note=note) for tag, dtype, note in (
        ("bf16", "bfloat16", "baseline of the low-bit cases"),
        ("int8", "int8", "int8 pages, a float32 scale per token and kv head"),
        ("int4", "int4", "int4 pages, a float16 scale per 32 elements"),
        ("e4m3", "float8_e4m3fn", "fp8 e4m3 pages, scales per token and kv head"),
        ("e5m2", "float8_e5m2", "fp8 e5m2 pages, scales per token and kv head"))],
    Case("decode_busy_core", "decode", 1, 4, 1, 128, 131072, dtype="float32", busy=True,
         note="MQA ctx131072 beside busy processes: default threads / 1 thread"),
    Case("decode_busy_core_torch_first", "decode", 1, 4, 1, 128, 131072, dtype="float32",
         busy=True, torch_first=True,
         note="decode_busy_core in a process that imported torch (its libgomp) first"),
    Case("decode_b1_ctx4096_fp32", "decode", 1, 32, 8, 128, 4096, dtype="float32",
         note="one sequence, context 4096: the base of the tree case"),
    Case("decode_tree16_b1_ctx4096_fp32", "decode", 1, 32, 8, 128, 4096, dtype="float32",
         call="tree", note="speculative verify: a random tree of 16 draft tokens"),
    # issue 16: 32 sequences with one 8192-token prompt and 256 tokens each of their own
    *[Case(f"decode_prefix8192_b32_{tag}_fp32", "decode", 32, 32, 8, 128, 8448, dtype="float32",
           prefix=8192, share=tag == "shared", note=note) for tag, note in (
        ("private", "B32 with one 8192-token prompt copied into each sequence's pages"),
        ("shared", "the same, the prompt's pages shared (as fork makes them): read once"))],
    Case("decode_tiny_ctx16_fp32", "decode", 1, 32, 8, 128, 16, dtype="float32",
         note="one page: call overhead"),
    *[Case(f"write_kv_b8_{tag}", "decode", 8, 32, 8, 128, 2048, dtype=dtype, call="write_kv",
           note=f"write_kv of one new token per sequence into {tag} pages")
      for tag, dtype in (("fp32", "float32"), ("int8", "int8"))],
    Case("merge_states_b8", "decode", 8, 32, 8, 128, 2048, dtype="float32", call="merge",
         note="merge_attention_states of two decode results (B8 H32 D128)"),
    Case("decode_tiny_plan_run", "decode", 1, 32, 8, 128, 16, dtype="float32", call="plan",
         note="the tiny decode as PagedPlan.run (planned once)"),
    Case("decode_tiny_plan_run_full", "decode", 1, 32, 8, 128, 16, dtype="float32",
         call="plan_full", note="PagedPlan.run with cu_seqlens_q, out= and return_lse"),
    # the same three call forms with a kernel of ~0.1 us: the cost of the call itself
    *[Case(f"decode_call_h1_d16{tag}", "decode", 1, 1, 1, 16, 16, dtype="float32", call=call,
           note=note) for tag, call, note in (
        ("", "paged_attention", "one head, one page: paged_attention's call cost"),
        ("_plan_run", "plan", "PagedPlan.run's call cost"),
        ("_plan_run_full", "plan_full", "PagedPlan.run's call cost with cu_seqlens_q, out=, lse"))],
    Case("decode_step_32layers_b8_ctx2048", "decode", 8, 32, 8, 128, 2048, dtype="float32",
         call="step", layers=32,
         note="a 32-layer decode step: one plan, 32 runs (torch: 32 sdpa calls)"),
    Case("decode_step_32layers_b8_ctx2048_plain", "decode", 8, 32, 8, 128, 2048,
         dtype="float32", call="step_plain", layers=32,
         note="the same step as 32 paged_attention calls, timed as one"),
    # cpuattn.torch.attention's custom op called eagerly and from a
    # torch.compile(fullgraph=True) graph, SDPA called the same way
    *[Case(f"torch_op_call_{mode}", "prefill", 1, 8, 2, 64, 16, True, "float32", call=call,
           note=f"cpuattn.torch.attention {mode} (tiny prefill): the torch op's call cost")
      for mode, call in (("eager", "torch_op"), ("compiled", "torch_op_compiled"))],
    Case("backward_causal_s1024_fp32", "backward", 1, 16, 16, 64, 1024, True, "float32",
         note="dense backward (dq, dk, dv)"),
]
CASE_NAMES = [c.name for c in CASES]


class Skip(Exception):
    """An implementation or a case cannot run here; the message says why
    and starts with its status: unsupported, unavailable, skipped, n/a."""


def select_cases(spec):
    """Cases named in a comma-separated list (shell patterns allowed, e.g.
    ``decode_*``); all cases for None. Unknown names raise ValueError."""
    if not spec:
        return list(CASES)
    chosen = []
    for pat in (s.strip() for s in spec.split(",") if s.strip()):
        hits = [c for c in CASES if fnmatch.fnmatchcase(c.name, pat)]
        if not hits:
            raise ValueError(f"unknown case {pat!r}; cases: {', '.join(CASE_NAMES)}")
        chosen += [c for c in hits if c not in chosen]
    return chosen


# --- optional dependencies --------------------------------------------------

def _import_torch():
    try:
        import torch
        import torch.nn.functional  # noqa: F401
        return torch
    except ImportError:
        return None


def _np_dtype(name):
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise Skip("unsupported: bfloat16 needs ml_dtypes (pip install ml_dtypes)") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _randn(rng, shape, dtype):
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype)


def _to_torch(torch, a):
    """A torch tensor sharing ``a``'s memory (bfloat16 through a uint16 view)."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _from_torch(t):
    t = t.detach()
    if str(t.dtype) == "torch.bfloat16":
        t = t.float()
    return t.numpy().astype(np.float64)


def _f64(a):
    return np.asarray(a).astype(np.float64)


def _sdpa(torch, q, k, v, causal):
    kw = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, **kw)


def _ref_fits(batch, heads, seq_q, seq_k, head_dim):
    """Whether the numpy reference stays under about 2 s and 512 MiB. Its
    cost, measured on a 2-core Xeon: ~0.7 ns per multiply-add of the two
    products plus ~15 ns per element of the float64 K/V it expands per head."""
    macs = 2.0 * batch * heads * seq_q * seq_k * head_dim
    seconds = 7e-10 * macs + 1.5e-8 * batch * seq_k * heads * head_dim
    nbytes = 8.0 * heads * max(3 * seq_q * seq_k, 4 * seq_k * head_dim)
    return seconds <= REF_MAX_SECONDS and nbytes <= REF_MAX_BYTES


# --- case builders: name -> (fn, to_common_layout) or Skip -----------------

def _dense_qkv(c, rng):
    """Random q, k, v of a dense case (batch, seq, heads, head_dim) in its dtype."""
    dt = _np_dtype(c.dtype)
    b, h, hkv, s, d = c.batch, c.num_heads, c.num_kv_heads, c.seq, c.head_dim
    return (_randn(rng, (b, s, h, d), dt), _randn(rng, (b, s, hkv, d), dt),
            _randn(rng, (b, s, hkv, d), dt))


def _features(c, rng):
    """The sinks / ALiBi keywords of a case: gpt-oss-like sinks (N(0, 1)),
    the ALiBi paper's slopes 2^(-8 (h + 1) / H)."""
    if c.features == "sinks":
        return {"sinks": rng.standard_normal(c.num_heads).astype(np.float32)}
    if c.features == "alibi":
        h = np.arange(c.num_heads)
        return {"alibi_slopes": (2.0 ** (-8.0 * (h + 1) / c.num_heads)).astype(np.float32)}
    return {}


def _build_torch_op(c, q, k, v, torch):
    """The case through cpuattn.torch.attention, eager or compiled
    (fullgraph, default backend; compiled in the untimed warm-up call),
    against SDPA called the same way: the cost of the call around the op."""
    if torch is None:
        raise Skip("unavailable: torch is not installed")
    import cpuattn.torch as ct

    def ours(q, k, v):
        return ct.attention(q, k, v, causal=c.causal)

    def sdpa(q, k, v):
        return _sdpa(torch, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                     c.causal).transpose(1, 2)
    if c.call == "torch_op_compiled":
        ours, sdpa = torch.compile(ours, fullgraph=True), torch.compile(sdpa, fullgraph=True)
    tq, tk, tv = (_to_torch(torch, x) for x in (q, k, v))

    def timed(fn):
        def run():
            with torch.inference_mode():
                return fn(tq, tk, tv)
        return run, _from_torch
    return {"cpuattn": timed(ours), "torch_sdpa": timed(sdpa),
            "torch_paged": Skip("n/a: dense case"),
            "reference": (lambda: cpuattn.reference_attention(q, k, v, causal=c.causal), _f64)}


def _build_prefill(c, rng, torch):
    q, k, v = _dense_qkv(c, rng)
    if c.call.startswith("torch_op"):
        return _build_torch_op(c, q, k, v, torch)
    f = _features(c, rng)
    impls = {"cpuattn": (lambda: cpuattn.attention(q, k, v, causal=c.causal, **f), _f64)}
    if f:
        impls["torch_sdpa"] = Skip("n/a: SDPA has no sinks (compare with the case without)")
    elif torch is None:
        impls["torch_sdpa"] = Skip("unavailable: torch is not installed")
    else:
        tq, tk, tv = (_to_torch(torch, x).transpose(1, 2) for x in (q, k, v))

        def run_torch():
            with torch.inference_mode():
                return _sdpa(torch, tq, tk, tv, c.causal)
        impls["torch_sdpa"] = (run_torch, lambda o: _from_torch(o).transpose(0, 2, 1, 3))
    impls["torch_paged"] = Skip("n/a: dense case")
    if _ref_fits(c.batch, c.num_heads, c.seq, c.seq, c.head_dim):
        impls["reference"] = (lambda: cpuattn.reference_attention(q, k, v, causal=c.causal, **f),
                              _f64)
    else:
        impls["reference"] = Skip("skipped: too large for the numpy reference")
    return impls


LOW_BIT = _validate.LOW_BIT_NAMES


def _build_decode(c, rng, torch):
    low = c.dtype in LOW_BIT
    dt = np.dtype(np.float32) if low else _np_dtype(c.dtype)
    b, h, hkv, ctx, d, ps = c.batch, c.num_heads, c.num_kv_heads, c.seq, c.head_dim, c.page_size
    pages_per_seq = -(-ctx // ps)
    common = c.prefix // ps if c.share else 0   # pages every sequence shares
    num_pages = b * pages_per_seq - (b - 1) * common
    k_pages = _randn(rng, (num_pages, ps, hkv, d), dt)
    v_pages = _randn(rng, (num_pages, ps, hkv, d), dt)
    scales = {}
    if low:
        # the kernel reads the codes; torch and the reference see their values
        (k_pages, ks), (v_pages, vs) = (cpuattn.quantize_kv(x, c.dtype) for x in (k_pages, v_pages))
        scales = {"k_scale": ks, "v_scale": vs}
        k_float = cpuattn.dequantize_kv(k_pages, ks, c.dtype)
        v_float = cpuattn.dequantize_kv(v_pages, vs, c.dtype)
    else:
        k_float, v_float = k_pages, v_pages
    # a shuffled block table: a sequence's pages are scattered in the pool
    order = rng.permutation(num_pages).astype(np.int32)
    block_table = np.concatenate([np.tile(order[:common], (b, 1)),
                                  order[common:].reshape(b, pages_per_seq - common)], axis=1)
    seq_lens = np.full(b, ctx, dtype=np.int32)
    q = _randn(rng, (b, h, d), np.float32)
    f = _features(c, rng)
    impls = {"cpuattn": _cpuattn_decode(c, q, k_pages, v_pages, block_table, seq_lens,
                                        dict(scales, **f))}
    if c.busy or c.prefix:
        # only cpuattn: at the default threads and on 1 thread (run_case); shared vs private
        for name in ("torch_sdpa", "torch_paged", "reference"):
            impls[name] = Skip("n/a: busy-core case times cpuattn only" if c.busy else
                               "n/a: compare the shared prefix case with the private one")
        return impls
    # the same context as contiguous (B, ctx, Hkv, D) arrays
    k_dense = k_float[block_table].reshape(b, pages_per_seq * ps, hkv, d)[:, :ctx]
    v_dense = v_float[block_table].reshape(b, pages_per_seq * ps, hkv, d)[:, :ctx]
    if c.call in ("write_kv", "merge"):
        for name in ("torch_sdpa", "torch_paged", "reference"):
            impls[name] = Skip("n/a: not attention (the rate column is the bytes it moves)")
        return impls
    if f or c.call == "tree":
        impls["torch_sdpa"] = impls["torch_paged"] = Skip(
            "n/a: SDPA has no sinks or tree masks (compare with the case without)")
    elif low:
        impls["torch_sdpa"] = impls["torch_paged"] = Skip(
            "n/a: torch has no low-bit KV cache (compare with the bf16 case)")
    elif torch is None:
        impls["torch_sdpa"] = impls["torch_paged"] = Skip("unavailable: torch is not installed")
    else:
        # torch wants one dtype: the query in the cache's dtype, (B, H, 1, D)
        tq = _to_torch(torch, q.astype(dt))[:, :, None, :]
        tk = _to_torch(torch, k_dense).transpose(1, 2).contiguous()
        tv = _to_torch(torch, v_dense).transpose(1, 2).contiguous()
        tk_pages, tv_pages = _to_torch(torch, k_pages), _to_torch(torch, v_pages)
        flat_table = torch.from_numpy(block_table.reshape(-1).astype(np.int64))

        def post(o):
            return _from_torch(o)[:, :, 0, :]          # (B, H, D)

        def run_contiguous():
            with torch.inference_mode():
                for _ in range(c.layers - 1):
                    _sdpa(torch, tq, tk, tv, False)
                return _sdpa(torch, tq, tk, tv, False)   # one query sees the whole context

        def run_paged():
            with torch.inference_mode():
                kg = tk_pages.index_select(0, flat_table).view(b, pages_per_seq * ps, hkv, d)
                vg = tv_pages.index_select(0, flat_table).view(b, pages_per_seq * ps, hkv, d)
                return _sdpa(torch, tq, kg[:, :ctx].transpose(1, 2),
                             vg[:, :ctx].transpose(1, 2), False)
        impls["torch_sdpa"] = (run_contiguous, post)
        impls["torch_paged"] = (run_paged, post) if c.layers == 1 else Skip(
            "n/a: one layer only (see torch_sdpa)")
    if c.layers > 1 or c.call == "tree":
        impls["reference"] = Skip("n/a: the plain case of the shape checks the result")
    elif _ref_fits(b, h, 1, ctx, d):
        impls["reference"] = (
            lambda: cpuattn.reference_attention(q[:, None], k_dense, v_dense, causal=True, **f),
            lambda o: _f64(o)[:, 0])
    else:
        impls["reference"] = Skip("skipped: too large for the numpy reference")
    return impls


def _cpuattn_decode(c, q, k_pages, v_pages, block_table, seq_lens, scales):
    """(fn, post) of cpuattn's decode in the case's call form."""
    b, ps, num_pages = q.shape[0], k_pages.shape[1], k_pages.shape[0]
    if c.call == "paged_attention":
        return (lambda: cpuattn.paged_attention(q, k_pages, v_pages, block_table, seq_lens,
                                                **scales), _f64)
    if c.call == "plan":
        plan = cpuattn.PagedPlan(block_table, seq_lens, page_size=ps, num_pages=num_pages)
        return (lambda: plan.run(q, k_pages, v_pages, **scales), _f64)
    if c.call == "plan_full":
        plan = cpuattn.PagedPlan(block_table, seq_lens, page_size=ps, num_pages=num_pages,
                                 cu_seqlens_q=np.arange(b + 1, dtype=np.int32))
        out = np.empty(q.shape, np.float32)
        return (lambda: plan.run(q, k_pages, v_pages, out=out, return_lse=True, **scales),
                lambda r: _f64(r[0]))

    if c.call == "write_kv":   # store one new token per sequence, vLLM's reshape_and_cache
        slots = (block_table[:, -1].astype(np.int64) * ps + ps - 1)
        rows = np.random.default_rng(2).standard_normal((b,) + (k_pages.shape[2], q.shape[2]),
                                                        dtype=np.float32)
        kw = {"k_scale": scales["k_scale"], "v_scale": scales["v_scale"]} if "k_scale" in scales \
            else {}
        return (lambda: cpuattn.write_kv(k_pages, v_pages, slots, rows, rows, **kw),
                lambda _: _f64(k_pages[slots // ps, slots % ps]))
    if c.call == "merge":   # two partial states of the same rows, merged by lse
        o1, l1 = cpuattn.paged_attention(q, k_pages, v_pages, block_table, seq_lens,
                                         return_lse=True, **scales)
        o2, l2 = o1[::-1].copy(), l1[:, ::-1].copy()
        return (lambda: cpuattn.merge_attention_states(o1, l1, o2, l2), lambda r: _f64(r[0]))
    if c.call == "tree":   # 16 draft queries per sequence, a random tree over them
        n = 16
        rng = np.random.default_rng(1)
        parent = [-1] + [int(rng.integers(0, i)) for i in range(1, n)]
        tree = np.zeros((n, n), bool)
        for i in range(n):
            j = i
            while j >= 0:
                tree[i, j], j = True, parent[j]
        qt = np.repeat(q, n, axis=0)
        cu = np.arange(b + 1, dtype=np.int32) * n
        plan = cpuattn.PagedPlan(block_table, seq_lens, page_size=ps, num_pages=num_pages,
                                 cu_seqlens_q=cu, tree_mask=np.tile(tree.reshape(-1), b))
        return (lambda: plan.run(qt, k_pages, v_pages, **scales),
                lambda o: _f64(o))
    if c.call == "step_plain":   # the same step without a plan: a call per layer
        def step_plain():
            for _ in range(c.layers):
                out = cpuattn.paged_attention(q, k_pages, v_pages, block_table, seq_lens,
                                              **scales)
            return out
        return step_plain, _f64

    def step():   # "step": the runner's loop, one plan for every layer
        plan = cpuattn.PagedPlan(block_table, seq_lens, page_size=ps, num_pages=num_pages)
        for _ in range(c.layers):
            out = plan.run(q, k_pages, v_pages, **scales)
        return out
    return step, _f64


def _build_backward(c, rng, torch):
    q, k, v = _dense_qkv(c, rng)
    dout = _randn(rng, q.shape, q.dtype)

    def flat(grads):
        return np.concatenate([_f64(g).ravel() for g in grads])
    impls = {}
    out, lse = cpuattn.attention(q, k, v, causal=c.causal, return_lse=True)
    impls["cpuattn"] = (lambda: cpuattn.attention_backward(dout, q, k, v, out, lse,
                                                           causal=c.causal), flat)
    if torch is None:
        impls["torch_sdpa"] = Skip("unavailable: torch is not installed")
    else:
        tq, tk, tv = (_to_torch(torch, x).transpose(1, 2).detach().requires_grad_(True)
                      for x in (q, k, v))
        tdout = _to_torch(torch, dout).transpose(1, 2)
        tout = _sdpa(torch, tq, tk, tv, c.causal)

        def run_torch():   # backward only, as cpuattn.attention_backward
            return torch.autograd.grad(tout, (tq, tk, tv), tdout, retain_graph=True)
        impls["torch_sdpa"] = (run_torch,
                               lambda g: flat(_from_torch(x).transpose(0, 2, 1, 3) for x in g))
    impls["torch_paged"] = Skip("n/a: dense case")
    impls["reference"] = Skip("n/a: no numpy reference for the backward")
    return impls


BUILDERS = {"prefill": _build_prefill, "decode": _build_decode, "backward": _build_backward}


# --- timing ------------------------------------------------------------------

def _time_calls(fn, settings):
    """Warm up once, then time repeated calls; returns (times, warm-up output).
    Repeats: as many as fit in the budget (at least 3, or 1 when a single call
    exceeds the budget), at most ``max_reps``."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    reps = int(settings["budget"] / max(first, 1e-9))
    reps = max(1 if first > settings["budget"] else 3, min(reps, settings["max_reps"]))
    times = []
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    finally:
        if gc_was_on:
            gc.enable()
    return times, out


def _status_of(exc):
    msg = str(exc)
    if isinstance(exc, Skip):
        return msg.split(":", 1)[0], msg
    if isinstance(exc, cpuattn.DTypeError):
        return "unsupported", f"unsupported: {msg}"
    return "error", f"error: {type(exc).__name__}: {msg}"


# A case's run in a process where torch, and so its libgomp, is loaded before cpuattn.
_TORCH_FIRST = """
import json, sys
import torch
import cpuattn
from cpuattn import _bench
fields, settings, seed, threads = json.loads(sys.argv[1])
cpuattn.set_num_threads(threads)
print(json.dumps(_bench.run_case(_bench.Case(**fields), settings, torch, seed)))
"""


def _run_torch_first(c, settings, seed):
    """run_case(c) in a fresh process that imports torch, then cpuattn."""
    import importlib.util
    import subprocess
    if importlib.util.find_spec("torch") is None:
        res = _result_head(c)
        for name in IMPLS:
            res["impls"][name] = {"status": "unavailable",
                                  "reason": "unavailable: torch is not installed"}
        return res
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(cpuattn.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [package_parent] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    arg = json.dumps([asdict(replace(c, torch_first=False)), settings, seed,
                      cpuattn.get_num_threads()])
    r = subprocess.run([sys.executable, "-c", _TORCH_FIRST, arg], env=env,
                       capture_output=True, text=True, check=True)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["case"], res["note"] = c.name, c.note
    return res


def _result_head(c):
    """A case's result dict before any implementation ran."""
    return {"case": c.name, "kind": c.kind, "shape": c.shape(), "note": c.note,
            "params": {"batch": c.batch, "num_heads": c.num_heads,
                       "num_kv_heads": c.num_kv_heads, "head_dim": c.head_dim,
                       "seq": c.seq, "causal": c.causal, "dtype": c.dtype,
                       "page_size": c.page_size if c.kind == "decode" else None,
                       "call": c.call, "layers": c.layers, "features": c.features,
                       "prefix": c.prefix, "share": c.share},
            "flops": c.flops(), "kv_bytes": c.kv_bytes() if c.kind == "decode" else None,
            "impls": {}}


def run_case(c, settings, torch, seed=0):
    """Run every implementation of one case; returns the case's result dict."""
    if c.torch_first:
        return _run_torch_first(c, settings, seed)
    res = _result_head(c)
    rng = np.random.default_rng(seed)
    try:
        impls = BUILDERS[c.kind](c, rng, torch)
    except Exception as e:  # noqa: BLE001 - a case that cannot be built is reported
        status, reason = _status_of(e)
        impls = {name: Skip(reason) if status != "error" else e for name in IMPLS}
    outputs = {}
    for name in IMPLS:
        impl = impls.get(name, Skip("n/a"))
        if isinstance(impl, BaseException):
            status, reason = _status_of(impl)
            res["impls"][name] = {"status": status, "reason": reason}
            continue
        fn, post = impl
        if c.busy and name == "cpuattn":
            try:
                entry, res["busy"], out = _run_busy(c, settings, fn)
            except Exception as e:  # noqa: BLE001 - keep going, report the failure
                status, reason = _status_of(e)
                res["impls"][name] = {"status": status, "reason": reason}
                continue
            res["impls"][name] = entry
            continue
        try:
            times, out = _time_calls(fn, settings)
            outputs[name] = post(out)
        except Exception as e:  # noqa: BLE001 - keep going, report the failure
            status, reason = _status_of(e)
            res["impls"][name] = {"status": status, "reason": reason}
            continue
        med = statistics.median(times)
        entry = {"status": "ok", "median_s": med, "min_s": min(times), "reps": len(times),
                 "times_s": times}
        if c.kind == "decode":
            entry["gbps"] = c.kv_bytes() / med / 1e9
        else:
            entry["gflops"] = c.flops() / med / 1e9
        res["impls"][name] = entry
        del out
    # cpuattn against the others: speed ratios and the largest difference
    mine = res["impls"]["cpuattn"]
    for other in ("torch_sdpa", "torch_paged", "reference"):
        theirs = res["impls"][other]
        if mine["status"] == "ok" and theirs["status"] == "ok":
            res[f"ratio_vs_{other}"] = theirs["median_s"] / mine["median_s"]
    if "cpuattn" in outputs:
        for other in ("reference", "torch_sdpa"):
            if other in outputs:
                err = float(np.max(np.abs(outputs["cpuattn"] - outputs[other]), initial=0.0))
                res["max_abs_diff"] = {"against": other, "value": err}
                break
    return res


def measure_roofline(settings):
    """Read bandwidth and fp32 GEMM throughput at the current thread count."""
    bw = _roofline.read_bandwidth(repeats=settings["roof_repeats"])
    gemm = _roofline.gemm_gflops(n=settings["gemm_n"], repeats=settings["roof_repeats"])
    return {"read_bandwidth": bw, "gemm": gemm}


def _add_roofline_pct(res, roof):
    mine = res["impls"]["cpuattn"]
    if mine["status"] != "ok":
        return
    if "gbps" in mine:
        res["pct_bandwidth_roofline"] = 100.0 * mine["gbps"] / roof["read_bandwidth"]["median_gbps"]
    else:
        res["pct_gemm_roofline"] = 100.0 * mine["gflops"] / roof["gemm"]["median_gflops"]


# --- machine description -----------------------------------------------------

def cpu_model():
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware"):
                    return val.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def openmp_runtimes():
    """OpenMP runtimes loaded in this process, as threadpoolctl sees them."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return [{k: d.get(k) for k in ("prefix", "version", "filepath")}
            for d in threadpool_info() if d.get("user_api") == "openmp"]


def machine_info(torch):
    """Everything needed to read the numbers later."""
    try:
        import ml_dtypes
        mld = ml_dtypes.__version__
    except ImportError:
        mld = None
    return {
        "cpuattn": cpuattn.info(),
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "last_level_cache_bytes": _roofline.last_level_cache_bytes(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__ if torch is not None else None,
        "ml_dtypes": mld,
        "openmp_runtimes": openmp_runtimes(),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "CPUATTN_ISA", "OMP_PROC_BIND",
                                           "OMP_PLACES", "KMP_AFFINITY") if k in os.environ},
    }


# --- the suite ---------------------------------------------------------------

def run_suite(cases=None, threads=None, quick=False, progress=sys.stderr, seed=0):
    """Run the cases at each thread count; returns the JSON-ready result.

    Args:
        cases: list of :class:`Case` (default: all of ``CASES``).
        threads: list of thread counts (default: ``[cpuattn.get_num_threads()]``).
            Each count is applied with ``cpuattn.set_num_threads``,
            ``torch.set_num_threads`` and a BLAS limit (threadpoolctl), and
            the rooflines are measured again at that count.
        quick: smaller time budget and fewer repeats.
        progress: stream for progress lines (None for silence).
    """
    cases = list(CASES) if cases is None else list(cases)
    settings = dict(QUICK if quick else FULL)
    torch = _import_torch()
    before = cpuattn.get_num_threads()
    threads = list(threads) if threads else [before]
    torch_before = torch.get_num_threads() if torch is not None else None

    def say(msg, end="\n"):
        if progress is not None:
            progress.write(msg + end)
            progress.flush()

    result = {"schema": 1, "machine": machine_info(torch),
              "settings": {"quick": bool(quick), "threads": threads, "seed": seed,
                           "cases": [c.name for c in cases], **settings},
              "runs": []}
    try:
        for n in threads:
            cpuattn.set_num_threads(n)
            if torch is not None:
                torch.set_num_threads(n)
            effective = cpuattn.get_num_threads()
            tag = f"[threads={n}] " if len(threads) > 1 else ""
            if effective != n:
                say(f"{tag}warning: asked for {n} threads, cpuattn uses {effective} "
                    "(omp_get_max_threads / CPUs available)")
            if n > cpuattn.info()["usable_cpus"]:
                say(f"{tag}warning: {n} threads > {cpuattn.info()['usable_cpus']} usable CPUs: "
                    "oversubscribed, timings will not mean much")
            say(f"{tag}measuring rooflines (read bandwidth, fp32 GEMM) ...", end=" ")
            t0 = time.perf_counter()
            with _blas_limit(n):
                roof = measure_roofline(settings)
                say(f"{time.perf_counter() - t0:.1f} s")
                run = {"threads": n, "threads_effective": effective,
                       "torch_threads": torch.get_num_threads() if torch is not None else None,
                       "roofline": roof, "results": []}
                for i, c in enumerate(cases, 1):
                    say(f"{tag}[{i}/{len(cases)}] {c.name} ...", end=" ")
                    t0 = time.perf_counter()
                    res = run_case(c, settings, torch, seed)
                    if c.kind == "decode":
                        # the read ceiling again, right after the case: drift
                        # between the suite's start and here cannot give > 100%
                        near = _roofline.read_bandwidth(repeats=settings["roof_repeats"])
                        res["read_roofline_near"] = near
                        _add_roofline_pct(res, {**roof, "read_bandwidth": near})
                    else:
                        _add_roofline_pct(res, roof)
                    run["results"].append(res)
                    st = res["impls"]["cpuattn"]["status"]
                    say(f"{time.perf_counter() - t0:.1f} s" + ("" if st == "ok" else f" (cpuattn: {st})"))
            result["runs"].append(run)
    finally:
        cpuattn.set_num_threads(max(1, before))
        if torch is not None:
            torch.set_num_threads(torch_before)
        _roofline.release()
    return result


class _blas_limit:
    """threadpoolctl's BLAS limit, or nothing when threadpoolctl is missing."""

    def __init__(self, n):
        self.n, self.ctx = n, None

    def __enter__(self):
        try:
            from threadpoolctl import threadpool_limits
            self.ctx = threadpool_limits(limits=self.n, user_api="blas")
        except ImportError:
            pass
        return self

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.restore_original_limits()


# --- output ------------------------------------------------------------------

_SHORT = {"unsupported": "unsupp", "unavailable": "unavail", "skipped": "skip",
          "n/a": "-", "error": "ERROR"}


def _ms(entry):
    if entry["status"] != "ok":
        return _SHORT.get(entry["status"], entry["status"])
    ms = entry["median_s"] * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def _ratio(res, other):
    r = res.get(f"ratio_vs_{other}")
    return "-" if r is None else f"{r:.2f}x"


def format_run(run):
    """A readable table for one thread count."""
    roof = run["roofline"]
    bw, gemm = roof["read_bandwidth"], roof["gemm"]
    lines = [f"threads: {run['threads_effective']} (cpuattn), {run['torch_threads'] or '-'} (torch)",
             f"roofline: read {bw['median_gbps']:.1f} GB/s ({bw['nbytes'] >> 20} MiB array, "
             f"{bw.get('reader', '1 stream')}; decode %roof uses the read measured after each case), "
             f"fp32 GEMM {gemm['median_gflops']:.0f} GFLOP/s (n={gemm['n']}), medians"]
    head = ("case", "shape", "cpuattn ms", "torch ms", "vs torch", "torch-pg ms", "vs pg",
            "ref ms", "cpuattn rate", "%roof", "max|diff|")
    rows = []
    for res in run["results"]:
        im = res["impls"]
        mine = im["cpuattn"]
        if mine["status"] != "ok":
            rate = pct = "-"
        elif "gbps" in mine:
            rate, pct = f"{mine['gbps']:.1f} GB/s", f"{res['pct_bandwidth_roofline']:.0f}%"
        else:
            rate, pct = f"{mine['gflops']:.1f} GFLOP/s", f"{res['pct_gemm_roofline']:.0f}%"
        diff = res.get("max_abs_diff")
        rows.append((res["case"], res["shape"], _ms(mine), _ms(im["torch_sdpa"]),
                     _ratio(res, "torch_sdpa"), _ms(im["torch_paged"]), _ratio(res, "torch_paged"),
                     _ms(im["reference"]), rate, pct,
                     "-" if diff is None else f"{diff['value']:.1e}"))
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    left = {0, 1}

    def fmt(r):
        return "  ".join(str(x).ljust(w) if i in left else str(x).rjust(w)
                         for i, (x, w) in enumerate(zip(r, widths))).rstrip()
    lines += ["", fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    for res in run["results"]:
        b = res.get("busy")
        if b:
            lines += ["", f"{res['case']}: {b['busy_processes']} busy process(es) beside the call: "
                      f"{b['threads']} threads {b['median_s'] * 1e3:.2f} ms, 1 thread "
                      f"{b['median_s_1thread'] * 1e3:.2f} ms, ratio "
                      f"{b['ratio_default_over_1thread']:.2f} (goal <= 1.10)"]
    lines += _low_bit_lines(run)
    lines += _plan_lines(run)
    lines += _feature_lines(run)
    notes = sorted({e["reason"] for res in run["results"] for e in res["impls"].values()
                    if e["status"] in ("error", "unsupported", "unavailable")})
    if notes:
        lines += [""] + [f"  note: {n}" for n in notes]
    return "\n".join(lines)


# issue 13's goals on 2 cores: low-bit pages over bf16 pages, same shape
LOW_BIT_GOAL = {"int8": 1.5, "int4": 1.8, "float8_e4m3fn": 1.3, "float8_e5m2": 1.3}


def _low_bit_lines(run):
    """Speed of each low-bit decode case over the bf16 case of its shape."""
    def key(res):
        p = dict(res["params"])
        p.pop("dtype")
        return tuple(sorted(p.items()))
    base = {key(r): r for r in run["results"]
            if r["kind"] == "decode" and r["params"]["dtype"] == "bfloat16"
            and r["impls"]["cpuattn"]["status"] == "ok"}
    lines = []
    for r in run["results"]:
        dt, mine = r["params"]["dtype"], r["impls"]["cpuattn"]
        b = base.get(key(r)) if dt in LOW_BIT else None
        if b is None or mine["status"] != "ok":
            continue
        ratio = b["impls"]["cpuattn"]["median_s"] / mine["median_s"]
        lines.append(f"{r['case']}: {ratio:.2f}x the speed of bf16 pages "
                     f"({b['impls']['cpuattn']['median_s'] * 1e3:.2f} ms -> "
                     f"{mine['median_s'] * 1e3:.2f} ms; goal >= {LOW_BIT_GOAL[dt]}x on 2 cores)")
    return [""] + lines if lines else []


# issue 14's goals on 2 cores
PLAN_GOAL_US = {"plan": 3.0, "plan_full": 4.0}
STEP_GOAL = 1.05


def _plan_lines(run):
    """PagedPlan.run's call cost, and a step of layers over as many single
    calls of the same shape (the one-layer case of the run)."""
    ok = [r for r in run["results"] if r["kind"] == "decode"
          and r["impls"]["cpuattn"]["status"] == "ok"]

    def single(r):
        p = dict(r["params"], call="paged_attention", layers=1)
        return next((x for x in ok if x["params"] == p), None)
    lines = []
    for r in ok:
        call, med = r["params"].get("call"), r["impls"]["cpuattn"]["median_s"]
        one = single(r)
        if call in PLAN_GOAL_US:
            base = "" if one is None else (f"; paged_attention "
                                           f"{one['impls']['cpuattn']['median_s'] * 1e6:.1f} us")
            lines.append(f"{r['case']}: {med * 1e6:.1f} us per call (goal <= "
                         f"{PLAN_GOAL_US[call]:.0f} us on 2 cores){base}")
        elif r["params"].get("share"):
            priv = next((x for x in ok if x["params"] == dict(r["params"], share=False)), None)
            if priv is not None:
                tp = priv["impls"]["cpuattn"]["median_s"]
                lines.append(f"{r['case']}: {tp / med:.2f}x the speed of {priv['case']} "
                             f"({tp * 1e3:.1f} ms -> {med * 1e3:.1f} ms; goal >= 3x on 2 cores)")
        elif call == "tree" and one is not None:
            t1 = one["impls"]["cpuattn"]["median_s"]
            lines.append(f"{r['case']}: {med * 1e3:.2f} ms = {med / t1:.2f} x one decode step "
                         f"of {one['case']} ({t1 * 1e3:.2f} ms; goal <= 1.5)")
        elif call == "step" and one is not None:
            n, t1 = r["params"]["layers"], one["impls"]["cpuattn"]["median_s"]
            plain = next((x for x in ok if x["params"] == dict(r["params"], call="step_plain")),
                         None)
            also = "" if plain is None else (
                f"; {med / plain['impls']['cpuattn']['median_s']:.3f} x the step as "
                f"{n} paged_attention calls timed together")
            lines.append(f"{r['case']}: {med * 1e3:.1f} ms = {med / (n * t1):.3f} x {n} "
                         f"paged_attention calls of {one['case']} ({t1 * 1e3:.2f} ms each; "
                         f"goal <= {STEP_GOAL}){also}")
    return [""] + lines if lines else []


FEATURE_GOAL = 1.03   # issue 15: sinks or ALiBi over the same call without


def _feature_lines(run):
    """Each sinks / ALiBi case over the same case without them."""
    ok = {tuple(sorted(r["params"].items())): r for r in run["results"]
          if r["impls"]["cpuattn"]["status"] == "ok"}
    lines = []
    for r in run["results"]:
        feat = r["params"].get("features")
        base = ok.get(tuple(sorted(dict(r["params"], features="").items()))) if feat else None
        if base is None or r["impls"]["cpuattn"]["status"] != "ok":
            continue
        t, t0 = r["impls"]["cpuattn"]["median_s"], base["impls"]["cpuattn"]["median_s"]
        lines.append(f"{r['case']}: {t / t0:.3f} x the time of {base['case']} "
                     f"({t0 * 1e3:.2f} -> {t * 1e3:.2f} ms; goal <= {FEATURE_GOAL})")
    return [""] + lines if lines else []


def format_scaling(result):
    """cpuattn (and torch) median time per thread count, with speedups."""
    runs = result["runs"]
    counts = [r["threads_effective"] for r in runs]
    head = ["case"] + [f"{n} thr" for n in counts]
    rows = []
    for i, c in enumerate(result["settings"]["cases"]):
        for impl in ("cpuattn", "torch_sdpa"):
            base, cells = None, []
            for r in runs:
                e = r["results"][i]["impls"][impl]
                if e["status"] != "ok":
                    cells.append(_SHORT.get(e["status"], e["status"]))
                    continue
                base = base or e["median_s"]
                cells.append(f"{e['median_s'] * 1e3:.3g} ms ({base / e['median_s']:.1f}x)")
            rows.append([f"{c} [{impl}]"] + cells)
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    out = ["thread scaling: median time (speedup over the first count)", ""]
    for r in [head] + rows:
        out.append("  ".join(x.ljust(w) if j == 0 else x.rjust(w)
                             for j, (x, w) in enumerate(zip(r, widths))).rstrip())
    return "\n".join(out)


def format_result(result):
    """The whole report: machine line, one table per thread count, scaling."""
    m = result["machine"]
    info = m["cpuattn"]
    parts = [f"cpuattn {info['version']}  simd={info['simd']}  "
             f"openmp={'on' if info['openmp'] else 'off'}  cpu: {m['cpu_model']}  "
             f"torch: {m['torch'] or 'not installed'}  "
             f"ml_dtypes: {m['ml_dtypes'] or 'not installed'}"
             + ("  (quick)" if result["settings"]["quick"] else "")]
    for run in result["runs"]:
        parts.append(format_run(run))
    if len(result["runs"]) > 1:
        parts.append(format_scaling(result))
    parts.append("vs torch = torch time / cpuattn time (> 1: cpuattn faster); %roof = cpuattn "
                 "rate / measured GEMM (prefill, backward) or read bandwidth (decode)")
    return "\n\n".join(parts)


def write_plot(result, path):
    """Save a PNG: ratio vs torch per case, and thread scaling when several
    thread counts were run. Needs matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    runs = result["runs"]
    scaling = len(runs) > 1
    fig, axes = plt.subplots(1, 2 if scaling else 1, figsize=(14 if scaling else 8, 5),
                             squeeze=False)
    last = runs[-1]
    names = [r["case"] for r in last["results"]]
    ax = axes[0][0]
    for i, r in enumerate(last["results"]):
        ratio = r.get("ratio_vs_torch_paged", r.get("ratio_vs_torch_sdpa"))
        if ratio is None:      # say why there is no bar
            st = [e["status"] for e in r["impls"].values() if e["status"] != "ok"]
            ax.text(1.0, i, f" {st[0] if st else 'n/a'}", va="center", fontsize=8)
            continue
        # log scale, bars from 1: right = cpuattn faster, left = slower
        ax.barh(i, ratio - 1.0, left=1.0, color="tab:green" if ratio >= 1 else "tab:red")
    ax.set_yticks(range(len(names)), labels=names)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("torch time / cpuattn time (decode: vs gather + SDPA)")
    ax.set_title(f"cpuattn vs torch, {last['threads_effective']} threads")
    if scaling:
        ax = axes[0][1]
        counts = [r["threads_effective"] for r in runs]
        for i, name in enumerate(result["settings"]["cases"]):
            t = [r["results"][i]["impls"]["cpuattn"].get("median_s") for r in runs]
            if t[0] is None or any(x is None for x in t):
                continue
            ax.plot(counts, [t[0] / x for x in t], marker="o", label=name)
        ax.plot(counts, [n / counts[0] for n in counts], "k--", lw=0.8, label="linear")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xticks(counts, labels=[str(n) for n in counts])
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.set_xlabel("threads")
        ax.set_ylabel(f"cpuattn speedup over {counts[0]} thread(s)")
        ax.set_title("thread scaling")
        ax.legend(fontsize=7)
    fig.suptitle(f"cpuattn {result['machine']['cpuattn']['version']} on "
                 f"{result['machine']['cpu_model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- command line ------------------------------------------------------------

def add_arguments(parser):
    """The ``bench`` options (shared with ``python -m cpuattn bench``)."""
    parser.add_argument("--quick", action="store_true",
                        help="short time budget and fewer repeats (about a minute)")
    parser.add_argument("--cases", metavar="NAME,...",
                        help="comma-separated case names or patterns (e.g. 'decode_*'); "
                             "default: all (see --list)")
    parser.add_argument("--threads", metavar="N,...",
                        help="thread counts to run in turn, e.g. 1,2,4,8,16 (thread scaling); "
                             "default: cpuattn.get_num_threads()")
    parser.add_argument("--json", metavar="FILE", help="write every result to FILE as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="save a plot (needs matplotlib)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the inputs")
    parser.add_argument("--isa", metavar="NAME",
                        help="run cpuattn on this SIMD path (e.g. avx2: a laptop-class CPU's "
                             "kernels on this machine's memory); default: the best one here "
                             "(or CPUATTN_ISA)")


def main(args, parser):
    """Run ``bench`` with parsed ``args``; returns the exit status."""
    if args.list:
        for c in CASES:
            print(f"{c.name:28s} {c.kind:9s} {c.shape():38s} {c.note}")
        return 0
    try:
        cases = select_cases(args.cases)
    except ValueError as e:
        parser.error(str(e))
    threads = None
    if args.threads:
        try:
            threads = [int(x) for x in args.threads.split(",") if x.strip()]
        except ValueError:
            parser.error(f"--threads: expected comma-separated integers, got {args.threads!r}")
        if not threads or min(threads) < 1:
            parser.error(f"--threads: expected integers >= 1, got {args.threads!r}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib, which is not installed "
                         "(pip install matplotlib), or leave out --plot")
    isa_before = _threads.get_isa()
    if args.isa:
        if args.isa not in _threads.supported_isas():
            parser.error(f"--isa: expected one of {_threads.supported_isas()} on this CPU, "
                         f"got {args.isa!r}")
        _threads.set_isa(args.isa)
    try:
        result = run_suite(cases, threads, quick=args.quick, seed=args.seed)
    finally:
        _threads.set_isa(isa_before)
    print(format_result(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"\nwrote {args.json}", file=sys.stderr)
    if args.plot:
        write_plot(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0
