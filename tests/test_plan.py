"""The runner-grade paged API: PagedPlan, pool plans, the multi-layer pool,
reserve / write, and the functional store write_kv."""
import gc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cpuattn
from cpuattn import DTypeError, PagedPlan, PagePool, PageError, PoolFullError, ShapeError
from conftest import BF16, make_pages, randn, ref_paged, tol

LOW = ("int8", "int4", "float8_e4m3fn", "float8_e5m2")


def bits(a):
    a = np.ascontiguousarray(a)
    return a.view(np.uint8).tobytes()


def same(a, b):
    if isinstance(a, tuple):
        return all(same(x, y) for x, y in zip(a, b))
    return a.shape == b.shape and a.dtype == b.dtype and bits(a) == bits(b)


def chunk_cu(rng, lens):
    nq = [int(rng.integers(0, n + 1)) for n in lens]
    return np.concatenate([[0], np.cumsum(nq)]).astype(np.int32)


# ---- PagedPlan: the reference sweep and paged_attention's bytes ----

SHAPES = [  # (seq_lens, page_size, num_heads, num_kv_heads, head_dim)
    ([1], 1, 1, 1, 1),
    ([0, 5, 17], 4, 6, 2, 33),
    ([63, 64, 65], 16, 7, 7, 40),
    ([513, 2], 16, 8, 1, 80),
    ([3, 0], 3, 9, 3, 96),
]


@pytest.mark.parametrize("lens,ps,h,hkv,d", SHAPES)
@pytest.mark.parametrize("form", ["decode", "chunked"])
def test_run_matches_reference_and_paged_attention(rng, lens, ps, h, hkv, d, form):
    kp, vp, bt, sl = make_pages(rng, lens, ps, hkv, d)
    cu = chunk_cu(rng, lens) if form == "chunked" else None
    nq = len(lens) if cu is None else int(cu[-1])
    q = randn(rng, (nq, h, d))
    opts = dict(window=(7, -1), softcap=0.0) if form == "chunked" else dict(softcap=30.0)
    plan = PagedPlan(bt, sl, page_size=ps, num_pages=kp.shape[0], cu_seqlens_q=cu)
    assert (plan.batch_size, plan.num_queries) == (len(lens), nq)
    out, lse = plan.run(q, kp, vp, return_lse=True, **opts)
    ref, ref_lse = ref_paged(q, kp, vp, bt, sl, cu, **opts)
    np.testing.assert_allclose(out, ref, **tol(np.float32))
    fin = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isfinite(lse), fin)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], atol=2e-5, rtol=2e-5)
    want = cpuattn.paged_attention(q, kp, vp, bt, sl, cu_seqlens_q=cu, return_lse=True, **opts)
    assert same((out, lse), want)
    # the same plan again, and with out= (written in place, returned)
    buf = np.full_like(out, np.nan)
    got = plan.run(q, kp, vp, return_lse=True, out=buf, **opts)
    assert got[0] is buf and same(got, want)


@pytest.mark.parametrize("kt,vt", [("int8", "int4"), ("float8_e4m3fn", "float8_e5m2"),
                                   ("int4", "float16"), ("bfloat16", "int8")])
def test_run_over_low_bit_pages(rng, kt, vt):
    lens, ps, h, hkv, d = [9, 40], 8, 4, 2, 64
    kp, vp, bt, sl = make_pages(rng, lens, ps, hkv, d, spare=0)
    stored = []
    for pages, t in ((kp, kt), (vp, vt)):
        if t in LOW:
            codes, scale = cpuattn.quantize_kv(pages, t)
            stored.append((codes, scale, cpuattn.dequantize_kv(codes, scale, t)))
        else:
            s = pages.astype(BF16 if t == "bfloat16" else np.dtype(t))
            stored.append((s, None, s.astype(np.float32)))
    (kc, ks, kf), (vc, vs, vf) = stored
    cu = np.array([0, 3, 8], np.int32)
    q = randn(rng, (8, h, d))
    plan = PagedPlan(bt, sl, page_size=ps, num_pages=kp.shape[0], cu_seqlens_q=cu)
    out = plan.run(q, kc, vc, k_scale=ks, v_scale=vs)
    np.testing.assert_allclose(out, ref_paged(q, kf, vf, bt, sl, cu)[0], **tol(np.float32))
    assert same(out, cpuattn.paged_attention(q, kc, vc, bt, sl, cu_seqlens_q=cu, k_scale=ks,
                                             v_scale=vs))


