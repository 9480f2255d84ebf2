"""Speculative decoding on a cpuattn.PagePool: draft a tree, verify it in one
call with ``tree_mask=``, accept, ``truncate`` the rejected tail.

A toy target model (one attention layer plus a bigram term, K/V rows that
depend on the token only) generates greedily. A cheap draft model (the
bigram term alone, with noise) proposes a tree of tokens after the pending
one: its best `width` tokens, each followed by a chain of its best guesses.
One paged attention call runs every tree node as a query, each seeing the
context and its own ancestors (the tree mask), which gives the target's
greedy token after every node. The longest path the target agrees with is
accepted plus the target's own next token; the cache keeps the accepted
path's rows and drops the rest (``truncate``, then the path's rows where the
tree had put a sibling first). The tokens must be exactly those of plain
greedy decoding with the target, which runs beside it one token per call;
every verify is checked against the float64 reference with the same mask.

    python examples/speculative_verify.py --context 1024 --tokens 48
"""
import argparse

import numpy as np

import cpuattn


class Target:
    """logits(t, o) = E[t] B + o W_o: a bigram term and one attention layer
    whose q, k, v are linear in the token's embedding."""

    def __init__(self, vocab, num_heads, num_kv_heads, head_dim, seed=0):
        rng = np.random.default_rng(seed)
        self.h, self.hkv, self.d = num_heads, num_kv_heads, head_dim
        dm = num_heads * head_dim
        self.embed = rng.standard_normal((vocab, dm)).astype(np.float32)
        self.bigram = (rng.standard_normal((dm, vocab)) / np.sqrt(dm)).astype(np.float32)
        self.wq = (rng.standard_normal((dm, dm)) / np.sqrt(dm)).astype(np.float32)
        self.wkv = (rng.standard_normal((2, dm, num_kv_heads * head_dim)) / np.sqrt(dm)).astype(np.float32)
        self.wo = (0.5 * rng.standard_normal((dm, vocab)) / np.sqrt(dm)).astype(np.float32)
        noise = rng.standard_normal(self.bigram.shape).astype(np.float32)
        self.draft = self.bigram + 0.3 * noise / np.sqrt(dm)   # the draft model's table

    def qkv(self, tokens):
        x = self.embed[tokens]
        kv = [(x @ w).reshape(len(tokens), self.hkv, self.d) for w in self.wkv]
        return (x @ self.wq).reshape(len(tokens), self.h, self.d), kv[0], kv[1]

    def next_tokens(self, tokens, attn_out):
        """The target's greedy token after each of `tokens` given its attention output."""
        logits = self.embed[tokens] @ self.bigram + attn_out.reshape(len(tokens), -1) @ self.wo
        return logits.argmax(axis=1)

    def draft_top(self, token, k):
        return np.argsort(self.embed[token] @ self.draft)[::-1][:k]


def draft_tree(model, pending, width, depth):
    """Nodes (tokens, parent index) of a draft tree rooted at the pending
    token: `width` children of the root, each followed by a chain of
    `depth - 1` greedy draft tokens; depth-first, best child first. Returns
    (tokens, parents, ancestor-or-self mask (n, n) bool)."""
    tokens, parents = [pending], [-1]
    for first in model.draft_top(pending, width):
        tokens.append(int(first))
        parents.append(0)
        for _ in range(depth - 1):
            tokens.append(int(model.draft_top(tokens[-1], 1)[0]))
            parents.append(len(tokens) - 2)
    n = len(tokens)
    mask = np.zeros((n, n), bool)
    for i in range(n):
        j = i
        while j >= 0:
            mask[i, j], j = True, parents[j]
    return np.array(tokens), parents, mask


