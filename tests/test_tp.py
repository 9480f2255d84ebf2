"""Tensor parallelism over torch.distributed (gloo, loopback): the example
examples/tp_decode.py with 2 ranks, each with its own PagePool of half the KV
heads, gives the single-process tokens and logits.

Not bitwise: a rank adds its heads' share of ``o @ wo`` (and of the MLP's
down projection) and the all-reduce adds the shares, where one process does
one GEMM over all heads: the same terms summed in another order (and BLAS
blocks the narrower GEMMs differently), so the logits agree to float32
rounding (~1e-6), and the greedy tokens are equal."""
import importlib
import os
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples")


@pytest.fixture(scope="module")
def tp():
    # on sys.path so that the spawned ranks can import the worker function too
    sys.path.insert(0, os.path.abspath(EXAMPLES))
    try:
        yield importlib.import_module("tp_decode")
    finally:
        sys.path.remove(os.path.abspath(EXAMPLES))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="this torch build has no gloo backend")
def test_two_ranks_equal_one_process(tp):
    args = tp.parser().parse_args(["--batch", "3", "--new-tokens", "6", "--layers", "2",
                                   "--heads", "8", "--kv-heads", "2", "--timeout", "60"])
    # run_local kills the ranks and raises TimeoutError past the deadline
    results = tp.run_local(2, args, timeout=150)
    tokens, logits, _ = tp.single_process(args)
    assert tokens.shape == (3, 6)
    for rank_tokens, rank_logits, _ in results:
        np.testing.assert_array_equal(rank_tokens, tokens)
        np.testing.assert_allclose(rank_logits, logits, rtol=1e-5, atol=1e-5)
    # every rank ends each step with the same bytes (the all-reduce result)
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_single_process_matches_float64_reference(tp):
    """The world-1 path is the model itself: its logits match the example
    model's cache-free float64 forward."""
    args = tp.parser().parse_args(["--batch", "2", "--new-tokens", "4", "--layers", "2"])
    model, prompts = tp.build(args)
    tokens, logits, _ = tp.single_process(args)
    for b, prompt in enumerate(prompts):
        seq = np.array(prompt + tokens[b, :-1].tolist())
        ref = model.reference_logits(seq)[len(prompt) - 1:]
        np.testing.assert_allclose(logits[b], ref, rtol=1e-3, atol=1e-3)


def test_shard_refuses_uneven_split(tp):
    args = tp.parser().parse_args(["--kv-heads", "2"])
    model, _ = tp.build(args)
    with pytest.raises(ValueError, match="num_kv_heads"):
        tp.ShardedLlama(model, 0, 4)


def test_local_run_stops_at_its_deadline(tp):
    args = tp.parser().parse_args([])
    with pytest.raises(TimeoutError, match="did not finish"):
        tp.run_local(2, args, timeout=0.5)


def test_only_the_split_sums_differ(tp):
    """Why the ranks' result is not bitwise the single process's: each rank's
    projections and attention heads are bitwise the single process's slices
    (BLAS computes a column slice alike, cpuattn's heads are independent);
    only the sum of o @ wo over the ranks' halves rounds differently."""
    import cpuattn
    from threadpoolctl import threadpool_limits
    model, _ = tp.build(tp.parser().parse_args([]))
    full = tp.ShardedLlama(model, 0, 1).layers[0]
    parts = [tp.ShardedLlama(model, r, 2).layers[0] for r in range(2)]
    x = np.random.default_rng(0).standard_normal((3, 5, full.d_model)).astype(np.float32)
    d, hs = full.head_dim, parts[0].num_heads
    with threadpool_limits(1, user_api="blas"):
        q, k, v = (x @ w for w in (full.wq, full.wk, full.wv))
        for r, p in enumerate(parts):
            np.testing.assert_array_equal(x @ p.wq, q[..., r * hs * d:(r + 1) * hs * d])
        q, k, v = (a.reshape(3, 5, -1, d) for a in (q, k, v))
        o = cpuattn.attention(q, k, v, causal=True)
        ks = parts[0].num_kv_heads
        halves = [cpuattn.attention(q[:, :, r * hs:(r + 1) * hs], k[:, :, r * ks:(r + 1) * ks],
                                    v[:, :, r * ks:(r + 1) * ks], causal=True) for r in range(2)]
        np.testing.assert_array_equal(np.concatenate(halves, 2), o)
        y = o.reshape(3, 5, -1) @ full.wo
        y2 = sum(h.reshape(3, 5, -1) @ p.wo for h, p in zip(halves, parts))
    np.testing.assert_allclose(y2, y, rtol=1e-5, atol=1e-5)