def test_plan_keeps_its_own_copies(rng):
    kp, vp, bt, sl = make_pages(rng, [20, 7], 4, 2, 16)
    q = randn(rng, (2, 4, 16))
    plan = PagedPlan(bt, sl, page_size=4, num_pages=kp.shape[0])
    want = plan.run(q, kp, vp)
    bt[:] = 10**6        # out of range: the plan must not read these
    sl[:] = 10**6
    assert same(plan.run(q, kp, vp), want)
    tab = plan.block_table
    tab[:] = -5          # the attribute is a copy too
    assert same(plan.run(q, kp, vp), want)


def test_general_inputs_give_the_plain_bytes(rng):
    # strided q, int64 index arrays, a non-contiguous out, a numpy-scalar
    # scale, Fortran pages: the general checks hand back the same call
    kp, vp, bt, sl = make_pages(rng, [12, 30], 8, 2, 32)
    q = randn(rng, (2, 4, 32))
    plan = PagedPlan(bt, sl, page_size=8, num_pages=kp.shape[0])
    want = plan.run(q, kp, vp, scale=0.3, window=(5, 0))
    plan64 = PagedPlan(bt.astype(np.int64), sl.astype(np.uint16), page_size=np.int64(8),
                       num_pages=kp.shape[0])
    qs = np.repeat(q, 2, axis=1)[:, ::2]
    out = np.zeros((2, 8, 32), np.float32)[:, ::2]
    got = plan64.run(qs, np.asfortranarray(kp), vp, scale=np.float32(0.3),
                     window=(np.int64(5), 0), out=out)
    assert got is out
    np.testing.assert_array_equal(got, want)


def test_replans_for_other_heads_and_masks(rng):
    kp, vp, bt, sl = make_pages(rng, [600, 3], 16, 4, 16)
    plan = PagedPlan(bt, sl, page_size=16, num_pages=kp.shape[0])
    for h, opts in ((4, {}), (16, {}), (16, dict(window=(100, 0))), (4, dict(causal=False))):
        q = randn(rng, (2, h, 16))
        assert same(plan.run(q, kp, vp, **opts), cpuattn.paged_attention(q, kp, vp, bt, sl, **opts))


def test_bitwise_across_threads_and_batch_invariant(rng, threads):
    kp, vp, bt, sl = make_pages(rng, [1500, 40, 1], 16, 2, 64)
    cu = np.array([0, 1, 9, 10], np.int32)
    q = randn(rng, (10, 8, 64))
    plan = PagedPlan(bt, sl, page_size=16, num_pages=kp.shape[0], cu_seqlens_q=cu)
    outs = []
    for n in (1, 2, 3):
        threads(n)
        outs.append(plan.run(q, kp, vp, return_lse=True))
    assert same(outs[0], outs[1]) and same(outs[0], outs[2])
    alone = PagedPlan(bt[1:2], sl[1:2], page_size=16, num_pages=kp.shape[0],
                      cu_seqlens_q=np.array([0, 8], np.int32))
    o, l = alone.run(q[1:9], kp, vp, return_lse=True)
    assert bits(o) == bits(outs[0][0][1:9]) and bits(l) == bits(outs[0][1][:, 1:9])


