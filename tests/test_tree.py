"""Speculative-decoding tree masks over paged KV (tree_mask=)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cpuattn
from cpuattn import DTypeError, PagedPlan, PagePool, ShapeError
from cpuattn.reference import attend, visible_mask
from conftest import make_pages, randn, tol


def random_tree(rng, n):
    """Ancestor-or-self masks of a random tree of n draft tokens (node i's
    parent comes before it)."""
    parent = [-1] + [int(rng.integers(0, i)) for i in range(1, n)]
    m = np.zeros((n, n), bool)
    for i in range(n):
        j = i
        while j >= 0:
            m[i, j] = True
            j = parent[j]
    return m


def tree_reference(q, kp, vp, bt, lens, cu, trees, window=(-1, -1), softcap=0.0):
    k = cpuattn.gather_pages(kp, bt, lens)
    v = cpuattn.gather_pages(vp, bt, lens)
    d = q.shape[-1]
    outs = []
    for b, n in enumerate(lens):
        nq = cu[b + 1] - cu[b]
        mask = visible_mask(nq, n, True, window)
        mask[:, n - nq:] &= trees[b]
        o, _ = attend(q[cu[b]:cu[b + 1]], k[b, :n], v[b, :n], mask, 1 / np.sqrt(d), softcap)
        outs.append(o)
    return np.concatenate(outs)


def case(rng, lens, nq, ps, hkv, d, kv=np.float32):
    kp, vp, bt, sl = make_pages(rng, lens, ps, hkv, d)
    cu = np.concatenate([[0], np.cumsum(nq)]).astype(np.int32)
    trees = [random_tree(rng, n) for n in nq]
    flat = np.concatenate([t.reshape(-1) for t in trees]) if trees else np.zeros(0, bool)
    return kp.astype(kv), vp.astype(kv), bt, sl, cu, trees, flat


@pytest.mark.parametrize("lens,nq,h,hkv,d", [
    ([40, 9, 700], [5, 1, 16], 8, 2, 64),     # 16 rows per kv head: the tiled kernel
    ([30, 12], [3, 8], 2, 2, 33),             # 1-8 rows per kv head: the decode kernel
    ([16], [16], 4, 1, 128),                  # the whole sequence is the draft
])
def test_random_trees_against_reference(rng, lens, nq, h, hkv, d):
    kp, vp, bt, sl, cu, trees, flat = case(rng, lens, nq, 16, hkv, d)
    q = randn(rng, (int(cu[-1]), h, d))
    for opts in (dict(), dict(window=(20, -1), softcap=15.0)):
        out = cpuattn.paged_attention(q, kp, vp, bt, sl, cu_seqlens_q=cu, tree_mask=flat, **opts)
        np.testing.assert_allclose(out, tree_reference(q, kp, vp, bt, sl, cu, trees, **opts),
                                   **tol(np.float32))


def test_chain_equals_causal_bitwise(rng):
    kp, vp, bt, sl, cu, _, _ = case(rng, [100, 37], [7, 16], 16, 2, 64)
    chain = np.concatenate([np.tril(np.ones((n, n), bool)).reshape(-1) for n in (7, 16)])
    q = randn(rng, (23, 8, 64))
    a = cpuattn.paged_attention(q, kp, vp, bt, sl, cu_seqlens_q=cu, tree_mask=chain,
                                return_lse=True)
    b = cpuattn.paged_attention(q, kp, vp, bt, sl, cu_seqlens_q=cu, return_lse=True)
    for x, y in zip(a, b):
        assert x.tobytes() == y.tobytes()


def test_hidden_draft_values_never_leak(rng):
    # two branches: token 2's value is NaN, query 1 (the other branch) must not see it
    kp, vp, bt, sl, cu, _, _ = case(rng, [20], [3], 8, 1, 16)
    tree = np.array([[1, 0, 0], [1, 1, 0], [1, 0, 1]], bool)
    page, slot = bt[0, 19 // 8], 19 % 8
    vp[page, slot] = np.nan
    kp[page, slot] = np.inf
    q = randn(rng, (3, 2, 16))
    out = cpuattn.paged_attention(q, kp, vp, bt, sl, cu_seqlens_q=cu, tree_mask=tree.reshape(-1))
    assert np.isfinite(out[:2]).all() and np.isnan(out[2]).all()


def test_low_bit_pages_and_pool_plan(rng):
    pool = PagePool(20, 16, 2, 64, k_dtype="int8", v_dtype="int4")
    seqs = [pool.create_sequence() for _ in range(2)]
    for s, n in zip(seqs, (50, 9)):
        pool.append(s, randn(rng, (n, 2, 64)), randn(rng, (n, 2, 64)))
    trees = [random_tree(rng, 6), random_tree(rng, 3)]
    flat = np.concatenate([t.reshape(-1) for t in trees])
    cu = np.array([0, 6, 9], np.int32)
    q = randn(rng, (9, 8, 64))
    with pool.plan(seqs, cu_seqlens_q=cu, tree_mask=flat) as plan:
        out = plan.run(q)
    assert out.tobytes() == pool.attention(q, seqs, cu_seqlens_q=cu, tree_mask=flat).tobytes()
    for b, s in enumerate(seqs):
        k, v = pool.gather(s)
        nq = cu[b + 1] - cu[b]
        mask = visible_mask(nq, len(k), True, (-1, -1))
        mask[:, len(k) - nq:] &= trees[b]
        ref, _ = attend(q[cu[b]:cu[b + 1]], k, v, mask, 1 / 8, 0.0)
        np.testing.assert_allclose(out[cu[b]:cu[b + 1]], ref, **tol(np.float32))


def test_threads_and_batch_invariance(rng, threads):
    kp, vp, bt, sl, cu, trees, flat = case(rng, [1200, 30, 7], [16, 4, 2], 16, 2, 64)
    q = randn(rng, (22, 8, 64))
    runs = []
    for n in (1, 2, 3):
        threads(n)
        runs.append(cpuattn.paged_attention(q, kp, vp, bt, sl, cu_seqlens_q=cu, tree_mask=flat))
    assert runs[0].tobytes() == runs[1].tobytes() == runs[2].tobytes()
    alone = cpuattn.paged_attention(q[16:20], kp, vp, bt[1:2], sl[1:2],
                                    cu_seqlens_q=np.array([0, 4], np.int32),
                                    tree_mask=trees[1].reshape(-1))
    assert alone.tobytes() == runs[0][16:20].tobytes()


def test_malformed_trees_raise(rng):
    kp, vp, bt, sl, cu, trees, flat = case(rng, [20, 10], [3, 2], 8, 1, 16)
    q = randn(rng, (5, 2, 16))
    n = kp.shape[0]
    with pytest.raises(ShapeError, match=r"tree_mask: expected shape \(13,\)"):
        PagedPlan(bt, sl, page_size=8, num_pages=n, cu_seqlens_q=cu, tree_mask=flat[:-1])
    with pytest.raises(DTypeError, match="tree_mask"):
        PagedPlan(bt, sl, page_size=8, num_pages=n, cu_seqlens_q=cu, tree_mask=flat.astype(int))
    bad = flat.copy()
    bad[0] = False
    with pytest.raises(ShapeError, match=r"M\[0, 0\]"):
        PagedPlan(bt, sl, page_size=8, num_pages=n, cu_seqlens_q=cu, tree_mask=bad)
    bad = flat.copy()
    bad[9 + 1] = True     # sequence 1, query 0 sees draft token 1
    with pytest.raises(ShapeError, match=r"sequence 1.*M\[0, 1\]"):
        PagedPlan(bt, sl, page_size=8, num_pages=n, cu_seqlens_q=cu, tree_mask=bad)
    with pytest.raises(ShapeError, match="cu_seqlens_q"):
        PagedPlan(bt, sl, page_size=8, num_pages=n, tree_mask=flat)
    plan = PagedPlan(bt, sl, page_size=8, num_pages=n, cu_seqlens_q=cu, tree_mask=flat)
    with pytest.raises(ShapeError, match="causal"):
        plan.run(q, kp, vp, causal=False)


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_fuzz_trees(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    batch = data.draw(st.integers(1, 3))
    nq = [data.draw(st.integers(1, 16)) for _ in range(batch)]
    lens = [n + data.draw(st.integers(0, 90)) for n in nq]
    hkv = data.draw(st.integers(1, 2))
    h = hkv * data.draw(st.sampled_from([1, 2, 4]))
    d = data.draw(st.sampled_from([8, 33]))
    kp, vp, bt, sl, cu, trees, flat = case(rng, lens, nq, data.draw(st.sampled_from([1, 5, 16])),
                                           hkv, d)
    q = randn(rng, (int(cu[-1]), h, d))
    window = (data.draw(st.integers(-1, 40)), -1)
    out = cpuattn.paged_attention(q, kp, vp, bt, sl, cu_seqlens_q=cu, tree_mask=flat,
                                  window=window)
    np.testing.assert_allclose(out, tree_reference(q, kp, vp, bt, sl, cu, trees, window),
                               **tol(np.float32))
