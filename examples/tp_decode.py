"""Tensor-parallel llama-style decode: heads split across processes.

The random-weight model of ``llama_decode.py`` (embedding, N x [RMSNorm,
GQAttention with RoPE, RMSNorm, SwiGLU MLP], LM head) run Megatron-style
over ``torch.distributed`` (gloo) ranks. Rank r holds query heads ``[r*H/W,
(r+1)*H/W)``, the KV heads they read (``[r*Hkv/W, (r+1)*Hkv/W)``: GQA groups
never straddle ranks, so ``num_kv_heads`` must divide by the rank count), the
matching rows of the output projection and a slice of the MLP's hidden units.
Each rank keeps its own multi-layer ``cpuattn.PagePool`` with only its KV
heads, reserves/plans/writes as a serving loop does, and the partial sums
after the output projection and after the MLP's down projection are added
across ranks by one ``all_reduce`` each. The embedding, norms and LM head are
replicated, so every rank ends a step with the same logits and picks the same
greedy token.

    # 2 local ranks on loopback (spawned), checked against one process
    python examples/tp_decode.py --ranks 2 --threads 1
    # one process per rank, started by hand or by torchrun (env:// rendezvous):
    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python examples/tp_decode.py &
    RANK=1 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python examples/tp_decode.py
"""
import argparse
import datetime
import os
import socket
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from threadpoolctl import threadpool_limits

import cpuattn
from cpuattn.layers import GQAttention

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llama_decode import TinyLlama, rmsnorm, silu  # noqa: E402


class ShardedLlama:
    """Rank ``rank``'s share of a TinyLlama over ``world`` ranks (see the
    module docstring); world 1 is the whole model in one process."""

    def __init__(self, model, rank, world):
        first = model.layers[0]
        h, hkv, d = first.num_heads, first.num_kv_heads, first.head_dim
        d_ff = model.mlps[0][0].shape[1]
        for name, n in (("num_kv_heads", hkv), ("d_ff", d_ff)):
            if n % world:
                raise ValueError(f"{name} ({n}) must be a multiple of the rank count ({world})")
        hs, ks, fs = h // world, hkv // world, d_ff // world
        q_cols = slice(rank * hs * d, (rank + 1) * hs * d)
        kv_cols = slice(rank * ks * d, (rank + 1) * ks * d)
        ff = slice(rank * fs, (rank + 1) * fs)
        self.embed, self.lm_head = model.embed, model.lm_head
        self.num_kv_heads, self.head_dim = ks, d
        self.layers = []
        for layer in model.layers:
            part = GQAttention(layer.d_model, hs, ks, head_dim=d, rope_theta=layer.rope_theta)
            part.wq, part.wk, part.wv = layer.wq[:, q_cols], layer.wk[:, kv_cols], \
                layer.wv[:, kv_cols]
            part.wo = layer.wo[q_cols]
            self.layers.append(part)
        self.mlps = [(w1[:, ff], w3[:, ff], w2[ff]) for w1, w3, w2 in model.mlps]

    def forward(self, ids, plan, lengths, slots, all_reduce):
        """ids (batch, seq) right-padded, lengths (batch,); plan: this step's
        plan over the rank's pool, slots: the new tokens' reserved slots.
        all_reduce(a) sums a (float32, in place) over the ranks.
        Returns logits (batch, seq, vocab), the same on every rank."""
        h = self.embed[ids]
        for li, (layer, (w1, w3, w2)) in enumerate(zip(self.layers, self.mlps)):
            a, _ = layer(rmsnorm(h), plan, lengths=lengths, slots=slots, layer=li)
            h = h + all_reduce(a)                 # this rank's heads' share of o @ wo
            x = rmsnorm(h)
            h = h + all_reduce((silu(x @ w1) * (x @ w3)) @ w2)
        return rmsnorm(h) @ self.lm_head


def all_reduce_sum(a):
    """Sum a float32 numpy array over the ranks in place (torch views the
    same memory; no copy unless a is not contiguous)."""
    a = np.ascontiguousarray(a)
    dist.all_reduce(torch.from_numpy(a))
    return a