def test_bad_input_names_the_argument(rng):
    kp, vp, bt, sl = make_pages(rng, [5, 9], 4, 2, 8)
    n = kp.shape[0]
    with pytest.raises(PageError, match=r"block_table\[1, 0\]"):
        PagedPlan(np.array([[0, 1, 2], [n, 0, 0]], np.int32), sl, page_size=4, num_pages=n)
    with pytest.raises(ShapeError, match="seq_lens"):
        PagedPlan(bt, np.array([5, 900], np.int32), page_size=4, num_pages=n)
    with pytest.raises(ShapeError, match="cu_seqlens_q"):
        PagedPlan(bt, sl, page_size=4, num_pages=n, cu_seqlens_q=np.array([0, 6, 7], np.int32))
    with pytest.raises(ShapeError, match="page_size"):
        PagedPlan(bt, sl, page_size=0, num_pages=n)
    with pytest.raises(ShapeError, match="num_pages"):
        PagedPlan(bt, sl, page_size=4, num_pages="7")
    with pytest.raises(DTypeError, match="block_table"):
        PagedPlan(bt.astype(np.float32), sl, page_size=4, num_pages=n)
    with pytest.raises(ShapeError, match="tree_mask: needs cu_seqlens_q"):
        PagedPlan(bt, sl, page_size=4, num_pages=n, tree_mask=np.ones(2, bool))
    plan = PagedPlan(bt, sl, page_size=4, num_pages=n)
    q = randn(rng, (2, 4, 8))
    with pytest.raises(ShapeError, match="k_pages.*planned"):
        plan.run(q, kp[:-1], vp[:-1])
    with pytest.raises(ShapeError, match="k_pages.*planned"):
        plan.run(q, kp.reshape(n * 2, 2, 2, 8), vp.reshape(n * 2, 2, 2, 8))
    with pytest.raises(ShapeError, match="q: expected one query per sequence"):
        plan.run(q[:1], kp, vp)
    with pytest.raises(ShapeError, match="out"):
        plan.run(q, kp, vp, out=np.empty((2, 4, 7), np.float32))
    with pytest.raises(DTypeError, match="out"):
        plan.run(q, kp, vp, out=np.empty((2, 4, 8), np.float64))
    with pytest.raises(ShapeError, match="out: must not overlap k_pages"):
        plan.run(q, kp, vp, out=kp.reshape(-1)[:64].reshape(2, 4, 8))
    ro = np.empty((2, 4, 8), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ShapeError, match="writable"):
        plan.run(q, kp, vp, out=ro)
    with pytest.raises(ShapeError, match="k_scale"):
        plan.run(q, kp, vp, k_scale=np.ones((n, 4, 2), np.float32))
    with pytest.raises(ShapeError, match="scale"):
        plan.run(q, kp, vp, scale=float("nan"))
    with pytest.raises(ShapeError, match="window"):
        plan.run(q, kp, vp, window=(-2, 0))
    with pytest.raises(ShapeError, match="sinks"):
        plan.run(q, kp, vp, sinks=np.zeros(3, np.float32))
    with pytest.raises(DTypeError, match="alibi_slopes"):
        plan.run(q, kp, vp, alibi_slopes=np.zeros(4, np.int64))
    # in place over q is allowed, as for paged_attention
    qq = q.copy()
    want = plan.run(q, kp, vp)
    assert plan.run(qq, kp, vp, out=qq) is qq and same(qq, want)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_fuzz_plan_equals_paged_attention(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    batch = data.draw(st.integers(0, 4))
    lens = data.draw(st.lists(st.integers(0, 70), min_size=batch, max_size=batch))
    ps = data.draw(st.sampled_from([1, 2, 5, 16]))
    hkv = data.draw(st.integers(1, 3))
    h = hkv * data.draw(st.integers(1, 4))
    d = data.draw(st.sampled_from([1, 7, 16, 33]))
    kp, vp, bt, sl = make_pages(rng, lens, ps, hkv, d)
    cu = chunk_cu(rng, lens) if data.draw(st.booleans()) else None
    nq = batch if cu is None else int(cu[-1])
    q = randn(rng, (nq, h, d))
    opts = dict(causal=data.draw(st.booleans()),
                window=(data.draw(st.integers(-1, 20)), data.draw(st.integers(-1, 3))),
                softcap=data.draw(st.sampled_from([0.0, 5.0])), return_lse=True)
    plan = PagedPlan(bt, sl, page_size=ps, num_pages=kp.shape[0], cu_seqlens_q=cu)
    got = plan.run(q, kp, vp, **opts)
    assert same(got, cpuattn.paged_attention(q, kp, vp, bt, sl, cu_seqlens_q=cu, **opts))
    if nq:
        ref, _ = ref_paged(q, kp, vp, bt, sl, cu, **{k: v for k, v in opts.items()
                                                     if k != "return_lse"})
        np.testing.assert_allclose(got[0], ref, **tol(np.float32))


# ---- the multi-layer pool ----

def test_multi_layer_pool_equals_one_pool_per_layer(rng):
    L, hkv, d = 3, 2, 8
    multi = PagePool(12, 4, hkv, d, num_layers=L, k_dtype="int8", v_dtype="float16")
    singles = [PagePool(12, 4, hkv, d, k_dtype="int8", v_dtype="float16") for _ in range(L)]
    assert multi.k_pages.shape == (L, 12, 4, hkv, d) and multi.k_scales.shape == (L, 12, 4, hkv)
    assert multi.num_layers == L and multi.nbytes == L * singles[0].nbytes
    s = multi.create_sequence()
    ss = [p.create_sequence() for p in singles]
    for n in (5, 1, 7):
        k, v = randn(rng, (L, n, hkv, d)), randn(rng, (L, n, hkv, d))
        multi.append(s, k, v)
        for li, p in enumerate(singles):
            p.append(ss[li], k[li], v[li])
    q = randn(rng, (1, 4, d))
    for li, p in enumerate(singles):
        for a, b in zip(multi.gather(s, layer=li), p.gather(ss[li])):
            assert same(a, b)
        assert same(multi.attention(q, [s], layer=li), p.attention(q, [ss[li]]))
    with pytest.raises(ShapeError, match="layer"):
        multi.attention(q, [s], layer=L)
    with pytest.raises(ShapeError, match="layer"):
        multi.gather(s, layer=-1)
    with pytest.raises(ShapeError, match=r"\(3, n, 2, 8\)"):
        multi.append(s, randn(rng, (1, hkv, d)), randn(rng, (1, hkv, d)))
    with pytest.raises(ShapeError, match="num_layers"):
        PagePool(4, 4, 2, 8, num_layers=0)


# ---- reserve / write and the runner's loop ----

@pytest.mark.parametrize("kt,vt", [("float32", "float32"), ("int8", "int4"),
                                   ("float8_e4m3fn", "bfloat16")])
def test_reserve_write_equals_append(rng, kt, vt):
    L, hkv, d, ps = 2, 2, 32, 4
    a = PagePool(16, ps, hkv, d, num_layers=L, k_dtype=kt, v_dtype=vt)
    b = PagePool(16, ps, hkv, d, num_layers=L, k_dtype=kt, v_dtype=vt)
    sa, sb = a.create_sequence(), b.create_sequence()
    for n in (6, 1, 3):
        k, v = randn(rng, (L, n, hkv, d)), randn(rng, (L, n, hkv, d))
        a.append(sa, k, v)
        slots = b.reserve(sb, n)
        assert slots.dtype == np.int64 and slots.shape == (n,)
        pos = np.arange(b.seq_len(sb) - n, b.seq_len(sb))
        np.testing.assert_array_equal(slots, b.pages(sb)[pos // ps] * ps + pos % ps)
        for li in range(L):
            b.write(li, slots, k[li], v[li])
    for x, y in zip((a.k_pages, a.v_pages, a.k_scales, a.v_scales),
                    (b.k_pages, b.v_pages, b.k_scales, b.v_scales)):
        assert (x is None and y is None) or same(x, y)


def test_runner_order_plan_sees_written_rows(rng):
    # reserve every sequence, plan, then per layer write and run
    L, hkv, d, h = 2, 2, 16, 4
    pool = PagePool(20, 4, hkv, d, num_layers=L)
    seqs = [pool.create_sequence() for _ in range(3)]
    for s, n in zip(seqs, (3, 8, 1)):
        pool.append(s, randn(rng, (L, n, hkv, d)), randn(rng, (L, n, hkv, d)))
    slots = np.concatenate([pool.reserve(s, 1) for s in seqs])
    with pool.plan(seqs) as plan:
        for li in range(L):
            k, v = randn(rng, (3, hkv, d)), randn(rng, (3, hkv, d))
            pool.write(li, slots, k, v)
            q = randn(rng, (3, h, d))
            out = plan.run(q, layer=li)
            for b, s in enumerate(seqs):
                kk, vv = pool.gather(s, layer=li)
                np.testing.assert_array_equal(kk[-1], k[b])
                ref = cpuattn.reference_attention(q[b][None, None], kk[None].astype(np.float64),
                                                  vv[None].astype(np.float64), causal=True)
                np.testing.assert_allclose(out[b], ref[0, 0], **tol(np.float32))
        # the next step's reserve copies the tail page the plan holds
        held = pool.pages(seqs[0])[-1]
        before = pool.k_pages[:, held].copy()
        new = pool.reserve(seqs[0], 1)
        assert new[0] // 4 != held
        pool.write(0, new, randn(rng, (1, hkv, d)), randn(rng, (1, hkv, d)))
        assert same(pool.k_pages[:, held], before)
        pool._check_invariants()
    pool._check_invariants()


def test_write_and_reserve_errors_change_nothing(rng):
    pool = PagePool(3, 4, 2, 8)
    s = pool.create_sequence()
    slots = pool.reserve(s, 5)
    free = pool.num_free_pages
    k = randn(rng, (5, 2, 8))
    before = pool.k_pages.copy()
    with pytest.raises(PageError, match=r"slots\[4\]"):
        pool.write(0, np.append(slots[:4], 12), k, k)
    with pytest.raises(PageError, match=r"slots\[0\].*no sequence"):
        pool.write(0, [11, 0, 1, 2, 3], k, k)     # page 2 is free
    with pytest.raises(ShapeError, match="layer"):
        pool.write(1, slots, k, k)
    with pytest.raises(ShapeError, match="rows"):
        pool.write(0, slots[:4], k, k)
    with pytest.raises(DTypeError, match="slots"):
        pool.write(0, slots.astype(np.float64), k, k)
    assert same(pool.k_pages, before)
    with pytest.raises(PoolFullError, match="reserve"):
        pool.reserve(s, 8)
    with pytest.raises(ShapeError, match="n:"):
        pool.reserve(s, -1)
    with pytest.raises(PageError):
        pool.reserve(99, 1)
    assert pool.seq_len(s) == 5 and pool.num_free_pages == free
    # negative slots are padding: skipped
    pool.write(0, np.where(np.arange(5) == 2, -1, slots), k, k)
    got = pool.gather(s)[0]
    np.testing.assert_array_equal(np.delete(got, 2, axis=0), np.delete(k, 2, axis=0))
    np.testing.assert_array_equal(got[2], 0)
    pool._check_invariants()


# ---- write_kv, the functional store ----

@pytest.mark.parametrize("kt,vt", [("float32", "float16"), ("int8", "int4"),
                                   ("float8_e5m2", "bfloat16")])
def test_write_kv_writes_the_pool_bytes(rng, kt, vt):
    hkv, d, ps = 2, 64, 4
    pool = PagePool(6, ps, hkv, d, k_dtype=kt, v_dtype=vt)
    s = pool.create_sequence()
    slots = pool.reserve(s, 7)
    k, v = randn(rng, (7, hkv, d)), randn(rng, (7, hkv, d))
    views = [x.copy() if x is not None else None
             for x in (pool.k_pages, pool.v_pages, pool.k_scales, pool.v_scales)]
    pool.write(0, slots, k, v)
    kp, vp, ks, vs = views
    cpuattn.write_kv(kp, vp, slots, k, v, k_scale=ks, v_scale=vs)
    for x, y in zip((kp, vp, ks, vs), (pool.k_pages, pool.v_pages, pool.k_scales, pool.v_scales)):
        assert (x is None and y is None) or same(x, y)


def test_write_kv_fp8_per_tensor_scale(rng):
    import ml_dtypes
    kp = np.zeros((2, 4, 1, 8), ml_dtypes.float8_e4m3fn)
    vp = np.zeros((2, 4, 1, 8), np.float32)
    k = np.array([[[0.5, -1, 2, 1000, -1e6, 0, 3.3, np.nan]]], np.float32)
    cpuattn.write_kv(kp, vp, [5], k, k, k_scale=2.0)
    want = np.clip(k / 2, -448, 448).astype(ml_dtypes.float8_e4m3fn)
    assert bits(kp[1, 1, 0, :7]) == bits(want[0, 0, :7])
    assert np.isnan(kp[1, 1, 0, 7].astype(np.float32))
    assert not kp[0].astype(np.float32).any()


def test_write_kv_checks_everything_first(rng):
    kp = np.zeros((2, 4, 2, 8), np.float32)
    vp = np.zeros((2, 4, 2, 8), np.int8)
    vs = np.zeros((2, 4, 2), np.float32)
    k = randn(rng, (3, 2, 8))
    with pytest.raises(PageError, match=r"slots\[2\]"):
        cpuattn.write_kv(kp, vp, [0, 1, 8], k, k, v_scale=vs)
    with pytest.raises(ShapeError, match="v_scale"):
        cpuattn.write_kv(kp, vp, [0, 1, 2], k, k)
    with pytest.raises(ShapeError, match="k_scale"):
        cpuattn.write_kv(kp, vp, [0, 1, 2], k, k, k_scale=vs, v_scale=vs)
    with pytest.raises(ShapeError, match="k: expected shape"):
        cpuattn.write_kv(kp, vp, [0, 1], k, k, v_scale=vs)
    with pytest.raises(ShapeError, match="k_pages: expected an array to write into"):
        cpuattn.write_kv(kp.tolist(), vp, [0, 1, 2], k, k, v_scale=vs)
    ro = kp.copy()
    ro.flags.writeable = False
    with pytest.raises(ShapeError, match="writable"):
        cpuattn.write_kv(ro, vp, [0, 1, 2], k, k, v_scale=vs)
    assert not kp.any() and not vp.any() and not vs.any()
    # padding slots skipped; strided page views are written in place
    big = np.zeros((2, 4, 2, 16), np.float32)
    view = big[..., ::2]
    cpuattn.write_kv(view, vp, [-1, 7, -3], k, k, v_scale=vs)
    np.testing.assert_array_equal(big[1, 3, :, ::2], k[1])
    assert not big[..., 1::2].any() and np.count_nonzero(big) == np.count_nonzero(k[1])
    np.testing.assert_allclose(vs[1, 3], np.abs(k[1]).max(axis=-1) / 127, rtol=1e-6)


# ---- the layer over a plan ----

def test_gqattention_over_a_plan_equals_the_pool_pair(rng):
    from cpuattn.layers import GQAttention
    L, d_model, h, hkv = 2, 32, 4, 2
    layers = [GQAttention(d_model, h, hkv, rope_theta=10000.0, seed=i) for i in range(L)]
    multi = PagePool(40, 4, hkv, d_model // h, num_layers=L)
    pools = [PagePool(40, 4, hkv, d_model // h) for _ in range(L)]
    sm = [multi.create_sequence() for _ in range(2)]
    sp = [[p.create_sequence() for _ in range(2)] for p in pools]
    for step, lengths in enumerate(([5, 3], [1, 1], [2, 0])):
        lengths = np.array(lengths)
        x = randn(rng, (2, int(lengths.max()), d_model))
        slots = np.concatenate([multi.reserve(s, int(n)) for s, n in zip(sm, lengths)])
        cu = None if np.all(lengths == 1) else np.concatenate([[0], np.cumsum(lengths)])
        with multi.plan(sm, cu_seqlens_q=cu) as plan:
            for li, layer in enumerate(layers):
                y, _ = layer(x, plan, lengths=lengths, slots=slots, layer=li)
                want, _ = layer(x, (pools[li], sp[li]), lengths=lengths)
                np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ShapeError, match="slots"):
        layers[0](x, (pools[0], sp[0]), slots=slots)
    with pytest.raises(ShapeError, match="layer"):    # not ignored without a plan
        layers[0](x, (pools[0], sp[0]), layer=1)
    with multi.plan(sm) as plan:
        with pytest.raises(ShapeError, match="plan's queries"):
            layers[0](randn(rng, (2, 2, d_model)), plan, slots=slots)


def test_plan_of_a_freed_sequence_keeps_its_pages(rng):
    pool = PagePool(4, 2, 1, 4)
    s = pool.create_sequence()
    pool.append(s, randn(rng, (3, 1, 4)), randn(rng, (3, 1, 4)))
    q = randn(rng, (1, 2, 4))
    plan = pool.plan([s])
    want = plan.run(q)
    pool.free_sequence(s)
    t = pool.create_sequence()
    pool.append(t, randn(rng, (4, 1, 4)), randn(rng, (4, 1, 4)))   # takes the 2 free pages only
    assert same(plan.run(q), want)
    del plan
    gc.collect()
    assert pool.num_free_pages == 2


# ---- the dense fast path (cpuattn.attention, checked in C for plain inputs) ----

def test_dense_plain_and_general_inputs_give_the_same_bytes(rng):
    q, k, v = randn(rng, (2, 9, 8, 32)), randn(rng, (2, 40, 2, 32)), randn(rng, (2, 40, 2, 32))
    sinks = randn(rng, (8,))
    want = cpuattn.attention(q, k, v, causal=True, window=(20, 0), sinks=sinks, return_lse=True)
    # numpy scalars, sinks as a list, a strided out, Fortran-ordered k
    out = np.zeros((2, 18, 8, 32), np.float32)[:, ::2]
    got = cpuattn.attention(q, np.asfortranarray(k), v, causal=np.bool_(True),
                            window=(np.int32(20), 0), sinks=list(sinks.astype(np.float64)),
                            return_lse=True, out=out)
    assert got[0] is out
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    ref = cpuattn.reference_attention(q, k, v, causal=True, window=(20, 0), sinks=sinks)
    np.testing.assert_allclose(want[0], ref, **tol(np.float32))


def test_dense_plain_inputs_still_raise_the_documented_errors(rng):
    q, k, v = randn(rng, (1, 4, 4, 8)), randn(rng, (1, 6, 2, 8)), randn(rng, (1, 6, 2, 8))
    with pytest.raises(ShapeError, match="v: expected seq_k"):
        cpuattn.attention(q, k, v[:, :5])
    with pytest.raises(DTypeError, match="k"):
        cpuattn.attention(q, k.astype(np.float64), v)
    with pytest.raises(ShapeError, match="num_heads"):
        cpuattn.attention(q[:, :, :3], k, v)
    with pytest.raises(ShapeError, match="out: must not overlap k"):
        cpuattn.attention(q, k, v, out=np.lib.stride_tricks.as_strided(k, (1, 4, 4, 8),
                                                                       k.strides))
    with pytest.raises(ShapeError, match="sinks"):
        cpuattn.attention(q, k, v, sinks=np.zeros(3))


def test_one_plan_in_several_threads(rng):
    # other head counts in other threads: the plan's work list is never freed under a run
    import threading
    kp, vp, bt, sl = make_pages(rng, [900, 40], 16, 4, 32)
    plan = PagedPlan(bt, sl, page_size=16, num_pages=kp.shape[0])
    qs = [randn(rng, (2, h, 32)) for h in (4, 8, 16)]
    want = [cpuattn.paged_attention(q, kp, vp, bt, sl) for q in qs]
    errors = []

    def work(i):
        try:
            for _ in range(30):
                if plan.run(qs[i % 3], kp, vp).tobytes() != want[i % 3].tobytes():
                    errors.append(i)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_fuzz_write_kv_against_quantize_kv(data):
    """Random slots (padding and repeats-free) and storage types: the pages
    hold exactly quantize_kv's bytes (or the cast) at each slot, nothing else
    changes."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    kind = data.draw(st.sampled_from(["float32", "float16", "int8", "int4", "float8_e5m2"]))
    p, ps, hkv, d = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 5)), \
        data.draw(st.integers(1, 3)), 2 * data.draw(st.integers(1, 40))
    n = data.draw(st.integers(0, p * ps))
    slots = rng.permutation(p * ps)[:n].astype(np.int64)
    slots[rng.random(n) < 0.2] = -1
    x = randn(rng, (n, hkv, d)) * 3
    if kind in LOW:
        codes, scale = cpuattn.quantize_kv(np.zeros((p, ps, hkv, d), np.float32), kind)
        pages, scales = codes.copy(), scale.copy()
        cpuattn.write_kv(pages, pages.copy(), slots, x, x, k_scale=scales,
                         v_scale=scales.copy())
        want_c, want_s = cpuattn.quantize_kv(x, kind)
    else:
        pages, scales = np.zeros((p, ps, hkv, d), kind), None
        cpuattn.write_kv(pages, pages.copy(), slots, x, x)
        want_c, want_s = x.astype(kind), None
    flat = pages.reshape((p * ps,) + pages.shape[2:])
    used = slots >= 0
    assert bits(flat[slots[used]]) == bits(want_c[used])
    untouched = np.setdiff1d(np.arange(p * ps), slots[used])
    assert not flat[untouched].view(np.uint8).any()
    if scales is not None:
        sflat = scales.reshape((p * ps,) + scales.shape[2:])
        assert bits(sflat[slots[used]]) == bits(want_s[used])
