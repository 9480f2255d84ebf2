"""A llama-style decode loop on cpuattn with continuous batching.

A small random-weight model (embedding, N x [RMSNorm, GQAttention with RoPE,
RMSNorm, SwiGLU MLP], LM head) serves a queue of requests of different
prompt lengths: requests join the running batch when a slot is free (their
prompt is prefilled in the same step as the others' decode tokens) and leave
when they have generated their tokens. The KV cache is one multi-layer
cpuattn.PagePool (``--cache paged``), run as a serving loop does: each step
reserves the new tokens' slots of every sequence, makes one plan, and each
layer writes its K/V into the slots and runs the plan; or a dense
cpuattn.KVCache per layer with one slot per batch row (``--cache dense``).
At the end every request is checked against a cache-free float64 numpy
forward pass of its whole token sequence.

    python examples/llama_decode.py --cache paged --requests 16 --threads 2
"""
import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

import cpuattn
from cpuattn.layers import GQAttention, rope


def rmsnorm(x, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def silu(x):
    return x / (1.0 + np.exp(-x))


class TinyLlama:
    """Random-weight llama-style decoder; weights in float32."""

    def __init__(self, vocab, d_model, num_layers, num_heads, num_kv_heads, d_ff, seed=0):
        rng = np.random.default_rng(seed)
        self.embed = rng.standard_normal((vocab, d_model)).astype(np.float32)
        self.layers = [GQAttention(d_model, num_heads, num_kv_heads, rope_theta=10000.0,
                                   seed=seed + 1 + i) for i in range(num_layers)]
        self.mlps = [tuple((rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)
                           for s in ((d_model, d_ff), (d_model, d_ff), (d_ff, d_model)))
                     for _ in range(num_layers)]
        self.lm_head = (rng.standard_normal((d_model, vocab)) / np.sqrt(d_model)).astype(np.float32)

    def forward(self, ids, caches, lengths, slots=None):
        """ids (batch, seq) right-padded, lengths (batch,): the new tokens of each
        row; caches: one KVCache per layer, or the step's plan of a
        multi-layer PagePool with the new tokens' reserved slots.
        Returns logits (batch, seq, vocab)."""
        h = self.embed[ids]
        for li, (layer, (w1, w3, w2)) in enumerate(zip(self.layers, self.mlps)):
            if slots is None:
                a, _ = layer(rmsnorm(h), caches[li], lengths=lengths)
            else:
                a, _ = layer(rmsnorm(h), caches, lengths=lengths, slots=slots, layer=li)
            h = h + a
            x = rmsnorm(h)
            h = h + (silu(x @ w1) * (x @ w3)) @ w2
        return rmsnorm(h) @ self.lm_head

    def reference_logits(self, ids):
        """Cache-free float64 forward of one sequence ids (seq,) with the numpy
        reference attention: logits (seq, vocab)."""
        h = self.embed[ids][None].astype(np.float64)
        pos = np.arange(len(ids))[None]
        for layer, mlp in zip(self.layers, self.mlps):
            w1, w3, w2 = (w.astype(np.float64) for w in mlp)
            x = rmsnorm(h)
            nh, nkv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
            q = rope((x @ layer.wq.astype(np.float64)).reshape(1, -1, nh, d), pos, layer.rope_theta)
            k = rope((x @ layer.wk.astype(np.float64)).reshape(1, -1, nkv, d), pos, layer.rope_theta)
            v = (x @ layer.wv.astype(np.float64)).reshape(1, -1, nkv, d)
            o = cpuattn.reference_attention(q, k, v, causal=True)
            h = h + o.reshape(1, -1, nh * d) @ layer.wo.astype(np.float64)
            x = rmsnorm(h)
            h = h + (silu(x @ w1) * (x @ w3)) @ w2
        return (rmsnorm(h) @ self.lm_head.astype(np.float64))[0]


class Progress:
    """tqdm when installed, else a one-line text bar."""

    def __init__(self, total):
        self.total, self.n, self.t0 = total, 0, time.perf_counter()
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="tok")
        except ImportError:
            self.bar = None

    def update(self, n, postfix=""):
        self.n += n
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(n)
            return
        rate = self.n / max(time.perf_counter() - self.t0, 1e-9)
        filled = int(30 * self.n / self.total)
        print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.n}/{self.total} tok "
              f"{rate:7.1f} tok/s {postfix}", end="", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        else:
            print()


KV_DTYPES = {"float32": "float32", "int8": "int8", "int4": "int4", "fp8": "float8_e4m3fn"}


