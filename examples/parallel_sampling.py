"""Parallel sampling on a cpuattn.PagePool: one prompt, n samples.

The prompt is appended once, then forked n ways: the forks share the
prompt's pages (reference counted; an append copies a shared partial last
page first), so one paged attention call over the n samples reads the
prompt's pages once for all of them (cpuattn detects the shared pages in the
plan) while every sample's result stays bitwise what it is alone. Each step
runs one plan over the samples, samples a token per sample from a toy
one-layer attention model at its own temperature, and appends the token's
K/V row. Every step is checked against the float64 reference over the
gathered cache, and each sample against the pool call on it alone.

    python examples/parallel_sampling.py --samples 8 --prompt 2048 --steps 16
"""
import argparse
import time

import numpy as np

import cpuattn


class ToyAttentionModel:
    """One attention layer over token embeddings: q, k, v = E[t] W_{q,k,v},
    logits = attention output W_o. K/V rows depend on the token only."""

    def __init__(self, vocab, num_heads, num_kv_heads, head_dim, seed=0):
        rng = np.random.default_rng(seed)
        self.h, self.hkv, self.d = num_heads, num_kv_heads, head_dim
        dm = num_heads * head_dim
        self.embed = rng.standard_normal((vocab, dm)).astype(np.float32)
        self.wq = (rng.standard_normal((dm, dm)) / np.sqrt(dm)).astype(np.float32)
        self.wkv = (rng.standard_normal((2, dm, num_kv_heads * head_dim)) / np.sqrt(dm)).astype(np.float32)
        self.wo = (rng.standard_normal((dm, vocab)) / np.sqrt(dm)).astype(np.float32)

    def qkv(self, tokens):
        """(q (n, H, D), k (n, Hkv, D), v (n, Hkv, D)) of a token array."""
        x = self.embed[tokens]
        k, v = (x @ w for w in self.wkv)
        shape = (len(tokens), self.hkv, self.d)
        return (x @ self.wq).reshape(len(tokens), self.h, self.d), k.reshape(shape), v.reshape(shape)

    def logits(self, attn_out):
        return attn_out.reshape(attn_out.shape[0], -1) @ self.wo


def reference(model, q, pool, seqs):
    """Float64 attention of each sample's query over its gathered cache."""
    outs = []
    for i, s in enumerate(seqs):
        k, v = pool.gather(s)
        o = cpuattn.reference_attention(q[i][None, None].astype(np.float64), k[None].astype(np.float64),
                                        v[None].astype(np.float64), causal=True)
        outs.append(o[0, 0])
    return np.stack(outs)


def run(samples=8, prompt=2048, steps=16, vocab=512, num_heads=8, num_kv_heads=8, head_dim=64,
        page_size=16, seed=0, verbose=True):
    """Generate `steps` tokens for each of `samples` forks of one random
    prompt; returns (tokens (samples, steps), largest difference against
    the float64 reference)."""
    model = ToyAttentionModel(vocab, num_heads, num_kv_heads, head_dim, seed)
    rng = np.random.default_rng(seed + 1)
    pages = -(-prompt // page_size) + samples * (-(-steps // page_size) + 1)
    pool = cpuattn.PagePool(pages, page_size, num_kv_heads, head_dim)
    root = pool.create_sequence()
    prompt_tokens = rng.integers(0, vocab, prompt)
    _, k, v = model.qkv(prompt_tokens)
    pool.append(root, k, v)
    seqs = [root] + [pool.fork(root) for _ in range(samples - 1)]
    temps = np.linspace(0.5, 1.5, samples)   # one temperature per sample
    last = np.full(samples, prompt_tokens[-1])
    out_tokens, worst, spent = np.zeros((samples, steps), np.int64), 0.0, 0.0
    for step in range(steps):
        q, _, _ = model.qkv(last)
        t0 = time.perf_counter()
        with pool.plan(seqs) as plan:   # the prompt's pages are read once for all samples
            out = plan.run(q)
        spent += time.perf_counter() - t0
        worst = max(worst, float(np.abs(out - reference(model, q, pool, seqs)).max()))
        if step == 0:   # batch invariance: each sample alone gives the same bytes
            for i, s in enumerate(seqs):
                assert np.array_equal(out[i:i + 1], pool.attention(q[i:i + 1], [s]))
        logits = model.logits(out) / temps[:, None]
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        last = np.array([rng.choice(vocab, p=row) for row in p])
        out_tokens[:, step] = last
        _, k, v = model.qkv(last)
        for i, s in enumerate(seqs):
            pool.append(s, k[i:i + 1], v[i:i + 1])
    if verbose:
        print(f"{samples} samples of a {prompt}-token prompt, {steps} steps: attention "
              f"{spent / steps * 1e3:.2f} ms per step; largest difference against the float64 "
              f"reference {worst:.1e}; pages in use {pool.num_pages - pool.num_free_pages} "
              f"(private copies would need {samples * -(-(prompt + steps) // page_size)})")
    return out_tokens, worst


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        cpuattn.set_num_threads(args.threads)
    _, worst = run(args.samples, args.prompt, args.steps)
    if worst > 1e-4:
        raise SystemExit(f"difference against the reference too large: {worst:.1e}")


if __name__ == "__main__":
    main()