def verify_reference(q, pool, seq, mask):
    """Float64 attention of the tree's queries: the context, then the tree's mask."""
    k, v = (x.astype(np.float64) for x in pool.gather(seq))
    n, total = len(mask), k.shape[0]
    vis = np.ones((n, total), bool)
    vis[:, total - n:] = mask
    scores = np.einsum("qhd,khd->hqk", q.astype(np.float64),
                       np.repeat(k, q.shape[1] // k.shape[1], axis=1)) / np.sqrt(q.shape[2])
    scores = np.where(vis[None], scores, -np.inf)
    p = np.exp(scores - scores.max(axis=2, keepdims=True))
    p /= p.sum(axis=2, keepdims=True)
    return np.einsum("hqk,khd->qhd", p, np.repeat(v, q.shape[1] // v.shape[1], axis=1))


def run(context=1024, tokens=48, width=2, depth=4, vocab=256, num_heads=8, num_kv_heads=2,
        head_dim=64, page_size=16, seed=0, verbose=True):
    """Generate `tokens` tokens speculatively and plainly; returns
    (speculative tokens, plain tokens, verify calls, accepted paths that were
    not a depth-first prefix of the tree, largest difference against the
    reference)."""
    model = Target(vocab, num_heads, num_kv_heads, head_dim, seed)
    rng = np.random.default_rng(seed + 1)
    pages = 2 * (-(-(context + tokens + width * depth + 1) // page_size) + 2)
    pool = cpuattn.PagePool(pages, page_size, num_kv_heads, head_dim)
    prompt = rng.integers(0, vocab, context)
    spec, plain = pool.create_sequence(), pool.create_sequence()
    _, k, v = model.qkv(prompt[:-1])   # the last prompt token is pending: not cached yet
    for s in (spec, plain):
        pool.append(s, k, v)

    # plain greedy decoding: one query per call
    out_plain, pending = [], prompt[-1]
    while len(out_plain) < tokens:
        q, k, v = model.qkv(np.array([pending]))
        pool.append(plain, k, v)
        pending = int(model.next_tokens(np.array([pending]), pool.attention(q, [plain]))[0])
        out_plain.append(pending)

    # speculative decoding: one tree verify per call
    out_spec, pending, calls, moved, worst = [], prompt[-1], 0, 0, 0.0
    while len(out_spec) < tokens:
        ctx = pool.seq_len(spec)
        toks, parents, mask = draft_tree(model, pending, width, depth)
        q, k, v = model.qkv(toks)
        pool.append(spec, k, v)   # every node's row, in node order
        n = np.array([0, len(toks)], np.int32)
        out = pool.attention(q, [spec], cu_seqlens_q=n, tree_mask=mask.reshape(-1))
        worst = max(worst, float(np.abs(out - verify_reference(q, pool, spec, mask)).max()))
        calls += 1
        want = model.next_tokens(toks, out)   # the target's token after each node
        path = [0]   # accept the children the target agrees with
        while True:
            kids = [i for i, p in enumerate(parents) if p == path[-1] and toks[i] == want[path[-1]]]
            if not kids:
                break
            path.append(kids[0])
        out_spec += [int(toks[i]) for i in path[1:]] + [int(want[path[-1]])]
        pending = out_spec[-1]
        # keep the accepted path's rows: a depth-first prefix of the nodes stays,
        # the rest is truncated away (and the path's later rows written back)
        keep = 0
        while keep < len(path) and path[keep] == keep:
            keep += 1
        pool.truncate(spec, ctx + keep)
        if keep < len(path):
            pool.append(spec, k[path[keep:]], v[path[keep:]])
            moved += 1
    out_spec = out_spec[:tokens]
    if verbose:
        print(f"{tokens} tokens after a {context}-token prompt: {calls} verify calls "
              f"({tokens / calls:.2f} tokens per call) instead of {tokens}; same tokens as plain "
              f"greedy decoding: {out_spec == out_plain}; largest difference against the float64 "
              f"reference {worst:.1e}")
    return out_spec, out_plain, calls, moved, worst


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--width", type=int, default=2)
    ap.add_argument("--depth", type=int, default=4)
    args = ap.parse_args()
    spec, plain, _, _, worst = run(args.context, args.tokens, args.width, args.depth)
    if spec != plain or worst > 1e-4:
        raise SystemExit("speculative decoding differs from plain greedy decoding")


if __name__ == "__main__":
    main()
