"""Shared-prefix decode: sequences of one paged call whose block tables name
the same physical pages at the same positions (a fork, a common system
prompt) run as one decode item that reads those pages once for all of them
(csrc/forward.c cpa_fwd_share). Each sequence's result must stay bitwise what
it is alone, and equal the float64 reference."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cpuattn
from cpuattn import PagedPlan, PagePool
from conftest import randn, ref_paged, tol

LOW = ("int8", "int4", "float8_e4m3fn", "float8_e5m2")


def shared_table(rng, groups, page_size, extra=0):
    """Block table of sequences in groups: a group (prefix, owns, split) is
    len(owns) sequences sharing the pages of its first `prefix` tokens and
    then `owns[i]` tokens of their own. A prefix ending inside a page shares
    that page too (as fork makes it), unless `split`: then each sequence has
    its own copy of that page from the prefix's page start (it diverges
    inside a page). Returns (table int32, seq_lens int32, num_pages)."""
    rows, lens, nxt = [], [], 0
    for prefix, owns, split in groups:
        full = prefix // page_size if split else -(-prefix // page_size)
        shared = list(range(nxt, nxt + full))
        nxt += full
        for own in owns:
            n = prefix + own
            need = -(-n // page_size)
            mine = list(range(nxt, nxt + max(need - full, 0)))
            nxt += len(mine)
            rows.append((shared + mine)[:need])
            lens.append(n)
    width = max(1, max(len(r) for r in rows))
    table = np.zeros((len(rows), width), np.int32)
    order = rng.permutation(nxt + extra)   # pages anywhere in the pool
    for b, r in enumerate(rows):
        table[b, :len(r)] = order[r]
    return table, np.asarray(lens, np.int32), nxt + extra


def fill_pages(rng, num_pages, page_size, hkv, d, dtype=np.float32):
    """Random K and V pages (num_pages, page_size, hkv, d)."""
    return (randn(rng, (num_pages, page_size, hkv, d), dtype),
            randn(rng, (num_pages, page_size, hkv, d), dtype))


def private_copy(arrays, table, lens, page_size):
    """The same token contents with every sequence on pages of its own:
    (copies of each array of pages or page scales, None kept; the table)."""
    need = [-(-int(n) // page_size) for n in lens]
    t = np.zeros_like(table)
    at = 0
    for b, n in enumerate(need):
        t[b, :n] = np.arange(at, at + n)
        at += n
    used = np.concatenate([table[b, :n] for b, n in enumerate(need)] + [np.zeros(1, np.int64)])
    return [None if x is None else x[used] for x in arrays], t


def expect_sharing(table, lens, page_size, hkv, cu=None, window=(-1, -1), **_):
    """Whether two sequences have a decode split of equal keys on the same
    pages (csrc/forward.c: splits of 512 * (8 // min(hkv, 8)) keys; causal)."""
    split = 512 * (8 // min(hkv, 8))
    seen = set()
    for b, n in enumerate(lens):
        nq = 1 if cu is None else int(cu[b + 1] - cu[b])
        if n == 0 or nq == 0:
            continue
        ulo = max(0, n - nq - window[0]) if window[0] >= 0 else 0
        for c in range(ulo // split, (n - 1) // split + 1):
            lo, hi = max(ulo, c * split), min(n - 1, (c + 1) * split - 1)
            key = (lo, hi, tuple(table[b, lo // page_size:hi // page_size + 1]))
            if key in seen:
                return True
            seen.add(key)
    return False


def alone(q, kp, vp, table, lens, cu=None, **opts):
    """Each sequence in a call of its own, concatenated."""
    outs = []
    for b in range(len(lens)):
        if cu is None:
            qb, cub = q[b:b + 1], None
        else:
            qb, cub = q[cu[b]:cu[b + 1]], np.array([0, cu[b + 1] - cu[b]], np.int32)
        outs.append(cpuattn.paged_attention(qb, kp, vp, table[b:b + 1], lens[b:b + 1],
                                            cu_seqlens_q=cub, **opts))
    return np.concatenate(outs)


def check(q, kp, vp, table, lens, cu=None, ref_pages=None, atol_rtol=None, **opts):
    """Shared call == reference, == each sequence alone (bitwise), == the same
    call over private copies (bitwise); returns whether sharing was used
    (checked against expect_sharing)."""
    ps = kp.shape[1]
    plan = PagedPlan(table, lens, page_size=ps, num_pages=kp.shape[0], cu_seqlens_q=cu)
    out = plan.run(q, kp, vp, **opts)
    shared = plan._shared_items[0] > 0
    assert shared == expect_sharing(table, lens, ps, kp.shape[2], cu, **opts), plan._shared_items
    np.testing.assert_array_equal(out, alone(q, kp, vp, table, lens, cu, **opts))
    keys = ("k_scale", "v_scale")
    copies, tp = private_copy([kp, vp] + [opts.get(k) for k in keys], table, lens, ps)
    priv = PagedPlan(tp, lens, page_size=ps, num_pages=copies[0].shape[0], cu_seqlens_q=cu)
    popts = {**opts, **{k: c for k, c in zip(keys, copies[2:]) if k in opts}}
    np.testing.assert_array_equal(out, priv.run(q, copies[0], copies[1], **popts))
    assert priv._shared_items == (0, 0)
    ropts = {k: v for k, v in opts.items() if k not in keys}
    rk, rv = ref_pages if ref_pages is not None else (kp, vp)
    ref, _ = ref_paged(q, rk, rv, table, lens, cu, **ropts)
    np.testing.assert_allclose(out, ref, **(atol_rtol or tol(np.float32)))
    return shared


@pytest.mark.parametrize("prefix", [1, 15, 16, 17, 40, 700, 2047, 2048, 2053, 2064, 4100])
@pytest.mark.parametrize("split", [False, True])
def test_prefix_lengths(rng, prefix, split):
    """Page-aligned prefixes and not, a partial last shared page (split=False)
    or a copy of it per sequence (split=True: they diverge inside a page)."""
    ps, h, hkv, d = 16, 8, 2, 64   # splits of 2048 keys
    table, lens, npg = shared_table(rng, [(prefix, [0, 3, 40, 2100], split)], ps, extra=2)
    kp, vp = fill_pages(rng, npg, ps, hkv, d)
    q = randn(rng, (len(lens), h, d))
    assert check(q, kp, vp, table, lens) or prefix < 2048


@pytest.mark.parametrize("h,hkv,d,ps", [(4, 4, 33, 7), (16, 1, 128, 16), (32, 8, 128, 16),
                                        (6, 3, 80, 32)])
def test_head_layouts_and_many_sequences(rng, h, hkv, d, ps):
    """GQA, MHA, MQA (longer splits), odd head_dim and page size; 20
    sequences sharing one prefix: more rows than one shared item holds."""
    table, lens, npg = shared_table(rng, [(1300, list(rng.integers(0, 300, 20)), False)], ps)
    kp, vp = fill_pages(rng, npg, ps, hkv, d)
    check(randn(rng, (len(lens), h, d)), kp, vp, table, lens)


def test_several_groups_in_one_call(rng):
    """Groups sharing different prefixes, a sequence of its own, an empty
    one, and a group that shares only a short first part."""
    ps, h, hkv, d = 16, 8, 4, 64
    groups = [(600, [5, 70, 1], False), (1100, [300, 0], True), (0, [900], False),
              (0, [0], False), (33, [700, 700, 2], False)]
    table, lens, npg = shared_table(rng, groups, ps, extra=3)
    kp, vp = fill_pages(rng, npg, ps, hkv, d)
    perm = rng.permutation(len(lens))   # groups interleaved in the batch
    table, lens = table[perm], lens[perm]
    q = randn(rng, (len(lens), h, d))
    out, lse = PagedPlan(table, lens, page_size=ps, num_pages=npg).run(q, kp, vp, return_lse=True)
    check(q, kp, vp, table, lens)
    ref, ref_lse = ref_paged(q, kp, vp, table, lens)
    np.testing.assert_allclose(lse, ref_lse, **tol(np.float32))


@pytest.mark.parametrize("opts", [
    dict(window=(300, -1)), dict(softcap=20.0), dict(scale=0.3),
    dict(sinks="yes"), dict(alibi_slopes="yes"), dict(window=(700, -1), softcap=5.0),
])
def test_options(rng, opts):
    ps, h, hkv, d = 16, 8, 2, 64
    table, lens, npg = shared_table(rng, [(1500, [0, 10, 10, 100], False)], ps)
    kp, vp = fill_pages(rng, npg, ps, hkv, d)
    opts = dict(opts)
    for key in ("sinks", "alibi_slopes"):
        if key in opts:
            opts[key] = np.abs(randn(rng, (h,))) * (0.05 if key == "alibi_slopes" else 1)
    check(randn(rng, (len(lens), h, d)), kp, vp, table, lens, **opts)


def test_queries_per_sequence(rng):
    """cu_seqlens_q with a few queries each (still the decode kernel: g * nq
    <= 8), mixed with single-query sequences sharing the same pages."""
    ps, h, hkv, d = 16, 4, 2, 64
    table, lens, npg = shared_table(rng, [(1200, [4, 9, 30, 2, 50], False)], ps)
    kp, vp = fill_pages(rng, npg, ps, hkv, d)
    nq = np.array([1, 4, 2, 1, 3])
    cu = np.concatenate([[0], np.cumsum(nq)]).astype(np.int32)
    q = randn(rng, (int(cu[-1]), h, d))
    check(q, kp, vp, table, lens, cu=cu)
    check(q, kp, vp, table, lens, cu=cu, window=(100, -1))


@pytest.mark.parametrize("kt,vt", [("bfloat16", "bfloat16"), ("float16", "float16"),
                                   ("int8", "int4"), ("float8_e4m3fn", "float8_e5m2")])
def test_page_dtypes(rng, kt, vt):
    ps, h, hkv, d = 16, 8, 2, 64
    table, lens, npg = shared_table(rng, [(1100, [0, 17, 300], False)], ps)
    kp, vp = fill_pages(rng, npg, ps, hkv, d)
    stored, ref, scales = [], [], []
    for pages, t in ((kp, kt), (vp, vt)):
        if t in LOW:
            codes, scale = cpuattn.quantize_kv(pages, t)
            stored.append(codes)
            scales.append(scale)
            ref.append(cpuattn.dequantize_kv(codes, scale, t))
        else:
            import ml_dtypes   # noqa: F401 (bfloat16 dtype)
            stored.append(pages.astype(t))
            scales.append(None)
            ref.append(stored[-1].astype(np.float64))
    q = randn(rng, (len(lens), h, d))
    check(q, stored[0], stored[1], table, lens, ref_pages=ref, atol_rtol=dict(atol=2e-4, rtol=2e-4),
          k_scale=scales[0], v_scale=scales[1])


def test_threads_and_isas(rng, threads, each_isa):
    """The same bytes at 1, 2 and 3 threads on every SIMD path, and each
    sequence alone."""
    ps, h, hkv, d = 16, 8, 2, 72
    table, lens, npg = shared_table(rng, [(2100, [0, 5, 600], False), (700, [3, 3], True)], ps)
    kp, vp = fill_pages(rng, npg, ps, hkv, d)
    q = randn(rng, (len(lens), h, d))
    outs = []
    for nt in (1, 2, 3):
        threads(nt)
        outs.append(PagedPlan(table, lens, page_size=ps, num_pages=npg).run(q, kp, vp))
    for o in outs[1:]:
        np.testing.assert_array_equal(outs[0], o)
    np.testing.assert_array_equal(outs[0], alone(q, kp, vp, table, lens))


def test_fork_n_ways(rng):
    """A pool prompt forked n ways (parallel sampling): each fork appends
    its own tokens; pool.attention and pool.plan equal the reference, and
    each sequence's result is bitwise that of the pool call on it alone."""
    hkv, h, d, ps = 8, 16, 64, 16   # splits of 512 keys: the first is shared
    pool = PagePool(200, ps, hkv, d)
    root = pool.create_sequence()
    pool.append(root, randn(rng, (1000, hkv, d)), randn(rng, (1000, hkv, d)))
    seqs = [root] + [pool.fork(root) for _ in range(5)]
    for i, s in enumerate(seqs):
        if i:
            pool.append(s, randn(rng, (3 * i, hkv, d)), randn(rng, (3 * i, hkv, d)))
    q = randn(rng, (len(seqs), h, d))
    with pool.plan(seqs) as plan:
        out = plan.run(q)
        assert plan._shared_items[0] > 0
    np.testing.assert_array_equal(out, pool.attention(q, seqs))
    for i, s in enumerate(seqs):
        np.testing.assert_array_equal(out[i:i + 1], pool.attention(q[i:i + 1], [s]))
        k, v = pool.gather(s)
        ref = cpuattn.reference_attention(q[i][None, None].astype(np.float64), k[None].astype(np.float64),
                                          v[None].astype(np.float64), causal=True)
        np.testing.assert_allclose(out[i], ref[0, 0], **tol(np.float32))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), ps=st.sampled_from([1, 4, 16, 32]),
       hkv=st.sampled_from([1, 2, 8]), g=st.sampled_from([1, 2, 4, 8]),
       d=st.sampled_from([16, 40, 64]), batch=st.integers(1, 9),
       window=st.sampled_from([-1, 50, 400]))
def test_fuzz_random_block_tables(seed, ps, hkv, g, d, batch, window):
    """Random block tables where each page position either reuses the page
    an earlier sequence has there or takes a fresh one; random lengths."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(0, 1400, batch).astype(np.int32)
    width = max(1, -(-int(lens.max()) // ps))
    table = np.zeros((batch, width), np.int32)
    nxt = 0
    for b in range(batch):
        for j in range(width):
            if b and rng.random() < 0.8:
                table[b, j] = table[rng.integers(0, b), j]
            else:
                table[b, j] = nxt
                nxt += 1
    kp, vp = fill_pages(rng, nxt, ps, hkv, d)
    q = randn(rng, (batch, hkv * g, d))
    opts = dict(window=(window, -1))
    out = PagedPlan(table, lens, page_size=ps, num_pages=nxt).run(q, kp, vp, **opts)
    np.testing.assert_array_equal(out, alone(q, kp, vp, table, lens, **opts))
    ref, _ = ref_paged(q, kp, vp, table, lens, **opts)
    np.testing.assert_allclose(out, ref, **tol(np.float32))


def test_tree_masks_on_shared_pages(rng):
    """Sequences on the very same pages verifying different draft trees
    (decode kernel: g * n_b <= 8): one shared item, each row with its own
    sequence's tree."""
    from test_tree import random_tree, tree_reference
    ps, h, hkv, d = 16, 4, 2, 64
    table, lens, npg = shared_table(rng, [(2100, [0, 0, 0], False), (2100, [0], False)], ps)
    kp, vp = fill_pages(rng, npg, ps, hkv, d)
    nq = [4, 3, 1, 2]
    cu = np.concatenate([[0], np.cumsum(nq)]).astype(np.int32)
    trees = [random_tree(rng, n) for n in nq]
    flat = np.concatenate([t.reshape(-1) for t in trees])
    q = randn(rng, (int(cu[-1]), h, d))
    plan = PagedPlan(table, lens, page_size=ps, num_pages=npg, cu_seqlens_q=cu, tree_mask=flat)
    out = plan.run(q, kp, vp)
    assert plan._shared_items[0] > 0
    at = 0
    for b in range(len(lens)):
        n = nq[b]
        one = cpuattn.paged_attention(q[cu[b]:cu[b + 1]], kp, vp, table[b:b + 1], lens[b:b + 1],
                                      cu_seqlens_q=np.array([0, n], np.int32),
                                      tree_mask=flat[at:at + n * n])
        np.testing.assert_array_equal(out[cu[b]:cu[b + 1]], one)
        at += n * n
    np.testing.assert_allclose(out, tree_reference(q, kp, vp, table, lens, cu, trees),
                               **tol(np.float32))