def generate(shard, prompts, new_tokens, page_size, all_reduce):
    """Greedy decode of a batch of prompts on one rank: a prefill step, then
    one token per sequence per step. Returns (tokens (batch, new_tokens),
    logits of each generated token (batch, new_tokens, vocab), seconds)."""
    batch = len(prompts)
    need = sum(-(-(len(p) + new_tokens) // page_size) for p in prompts)
    pool = cpuattn.PagePool(need, page_size, shard.num_kv_heads, shard.head_dim,
                            num_layers=len(shard.layers))
    seqs = [pool.create_sequence() for _ in prompts]
    feeds = [list(p) for p in prompts]
    tokens, logits = [], []
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        lengths = np.array([len(f) for f in feeds])
        ids = np.zeros((batch, lengths.max()), dtype=np.int64)
        for b, f in enumerate(feeds):
            ids[b, :len(f)] = f
        # the runner's step: reserve every sequence's new tokens, plan once,
        # then each layer writes its K/V into the slots and runs the plan
        slots = np.concatenate([pool.reserve(s, int(n)) for s, n in zip(seqs, lengths)])
        cu = None if np.all(lengths == 1) else np.concatenate([[0], np.cumsum(lengths)])
        with pool.plan(seqs, cu_seqlens_q=cu) as plan:
            out = shard.forward(ids, plan, lengths, slots, all_reduce)
        last = out[np.arange(batch), lengths - 1]
        logits.append(last)
        tokens.append(np.argmax(last, axis=-1))
        feeds = [[int(t)] for t in tokens[-1]]
    secs = time.perf_counter() - t0
    return np.stack(tokens, 1), np.stack(logits, 1), secs


def build(args):
    """The model and the prompts every rank builds alike from the seed."""
    rng = np.random.default_rng(args.seed)
    model = TinyLlama(args.vocab, args.d_model, args.layers, args.heads, args.kv_heads,
                      2 * args.d_model, seed=args.seed)
    prompts = [rng.integers(0, args.vocab, rng.integers(4, 24)).tolist()
               for _ in range(args.batch)]
    return model, prompts


def run_rank(rank, world, args, result_dir):
    """One rank: join the group, decode, write rank{r}.npz into result_dir."""
    if args.threads:
        cpuattn.set_num_threads(args.threads)
    torch.set_num_threads(1)        # torch only moves the all-reduce buffers
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=args.timeout))
    try:
        model, prompts = build(args)
        shard = ShardedLlama(model, rank, world)
        # the projections are small matmuls: a BLAS thread team beside
        # cpuattn's threads (and the other ranks) only oversubscribes the cores
        with threadpool_limits(1, user_api="blas"):
            tokens, logits, secs = generate(shard, prompts, args.new_tokens, args.page_size,
                                            all_reduce_sum)
        np.savez(os.path.join(result_dir, f"rank{rank}.npz"), tokens=tokens, logits=logits,
                 secs=secs)
    finally:
        dist.destroy_process_group()


def _spawned(rank, world, args, port, result_dir):
    # loopback only: the rendezvous and gloo's own sockets stay on 127.0.0.1
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    run_rank(rank, world, args, result_dir)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local(world, args, timeout):
    """Spawn `world` ranks on loopback and wait at most `timeout` seconds
    (then kill them and raise TimeoutError). Returns each rank's (tokens,
    logits, seconds)."""
    with tempfile.TemporaryDirectory() as result_dir:
        ctx = mp.start_processes(_spawned, args=(world, args, free_port(), result_dir),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                for p in ctx.processes:
                    p.join()
                raise TimeoutError(f"{world} ranks did not finish within {timeout} s")
        results = []
        for r in range(world):
            with np.load(os.path.join(result_dir, f"rank{r}.npz")) as f:
                results.append((f["tokens"], f["logits"], float(f["secs"])))
        return results


def single_process(args):
    """The same decode in this process, unsharded (world 1, no group)."""
    model, prompts = build(args)
    with threadpool_limits(1, user_api="blas"):
        return generate(ShardedLlama(model, 0, 1), prompts, args.new_tokens, args.page_size,
                        lambda a: a)


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2, help="local ranks to spawn (without RANK)")
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=500)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="cpuattn threads per rank")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds before a stuck collective (or the local run) gives up")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    if "RANK" in os.environ:        # launched per rank (by hand, torchrun, a scheduler)
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        with tempfile.TemporaryDirectory() as d:
            run_rank(rank, world, args, d)
        print(f"rank {rank}/{world} done")
        return 0
    results = run_local(args.ranks, args, args.timeout)
    tokens, logits, secs = single_process(args)
    worst = max(float(np.abs(r[1] - logits).max()) for r in results)
    same_tokens = all(np.array_equal(r[0], tokens) for r in results)
    ranks_agree = all(np.array_equal(r[1], results[0][1]) for r in results)
    n = tokens.size
    print(f"{args.ranks} ranks: {n} tokens in {results[0][2]:.2f} s "
          f"({n / results[0][2]:.1f} tok/s); one process: {secs:.2f} s ({n / secs:.1f} tok/s)")
    ok = same_tokens and ranks_agree and worst < 1e-4
    print(f"vs one process: max |logit diff| {worst:.2e}, tokens "
          f"{'equal' if same_tokens else 'DIFFER'}, ranks {'agree' if ranks_agree else 'DIFFER'}"
          f": {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