def serve(model, requests, max_batch, cache_kind, page_size, kv="float32"):
    """Continuous batching over `requests` (list of (prompt, max_new_tokens)),
    with the paged cache's pages in `kv` (a KV_DTYPES key). Returns per
    request (generated tokens, their logits) and the decode stats."""
    hkv, d = model.layers[0].num_kv_heads, model.layers[0].head_dim
    if cache_kind == "paged":
        need = sum(-(-(len(p) + n) // page_size) for p, n in requests)
        pool = cpuattn.PagePool(need, page_size, hkv, d, dtype=KV_DTYPES[kv],
                                num_layers=len(model.layers))
    else:
        caches = [layer.new_cache(max_batch, capacity=64) for layer in model.layers]
    waiting = list(range(len(requests)))
    slots = [None] * max_batch          # request index per slot
    seq_ids = {}                        # request -> its sequence id (paged)
    out = {r: ([], []) for r in range(len(requests))}
    progress = Progress(sum(n for _, n in requests))
    t0 = time.perf_counter()
    while waiting or any(s is not None for s in slots):
        for i in range(max_batch):      # join: free slots take waiting requests
            if slots[i] is None and waiting:
                r = waiting.pop(0)
                slots[i] = r
                if cache_kind == "paged":
                    seq_ids[r] = pool.create_sequence()
        # dense: every slot is a batch row (idle rows have 0 tokens);
        # paged: only the active requests are rows
        rows = list(range(max_batch)) if cache_kind == "dense" else \
            [i for i in range(max_batch) if slots[i] is not None]
        feeds = []
        for i in rows:
            r = slots[i]
            if r is None:
                feeds.append([])
            elif not out[r][0]:
                feeds.append(list(requests[r][0]))          # prefill the prompt
            else:
                feeds.append([out[r][0][-1]])               # decode one token
        lengths = np.array([len(f) for f in feeds])
        ids = np.zeros((len(rows), lengths.max()), dtype=np.int64)
        for b, f in enumerate(feeds):
            ids[b, :len(f)] = f
        if cache_kind == "paged":
            # the runner's step: reserve every sequence's new tokens, plan
            # once, then every layer writes its K/V into the slots and runs
            seqs = [seq_ids[slots[i]] for i in rows]
            new = np.concatenate([pool.reserve(s, n) for s, n in zip(seqs, lengths)])
            cu = None if np.all(lengths == 1) else np.concatenate([[0], np.cumsum(lengths)])
            with pool.plan(seqs, cu_seqlens_q=cu) as plan:
                logits = model.forward(ids, plan, lengths, slots=new)
        else:
            logits = model.forward(ids, caches, lengths)
        done = 0
        for b, i in enumerate(rows):
            r = slots[i]
            if r is None:
                continue
            last = logits[b, lengths[b] - 1]
            out[r][0].append(int(np.argmax(last)))
            out[r][1].append(last)
            done += 1
            if len(out[r][0]) == requests[r][1]:        # leave
                slots[i] = None
                if cache_kind == "paged":
                    pool.free_sequence(seq_ids.pop(r))
                else:
                    for c in caches:
                        c.reset([i])
        active = sum(s is not None for s in slots)
        progress.update(done, f"batch {len(rows)} active {active} waiting {len(waiting)}")
    progress.close()
    return out, time.perf_counter() - t0


def report_quality(ref, low, secs, kv):
    """The low-bit run against the float32 pool: the largest logit difference
    over the steps whose context both runs share (until their greedy tokens
    first differ), and how many requests generated other tokens."""
    worst, diverged, total = 0.0, 0, 0
    for r in ref:
        (rt, rl), (lt, ll) = ref[r], low[r]
        total += len(lt)
        for i in range(len(rt)):
            worst = max(worst, float(np.abs(np.asarray(ll[i]) - np.asarray(rl[i])).max()))
            if lt[i] != rt[i]:
                diverged += 1
                break
    print(f"kv {kv}: generated {total} tokens in {secs:.2f} s: {total / secs:.1f} tok/s; "
          f"max |logit diff| vs the float32 pool {worst:.2e} (over shared contexts), "
          f"{diverged} of {len(ref)} requests chose another greedy token")


def main(argv=None):
    has_pool = hasattr(cpuattn, "PagePool")
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", choices=["dense", "paged"], default="paged" if has_pool else "dense")
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1000)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--kv", choices=sorted(KV_DTYPES), default="float32",
                   help="page storage of the paged cache (fp8: float8_e4m3fn); a low-bit "
                        "run is compared with the float32 pool")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-check", action="store_true", help="skip the reference check")
    args = p.parse_args(argv)
    if args.cache == "paged" and not has_pool:
        p.error("--cache paged needs cpuattn.PagePool, not in this build: use --cache dense")
    if args.kv != "float32" and args.cache != "paged":
        p.error("--kv needs --cache paged")
    if args.threads:
        cpuattn.set_num_threads(args.threads)

    rng = np.random.default_rng(args.seed)
    model = TinyLlama(args.vocab, args.d_model, args.layers, args.heads, args.kv_heads,
                      2 * args.d_model, seed=args.seed)
    requests = [(rng.integers(0, args.vocab, rng.integers(4, 48)).tolist(),
                 int(rng.integers(8, 32))) for _ in range(args.requests)]
    print(f"{args.requests} requests, max batch {args.max_batch}, {args.layers} layers, "
          f"d_model {args.d_model}, heads {args.heads}/{args.kv_heads} (q/kv), "
          f"cache {args.cache}, kv {args.kv}, {cpuattn.get_num_threads()} threads")
    # the projections are small matmuls: a BLAS thread team next to cpuattn's
    # threads only oversubscribes the cores
    with threadpool_limits(1, user_api="blas"):
        if args.kv != "float32":
            low, low_secs = serve(model, requests, args.max_batch, args.cache, args.page_size,
                                  args.kv)
        out, secs = serve(model, requests, args.max_batch, args.cache, args.page_size)
    total = sum(len(toks) for toks, _ in out.values())
    print(f"generated {total} tokens in {secs:.2f} s: {total / secs:.1f} tok/s "
          f"(prefill included, float32 pool)")
    if args.kv != "float32":
        report_quality(out, low, low_secs, args.kv)
    if args.no_check:
        return 0
    worst, mismatched = 0.0, 0
    for r, (prompt, _) in enumerate(requests):
        toks, logits = out[r]
        ref = model.reference_logits(np.array(prompt + toks[:-1]))[len(prompt) - 1:]
        worst = max(worst, float(np.abs(np.array(logits) - ref).max()))
        mismatched += int(np.sum(np.argmax(ref, axis=-1) != np.array(toks)))
    ok = worst < 1e-3 and mismatched == 0
    print(f"check vs float64 reference: max |logit diff| {worst:.2e}, "
          f"{mismatched} greedy tokens differ: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
