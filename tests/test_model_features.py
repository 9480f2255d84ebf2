"""Attention sinks, ALiBi and merged attention states, forward and backward."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cpuattn
from cpuattn import DTypeError, PagedPlan, PagePool, ShapeError
from conftest import BF16, make_pages, randn, tol

LOW = ("int8", "int4", "float8_e4m3fn", "float8_e5m2")


def bits(a):
    return np.ascontiguousarray(a).view(np.uint8).tobytes()


def features(rng, h, which):
    sinks = (rng.standard_normal(h) * 2).astype(np.float32)
    slopes = (np.abs(rng.standard_normal(h)) * 0.2).astype(np.float32)
    return {"sinks": dict(sinks=sinks), "alibi": dict(alibi_slopes=slopes),
            "both": dict(sinks=sinks, alibi_slopes=slopes)}[which]


def check_lse(lse, ref, atol):
    fin = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(lse), fin)
    np.testing.assert_allclose(lse[fin], ref[fin], atol=atol, rtol=atol)


DENSE = [  # (batch, seq_q, seq_k, heads, kv_heads, head_dim)
    (1, 1, 1, 1, 1, 1),
    (2, 5, 70, 6, 2, 33),
    (1, 65, 64, 4, 4, 40),     # seq_q > seq_k: the first row sees no key
    (2, 130, 300, 8, 1, 80),
]


@pytest.mark.parametrize("shape", DENSE)
@pytest.mark.parametrize("which", ["sinks", "alibi", "both"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dense_against_reference(rng, shape, which, dtype):
    b, sq, sk, h, hkv, d = shape
    q, k, v = randn(rng, (b, sq, h, d), dtype), randn(rng, (b, sk, hkv, d), dtype), \
        randn(rng, (b, sk, hkv, d), dtype)
    f = features(rng, h, which)
    for opts in (dict(causal=True), dict(causal=True, softcap=8.0, window=(40, 0)),
                 dict(causal=False, window=(3, 5))):
        out, lse = cpuattn.attention(q, k, v, return_lse=True, **opts, **f)
        ref, ref_lse = cpuattn.reference_attention(q, k, v, return_lse=True, **opts, **f)
        np.testing.assert_allclose(out, ref, **tol(dtype))
        check_lse(lse, ref_lse, tol(dtype)["atol"])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision(rng, dtype):
    dt = BF16 if dtype == "bfloat16" else np.dtype(dtype)
    q, k, v = (randn(rng, s).astype(dt) for s in ((2, 9, 4, 64), (2, 40, 2, 64), (2, 40, 2, 64)))
    f = features(rng, 4, "both")
    out = cpuattn.attention(q, k, v, causal=True, **f)
    ref = cpuattn.reference_attention(q.astype(np.float32), k.astype(np.float32),
                                      v.astype(np.float32), causal=True, **f)
    np.testing.assert_allclose(out.astype(np.float32), ref, **tol(dtype))


def test_varlen_against_reference(rng):
    cu_q = np.array([0, 3, 3, 40], np.int32)
    cu_k = np.array([0, 10, 12, 112], np.int32)
    q, k, v = randn(rng, (40, 6, 32)), randn(rng, (112, 3, 32)), randn(rng, (112, 3, 32))
    f = features(rng, 6, "both")
    out, lse = cpuattn.attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True, **f)
    for b in range(3):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        if qs.stop == qs.start:
            continue
        r, rl = cpuattn.reference_attention(q[qs][None], k[ks][None], v[ks][None], causal=True,
                                            return_lse=True, **f)
        np.testing.assert_allclose(out[qs], r[0], **tol(np.float32))
        check_lse(lse[:, qs], rl[0], 2e-5)


def paged_reference(q, kf, vf, bt, lens, cu, **opts):
    k = cpuattn.gather_pages(kf, bt, lens)
    v = cpuattn.gather_pages(vf, bt, lens)
    outs, lses = [], []
    cu = np.arange(len(lens) + 1) if cu is None else cu
    for b, n in enumerate(lens):
        qs = q[cu[b]:cu[b + 1]]
        if not len(qs):
            continue
        o, l = cpuattn.reference_attention(qs[None], k[b:b + 1, :n], v[b:b + 1, :n],
                                           return_lse=True, **opts)
        outs.append(o[0])
        lses.append(l[0])
    return np.concatenate(outs), np.concatenate(lses, axis=1)


@pytest.mark.parametrize("lens,ps,h,hkv,d", [([1, 37, 0], 16, 8, 2, 64), ([3000], 16, 4, 1, 128),
                                             ([9, 40], 5, 6, 3, 40)])
@pytest.mark.parametrize("form", ["decode", "chunked"])
def test_paged_against_reference(rng, lens, ps, h, hkv, d, form):
    # 3000 keys: split-KV, the sink counted once after the merge
    kp, vp, bt, sl = make_pages(rng, lens, ps, hkv, d)
    cu = None
    if form == "chunked":
        cu = np.concatenate([[0], np.cumsum([min(n, 7) for n in lens])]).astype(np.int32)
    nq = len(lens) if cu is None else int(cu[-1])
    q = randn(rng, (nq, h, d))
    f = features(rng, h, "both")
    out, lse = cpuattn.paged_attention(q, kp, vp, bt, sl, cu_seqlens_q=cu, return_lse=True,
                                       softcap=20.0, **f)
    ref, ref_lse = paged_reference(q, kp, vp, bt, sl, cu, causal=True, softcap=20.0, **f)
    np.testing.assert_allclose(out, ref, **tol(np.float32))
    check_lse(lse, ref_lse, 2e-5)
    if cu is None:   # an empty sequence: zero output, lse = its sink
        for b in np.flatnonzero(sl == 0):
            assert not out[b].any()
            np.testing.assert_array_equal(lse[:, b], f["sinks"])
    plan = PagedPlan(bt, sl, page_size=ps, num_pages=kp.shape[0], cu_seqlens_q=cu)
    got = plan.run(q, kp, vp, return_lse=True, softcap=20.0, **f)
    assert bits(got[0]) == bits(out) and bits(got[1]) == bits(lse)


@pytest.mark.parametrize("kt,vt", [("int8", "int4"), ("float8_e4m3fn", "float16")])
def test_low_bit_pages(rng, kt, vt):
    pool = PagePool(30, 16, 2, 64, k_dtype=kt, v_dtype=vt)
    seqs = [pool.create_sequence() for _ in range(2)]
    for s, n in zip(seqs, (50, 300)):
        pool.append(s, randn(rng, (n, 2, 64)), randn(rng, (n, 2, 64)))
    q = randn(rng, (2, 8, 64))
    f = features(rng, 8, "both")
    out, lse = pool.attention(q, seqs, return_lse=True, **f)
    for b, s in enumerate(seqs):
        k, v = pool.gather(s)
        r, rl = cpuattn.reference_attention(q[b][None, None], k[None], v[None], causal=True,
                                            return_lse=True, **f)
        np.testing.assert_allclose(out[b], r[0, 0], **tol(np.float32))
        np.testing.assert_allclose(lse[:, b], rl[0, :, 0], atol=2e-5, rtol=2e-5)


def test_every_simd_path(rng, each_isa):
    q, k, v = randn(rng, (1, 70, 4, 48)), randn(rng, (1, 100, 2, 48)), randn(rng, (1, 100, 2, 48))
    f = features(rng, 4, "both")
    out = cpuattn.attention(q, k, v, causal=True, softcap=6.0, **f)
    np.testing.assert_allclose(out, cpuattn.reference_attention(q, k, v, causal=True,
                                                                softcap=6.0, **f),
                               **tol(np.float32))
    kp, vp, bt, sl = make_pages(rng, [700, 5], 16, 2, 48)
    qd = randn(rng, (2, 4, 48))
    got = cpuattn.paged_attention(qd, kp, vp, bt, sl, **f)
    np.testing.assert_allclose(got, paged_reference(qd, kp, vp, bt, sl, None, causal=True, **f)[0],
                               **tol(np.float32))


def test_rows_without_keys_and_nan_sinks(rng):
    q, k, v = randn(rng, (1, 4, 3, 8)), randn(rng, (1, 2, 3, 8)), randn(rng, (1, 2, 3, 8))
    sinks = np.array([0.5, np.nan, -np.inf], np.float32)
    out, lse = cpuattn.attention(q, k, v, causal=True, sinks=sinks, return_lse=True)
    # rows 0 and 1 sit before the first key: zero output, lse = the sink
    assert not out[0, :2, 0].any() and not out[0, :2, 2].any()
    np.testing.assert_array_equal(lse[0, 0, :2], [0.5, 0.5])
    np.testing.assert_array_equal(lse[0, 2, :2], [-np.inf, -np.inf])
    assert np.isnan(out[0, 2:, 1]).all() and np.isnan(lse[0, 1]).all()    # a NaN sink propagates
    ref = cpuattn.reference_attention(q, k, v, causal=True, sinks=sinks[[0, 0, 2]])
    np.testing.assert_allclose(out[0, :, [0, 2]], ref[0, :, [0, 2]], **tol(np.float32))
    # a sink of -inf is the same as none
    plain = cpuattn.attention(q, k, v, causal=True)
    np.testing.assert_allclose(out[0, 2:, 2], plain[0, 2:, 2], rtol=1e-6, atol=1e-7)


def test_alibi_distance_is_absolute_position(rng):
    # Sq != Sk and not causal: query i sits at i + Sk - Sq, keys on both sides
    q, k, v = randn(rng, (1, 3, 2, 4)), randn(rng, (1, 9, 2, 4)), randn(rng, (1, 9, 2, 4))
    slopes = np.array([0.5, 2.0], np.float32)   # MHA: head hh reads kv head hh
    zero_q = np.zeros_like(q)   # all scores 0: the weights are the bias alone
    out = cpuattn.attention(zero_q, k, v, alibi_slopes=slopes)
    for i in range(3):
        for hh in range(2):
            w = np.exp(-slopes[hh] * np.abs(i + 6 - np.arange(9)))
            np.testing.assert_allclose(out[0, i, hh], (w / w.sum()) @ v[0, :, hh], rtol=1e-5,
                                       atol=1e-6)


def test_thread_counts_and_batch_invariance(rng, threads):
    kp, vp, bt, sl = make_pages(rng, [2100, 30, 1], 16, 2, 64)
    cu = np.array([0, 1, 9, 10], np.int32)
    q = randn(rng, (10, 8, 64))
    f = features(rng, 8, "both")
    runs = []
    for n in (1, 2, 3):
        threads(n)
        runs.append(cpuattn.paged_attention(q, kp, vp, bt, sl, cu_seqlens_q=cu, return_lse=True,
                                            **f))
    assert all(bits(r[0]) == bits(runs[0][0]) and bits(r[1]) == bits(runs[0][1]) for r in runs)
    alone = cpuattn.paged_attention(q[1:9], kp, vp, bt[1:2], sl[1:2],
                                    cu_seqlens_q=np.array([0, 8], np.int32), **f)
    assert bits(alone) == bits(runs[0][0][1:9])
    qd, kd, vd = randn(rng, (3, 50, 8, 32)), randn(rng, (3, 80, 2, 32)), randn(rng, (3, 80, 2, 32))
    full = cpuattn.attention(qd, kd, vd, causal=True, **f)
    assert bits(cpuattn.attention(qd[1:2], kd[1:2], vd[1:2], causal=True, **f)) == bits(full[1:2])


def test_bad_keywords_name_the_argument(rng):
    q, k, v = randn(rng, (1, 2, 4, 8)), randn(rng, (1, 2, 2, 8)), randn(rng, (1, 2, 2, 8))
    with pytest.raises(ShapeError, match=r"sinks: expected shape \(4,\)"):
        cpuattn.attention(q, k, v, sinks=np.zeros(3, np.float32))
    with pytest.raises(DTypeError, match="alibi_slopes"):
        cpuattn.attention(q, k, v, alibi_slopes=np.zeros(4, np.int32))
    with pytest.raises(ShapeError, match="sinks"):
        cpuattn.attention(q, k, v, sinks=np.zeros((4, 1), np.float32))
    kp, vp, bt, sl = make_pages(rng, [5], 4, 2, 8)
    with pytest.raises(ShapeError, match="alibi_slopes"):
        cpuattn.paged_attention(q[0, :1], kp, vp, bt, sl, alibi_slopes=[0.1, 0.2])
    with pytest.raises(DTypeError, match="sinks"):
        cpuattn.attention_backward(q, q, k, v, q, np.zeros((1, 4, 2), np.float32),
                                   sinks=np.array(["a"] * 4))


# ---- backward ----

def torch_reference(q, k, v, sinks, slopes, causal, softcap, window=(-1, -1)):
    import torch
    b, sq, h, d = q.shape
    sk, g = k.shape[1], h // k.shape[2]
    kk, vv = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) / np.sqrt(d)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    pos = torch.arange(sq)[:, None] + sk - sq
    j = torch.arange(sk)[None, :]
    if slopes is not None:
        s = s - slopes[None, :, None, None] * (pos - j).abs()[None, None].double()
    vis = torch.ones(sq, sk, dtype=torch.bool)
    if causal:
        vis &= j <= pos
    if window[0] >= 0:
        vis &= j >= pos - window[0]
    s = s.masked_fill(~vis[None, None], float("-inf"))
    cols = [s] if sinks is None else [s, sinks[None, :, None, None].expand(b, h, sq, 1)]
    lse = torch.logsumexp(torch.cat(cols, -1), -1)
    p = torch.exp(s - lse[..., None])
    return torch.einsum("bhqk,bkhd->bqhd", p, vv)


@pytest.mark.parametrize("which", ["sinks", "alibi", "both"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_backward_against_torch_autograd(rng, which, dtype):
    torch = pytest.importorskip("torch")
    b, sq, sk, h, hkv, d = 2, 37, 90, 4, 2, 16
    q, k, v = (rng.standard_normal(s) for s in ((b, sq, h, d), (b, sk, hkv, d), (b, sk, hkv, d)))
    f = features(rng, h, which)
    opts = dict(causal=True, softcap=10.0, window=(50, -1))
    args = [x.astype(dtype) for x in (q, k, v)]
    out, lse = cpuattn.attention(*args, return_lse=True, **opts, **f)
    dout = rng.standard_normal(out.shape)
    grads = cpuattn.attention_backward(dout.astype(dtype), *args, out, lse, **opts, **f)
    assert len(grads) == (4 if "sinks" in f else 3)
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    ts = torch.tensor(f["sinks"].astype(np.float64), requires_grad=True) if "sinks" in f else None
    ta = torch.tensor(f["alibi_slopes"].astype(np.float64)) if "alibi_slopes" in f else None
    ref = torch_reference(tq, tk, tv, ts, ta, True, 10.0, (50, -1))
    want = torch.autograd.grad(ref, [tq, tk, tv] + ([ts] if ts is not None else []),
                               torch.tensor(dout))
    atol = 1e-10 if dtype == np.float64 else 2e-4
    for g, w in zip(grads, want):
        assert g.dtype == dtype or g.shape == (h,)
        np.testing.assert_allclose(g, w.numpy(), atol=atol, rtol=atol)


def test_varlen_and_paged_backward_with_sinks(rng):
    cu_q, cu_k = np.array([0, 2, 9], np.int32), np.array([0, 20, 45], np.int32)
    q, k, v = randn(rng, (9, 4, 16), np.float64), randn(rng, (45, 2, 16), np.float64), \
        randn(rng, (45, 2, 16), np.float64)
    f = features(rng, 4, "both")
    out, lse = cpuattn.attention_varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True, **f)
    dout = randn(rng, out.shape, np.float64)
    gv = cpuattn.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, causal=True, **f)
    # per sequence as dense batches of one: the same gradients, dsinks summed
    ds = np.zeros(4)
    for b in range(2):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        g = cpuattn.attention_backward(dout[qs][None], q[qs][None], k[ks][None], v[ks][None],
                                       out[qs][None], lse[:, qs][None], causal=True, **f)
        np.testing.assert_allclose(gv[0][qs], g[0][0], atol=1e-12)
        np.testing.assert_allclose(gv[1][ks], g[1][0], atol=1e-12)
        ds += g[3]
    np.testing.assert_allclose(gv[3], ds, atol=1e-12)
    # paged: the same sequences in pages
    ps = 8
    kp = np.zeros((12, ps, 2, 16))
    vp = np.zeros((12, ps, 2, 16))
    bt = np.full((2, 6), -1, np.int32)
    at = 0
    for b in range(2):
        n = cu_k[b + 1] - cu_k[b]
        for j in range(-(-n // ps)):
            bt[b, j] = at
            rows = slice(cu_k[b] + j * ps, min(cu_k[b] + (j + 1) * ps, cu_k[b + 1]))
            kp[at, :rows.stop - rows.start] = k[rows]
            vp[at, :rows.stop - rows.start] = v[rows]
            at += 1
    sl = np.diff(cu_k).astype(np.int32)
    gp = cpuattn.paged_attention_backward(dout, q, kp, vp, bt, sl, out, lse, cu_seqlens_q=cu_q,
                                          **f)
    np.testing.assert_allclose(gp[0], gv[0], atol=1e-12)
    np.testing.assert_allclose(gp[3], gv[3], atol=1e-12)


def test_torch_adapter_gradcheck():
    torch = pytest.importorskip("torch")
    from cpuattn import torch as ct
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 5, 4, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(1, 7, 2, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    v = torch.randn(1, 7, 2, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    sinks = torch.randn(4, dtype=torch.float64, generator=gen, requires_grad=True)
    slopes = torch.tensor([0.1, 0.2, 0.4, 0.8], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b, c, s: ct.attention(a, b, c, causal=True, softcap=3.0, sinks=s,
                                        alibi_slopes=slopes), (q, k, v, sinks), atol=1e-6)
    out = ct.attention(q.float(), k.float(), v.float(), sinks=sinks.float())
    assert out.dtype == torch.float32


# ---- merged states ----

def test_merge_equals_attention_over_all_keys(rng):
    q, k, v = randn(rng, (1, 6, 4, 32)), randn(rng, (1, 90, 2, 32)), randn(rng, (1, 90, 2, 32))
    cu_q, cu_k = np.array([0, 6], np.int32), np.array([0, 90], np.int32)
    parts = []
    for lo, hi in ((0, 30), (30, 31), (31, 90)):
        o, l = cpuattn.attention(q, k[:, lo:hi], v[:, lo:hi], return_lse=True)
        parts.append((o[0], l[0]))
    full, full_lse = cpuattn.attention_varlen(q[0], k[0], v[0], cu_q, cu_k, return_lse=True)
    out, lse = cpuattn.merge_attention_states(parts)
    np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lse, full_lse, rtol=1e-6, atol=1e-6)
    # the list form is the pair form left to right, bit for bit
    ab = cpuattn.merge_attention_states(*parts[0], *parts[1])
    abc = cpuattn.merge_attention_states(*ab, *parts[2])
    assert bits(abc[0]) == bits(out) and bits(abc[1]) == bits(lse)
    # out= in place over the first state
    buf = parts[0][0].copy()
    got, _ = cpuattn.merge_attention_states(buf, parts[0][1], *parts[1], out=buf)
    assert got is buf and bits(buf) == bits(ab[0])


def test_merge_empty_sides_and_nan():
    o = np.ones((2, 1, 3), np.float32)
    la = np.array([[-np.inf, 0.0]], np.float32)
    lb = np.array([[-np.inf, -np.inf]], np.float32)
    out, lse = cpuattn.merge_attention_states(o, la, 2 * o, lb)
    np.testing.assert_array_equal(out[0], 0)
    np.testing.assert_array_equal(lse, [[-np.inf, 0.0]])
    np.testing.assert_array_equal(out[1], 1)
    out, lse = cpuattn.merge_attention_states(o, np.array([[np.nan, 0.0]], np.float32), o, la)
    assert np.isnan(out[0]).all() and np.isnan(lse[0, 0]) and (out[1] == 1).all()


def test_merge_bad_input():
    o = np.zeros((3, 2, 4), np.float32)
    lse = np.zeros((2, 3), np.float32)
    with pytest.raises(ShapeError, match="out_b"):
        cpuattn.merge_attention_states(o, lse, o[:2], lse[:, :2])
    with pytest.raises(DTypeError, match="lse_a"):
        cpuattn.merge_attention_states(o, lse.astype(np.float64), o, lse)
    with pytest.raises(ShapeError, match="lse_b"):
        cpuattn.merge_attention_states(o, lse, o, lse.T)
    with pytest.raises(DTypeError, match="out_b"):
        cpuattn.merge_attention_states(o, lse, o.astype(np.float16), lse)
    with pytest.raises(ShapeError, match="states"):
        cpuattn.merge_attention_states([])
    with pytest.raises(ShapeError, match="out"):
        cpuattn.merge_attention_states(o, lse, o, lse, out=np.zeros((3, 2, 5), np.float32))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_fuzz_new_keywords(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    hkv = data.draw(st.integers(1, 3))
    h = hkv * data.draw(st.integers(1, 3))
    sq, sk, d = data.draw(st.integers(1, 40)), data.draw(st.integers(0, 80)), \
        data.draw(st.sampled_from([1, 8, 17]))
    q, k, v = randn(rng, (1, sq, h, d)), randn(rng, (1, sk, hkv, d)), randn(rng, (1, sk, hkv, d))
    f = {}
    if data.draw(st.booleans()):
        f["sinks"] = (rng.standard_normal(h) * 3).astype(np.float32)
    if data.draw(st.booleans()):
        f["alibi_slopes"] = (np.abs(rng.standard_normal(h))).astype(np.float32)
    opts = dict(causal=data.draw(st.booleans()), softcap=data.draw(st.sampled_from([0.0, 4.0])),
                window=(data.draw(st.integers(-1, 30)), data.draw(st.integers(-1, 5))))
    out, lse = cpuattn.attention(q, k, v, return_lse=True, **opts, **f)
    ref, ref_lse = cpuattn.reference_attention(q, k, v, return_lse=True, **opts, **f)
    np.testing.assert_allclose(out, ref, **tol(np.float32))
    check_lse(lse, ref_lse, 3e-5)
    cu = np.array([0, sq], np.int32)
    got = cpuattn.attention_varlen(q[0], k[0], v[0], cu, np.array([0, sk], np.int32), **opts, **f)
    assert bits(got) == bits(out[0])


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_fuzz_merge_states(data):
    """Keys cut at random points into parts (empty ones too), each attended
    apart and merged in order: attention over all keys, and the pair form
    left to right gives the list form's bytes."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    t, h, sk, d = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 4)), \
        data.draw(st.integers(0, 60)), data.draw(st.sampled_from([1, 8, 17]))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    q, k, v = randn(rng, (1, t, h, d), dtype), randn(rng, (1, sk, h, d), dtype), \
        randn(rng, (1, sk, h, d), dtype)
    cuts = sorted(data.draw(st.lists(st.integers(0, sk), min_size=1, max_size=4)))
    bounds = [0] + cuts + [sk]
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        o, l = cpuattn.attention(q, k[:, lo:hi], v[:, lo:hi], return_lse=True)
        parts.append((o[0], l[0]))
    out, lse = cpuattn.merge_attention_states(parts)
    ref, ref_lse = cpuattn.reference_attention(q, k, v, return_lse=True)
    np.testing.assert_allclose(out, ref[0], **tol(dtype))
    check_lse(lse, ref_lse[0], tol(dtype)["atol"])
    acc = parts[0]
    for p in parts[1:]:
        acc = cpuattn.merge_attention_states(*acc, *p)
    if len(parts) > 1:
        assert bits(acc[0]) == bits(out) and bits(acc[1]) == bits(lse)
