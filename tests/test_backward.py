"""Backward passes: dense, varlen, paged, and the torch autograd adapter.

The float64 oracle here is the textbook backward written with S x S matrices
in numpy (independent of the tiled engine); it is itself checked against
finite differences and, when torch is installed, against torch autograd.
"""
import math

import numpy as np
import pytest

import cpuattn
from cpuattn.reference import visible_mask


def rand(rng, shape, dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


def ref_backward(dout, q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0):
    """float64 (out, dq, dk, dv) of dense attention, S x S matrices."""
    dout, q, k, v = (np.asarray(x, np.float64) for x in (dout, q, k, v))
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kh, vh = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    mask = visible_mask(sq, sk, causal, window)[None, None]
    s = np.einsum("bqhd,bkhd->bhqk", q, kh) * scale
    th = np.tanh(s / softcap) if softcap > 0 else None
    if softcap > 0:
        s = softcap * th
    s = np.where(mask, s, -np.inf)
    m = s.max(axis=-1, keepdims=True) if sk else np.zeros((b, h, sq, 1))
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(mask, np.exp(s - m), 0.0)
    l = e.sum(axis=-1, keepdims=True)
    p = np.where(l > 0, e / np.where(l > 0, l, 1.0), 0.0)
    o = np.einsum("bhqk,bkhd->bqhd", p, vh)
    dp = np.einsum("bqhd,bkhd->bhqk", dout, vh)
    di = np.einsum("bqhd,bqhd->bhq", dout, o)[..., None]
    ds = p * (dp - di)
    if softcap > 0:
        ds = ds * (1 - th ** 2)
    dq = np.einsum("bhqk,bkhd->bqhd", ds, kh) * scale
    dkh = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
    dvh = np.einsum("bhqk,bqhd->bkhd", p, dout)
    dk = dkh.reshape(b, sk, hkv, g, d).sum(axis=3)
    dv = dvh.reshape(b, sk, hkv, g, -1).sum(axis=3)
    return o, dq, dk, dv


def run_backward(dout, q, k, v, **opts):
    out, lse = cpuattn.attention(q, k, v, return_lse=True, **opts)
    return cpuattn.attention_backward(dout, q, k, v, out, lse, **opts)


def make(rng, b, sq, sk, h, hkv, d, dv=None, dtype=np.float64):
    dv = d if dv is None else dv
    return (rand(rng, (b, sq, h, dv), dtype), rand(rng, (b, sq, h, d), dtype),
            rand(rng, (b, sk, hkv, d), dtype), rand(rng, (b, sk, hkv, dv), dtype))


def assert_grads_close(got, want, rtol):
    for name, x, y in zip(("dq", "dk", "dv"), got, want):
        x = np.asarray(x, np.float64)
        scale = max(1.0, float(np.abs(y).max())) if y.size else 1.0
        np.testing.assert_allclose(x, y, rtol=0, atol=rtol * scale, err_msg=name)


# (b, sq, sk, h, hkv, d, dv, options)
CASES = [
    (2, 37, 37, 4, 4, 32, 32, {}),
    (1, 130, 200, 4, 2, 40, 40, {}),                               # GQA 2, several blocks
    (1, 70, 90, 8, 2, 16, 16, dict(causal=True)),                  # GQA 4
    (2, 45, 45, 6, 2, 33, 33, dict(causal=True)),                  # GQA 3, odd head_dim
    (1, 20, 75, 5, 1, 24, 24, dict(causal=True)),                  # MQA, Sq < Sk
    (1, 75, 20, 2, 1, 24, 24, dict(causal=True)),                  # Sq > Sk: rows with no key
    (1, 100, 100, 2, 1, 32, 32, dict(window=(16, 3))),
    (1, 90, 140, 4, 2, 32, 32, dict(causal=True, window=(20, 0))),
    (1, 50, 80, 2, 2, 16, 16, dict(window=(-1, 4))),
    (1, 66, 66, 4, 2, 32, 32, dict(softcap=3.0)),
    (1, 66, 97, 4, 1, 32, 32, dict(causal=True, softcap=2.0, scale=0.3)),
    (2, 33, 71, 2, 1, 24, 40, dict(causal=True)),                  # head_dim_v != head_dim
    (1, 40, 40, 2, 2, 40, 9, {}),
    (1, 3, 70, 80, 1, 8, 8, dict(causal=True)),                   # group of 80 heads
]


@pytest.mark.parametrize("case", CASES)
def test_float64_matches_reference(case):
    b, sq, sk, h, hkv, d, dv, opts = case
    rng = np.random.default_rng(1)
    dout, q, k, v = make(rng, b, sq, sk, h, hkv, d, dv)
    got = run_backward(dout, q, k, v, **opts)
    for x, ref in zip(got, (q, k, v)):
        assert x.dtype == np.float64 and x.shape == ref.shape
    assert_grads_close(got, ref_backward(dout, q, k, v, **opts)[1:], 1e-12)


@pytest.mark.parametrize("case", [CASES[1], CASES[5], CASES[7], CASES[10], CASES[11]])
def test_every_isa(case, each_isa):
    b, sq, sk, h, hkv, d, dv, opts = case
    rng = np.random.default_rng(2)
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 3e-5)):
        dout, q, k, v = make(rng, b, sq, sk, h, hkv, d, dv, dtype)
        got = run_backward(dout, q, k, v, **opts)
        assert got[0].dtype == dtype
        assert_grads_close(got, ref_backward(dout, q, k, v, **opts)[1:], tol)


def test_finite_differences():
    rng = np.random.default_rng(3)
    opts = dict(causal=True, softcap=1.5)
    dout, q, k, v = make(rng, 1, 3, 5, 2, 1, 3, 2)
    grads = run_backward(dout, q, k, v, **opts)

    def loss(q, k, v):
        return float((cpuattn.attention(q, k, v, **opts) * dout).sum())

    eps = 1e-6
    for i, x in enumerate((q, k, v)):
        num = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            args = [q.copy(), k.copy(), v.copy()]
            args[i][idx] += eps
            up = loss(*args)
            args[i][idx] -= 2 * eps
            num[idx] = (up - loss(*args)) / (2 * eps)
        np.testing.assert_allclose(grads[i], num, atol=1e-7, rtol=1e-6)


def test_float32_against_float64():
    rng = np.random.default_rng(4)
    dout, q, k, v = make(rng, 1, 150, 150, 4, 2, 64)
    want = run_backward(dout, q, k, v, causal=True)
    got = run_backward(*(x.astype(np.float32) for x in (dout, q, k, v)), causal=True)
    assert all(x.dtype == np.float32 for x in got)
    assert_grads_close(got, want, 2e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision(dtype):
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        dt = np.dtype(ml_dtypes.bfloat16)
        tol = 3e-2
    else:
        dt, tol = np.dtype(np.float16), 5e-3
    rng = np.random.default_rng(5)
    dout, q, k, v = (x.astype(dt) for x in make(rng, 1, 60, 80, 4, 2, 32))
    got = run_backward(dout, q, k, v, causal=True)
    assert all(x.dtype == dt for x in got)
    want = ref_backward(*(x.astype(np.float64) for x in (dout, q, k, v)), causal=True)[1:]
    assert_grads_close(got, want, tol)


def test_strided_inputs_bitwise_equal():
    rng = np.random.default_rng(6)
    dout, q, k, v = make(rng, 2, 50, 70, 4, 2, 32, dtype=np.float32)
    opts = dict(causal=True)
    out, lse = cpuattn.attention(q, k, v, return_lse=True, **opts)
    want = cpuattn.attention_backward(dout, q, k, v, out, lse, **opts)
    # (B, H, S, D) storage seen through a transpose: no copy needed
    tq, tk, tv, tdo, tout = (np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
                             for x in (q, k, v, dout, out))
    tlse = np.ascontiguousarray(lse.transpose(0, 2, 1)).transpose(0, 2, 1)
    got = cpuattn.attention_backward(tdo, tq, tk, tv, tout, tlse, **opts)
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x, y)
    # a non-contiguous last axis is copied once
    wide = np.zeros(q.shape[:-1] + (2 * q.shape[-1],), np.float32)
    wide[..., ::2] = q
    got = cpuattn.attention_backward(dout, wide[..., ::2], k, v, out, lse, **opts)
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x, y)


def test_deterministic_across_thread_counts():
    rng = np.random.default_rng(7)
    dout, q, k, v = make(rng, 2, 150, 170, 6, 2, 32, dtype=np.float32)
    out, lse = cpuattn.attention(q, k, v, causal=True, return_lse=True)
    old = cpuattn.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            cpuattn.set_num_threads(n)
            grads = cpuattn.attention_backward(dout, q, k, v, out, lse, causal=True)
            results.append(b"".join(x.tobytes() for x in grads))
    finally:
        cpuattn.set_num_threads(old)
    assert results[0] == results[1] == results[2]


def test_varlen_is_batch_invariant():
    rng = np.random.default_rng(8)
    lens_q, lens_k = [5, 0, 70, 33], [9, 4, 70, 90]
    h, hkv, d = 4, 2, 32
    cuq = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cuk = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q, dout = rand(rng, (cuq[-1], h, d), np.float32), rand(rng, (cuq[-1], h, d), np.float32)
    k, v = (rand(rng, (cuk[-1], hkv, d), np.float32) for _ in range(2))
    opts = dict(causal=True, window=(40, -1))
    out, lse = cpuattn.attention_varlen(q, k, v, cuq, cuk, return_lse=True, **opts)
    dq, dk, dv = cpuattn.attention_varlen_backward(dout, q, k, v, out, lse, cuq, cuk, **opts)
    for i in range(len(lens_q)):
        qs, ks = slice(cuq[i], cuq[i + 1]), slice(cuk[i], cuk[i + 1])
        want = run_backward(dout[None, qs], q[None, qs], k[None, ks], v[None, ks], **opts)
        for got, w in zip((dq[qs], dk[ks], dv[ks]), want):
            np.testing.assert_array_equal(got, w[0])


def test_rows_and_keys_without_partners_get_zero():
    rng = np.random.default_rng(9)
    # Sq > Sk, causal: the first Sq - Sk rows see no key
    dout, q, k, v = make(rng, 1, 30, 10, 2, 1, 16)
    dq, dk, dv = run_backward(dout, q, k, v, causal=True)
    assert np.all(dq[:, :20] == 0) and np.all(np.isfinite(dq))
    # no keys at all
    dout, q, k, v = make(rng, 2, 7, 0, 2, 1, 16)
    dq, dk, dv = run_backward(dout, q, k, v)
    assert np.all(dq == 0) and dk.shape == (2, 0, 1, 16) and dv.shape == (2, 0, 1, 16)
    # no queries: dk = dv = 0
    dout, q, k, v = make(rng, 2, 0, 9, 2, 1, 16)
    dq, dk, dv = run_backward(dout, q, k, v)
    assert dq.shape == (2, 0, 2, 16) and np.all(dk == 0) and np.all(dv == 0)
    # keys behind the window of every row
    dout, q, k, v = make(rng, 1, 10, 100, 2, 1, 16)
    dq, dk, dv = run_backward(dout, q, k, v, causal=True, window=(20, 0))
    assert np.all(dk[:, :70] == 0) and np.all(dv[:, :70] == 0)


def test_hidden_nonfinite_keys_and_values_do_not_leak():
    rng = np.random.default_rng(10)
    opts = dict(causal=True, window=(20, 0))
    dout, q, k, v = make(rng, 1, 10, 100, 4, 2, 16, dtype=np.float32)
    want = run_backward(dout, q, k, v, **opts)
    k[:, [5, 63, 64, 69]] = np.nan
    v[:, [6, 63, 64, 69]] = np.inf
    k[:, 30, 0, 0] = -np.inf
    got = run_backward(dout, q, k, v, **opts)
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x, y)
    # key 99 is seen only by the last row: every other row is unaffected
    dout, q, k, v = make(rng, 1, 100, 100, 2, 1, 16, dtype=np.float32)
    want = run_backward(dout, q, k, v, causal=True)
    k[:, 99] = np.nan
    v[:, 99] = np.inf
    dq, dk, dv = run_backward(dout, q, k, v, causal=True)
    np.testing.assert_allclose(dq[:, :99], want[0][:, :99], rtol=1e-6, atol=1e-6)
    assert np.isnan(dq[:, 99]).all()


# ---- paged ----

def paged_setup(rng, lens, page_size, h, hkv, d, num_pages=None, dtype=np.float32):
    """Pages holding each sequence's chain on shuffled pages (plus spare pages
    filled with NaN, never read). Returns pages, block table and the packed
    (gathered) K/V with their cu_seqlens."""
    need = [(n + page_size - 1) // page_size for n in lens]
    total_pages = num_pages or sum(need) + 3
    order = rng.permutation(total_pages)
    k_pages = np.full((total_pages, page_size, hkv, d), np.nan, dtype)
    v_pages = np.full((total_pages, page_size, hkv, d), np.nan, dtype)
    width = max(need + [1]) + 1
    bt = np.full((len(lens), width), -1, np.int32)
    at = 0
    for b, n in enumerate(lens):
        bt[b, :need[b]] = order[at:at + need[b]]
        at += need[b]
    cuk = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    k = rand(rng, (cuk[-1], hkv, d), dtype)
    v = rand(rng, (cuk[-1], hkv, d), dtype)
    for b, n in enumerate(lens):
        for j in range(n):
            k_pages[bt[b, j // page_size], j % page_size] = k[cuk[b] + j]
            v_pages[bt[b, j // page_size], j % page_size] = v[cuk[b] + j]
    return k_pages, v_pages, bt, np.array(lens, np.int32), k, v, cuk


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("chunked", [False, True])
def test_paged_matches_varlen(page_size, chunked):
    rng = np.random.default_rng(11)
    lens = [37, 1, 80, 16]
    h, hkv, d = 4, 2, 32
    k_pages, v_pages, bt, seq_lens, k, v, cuk = paged_setup(rng, lens, page_size, h, hkv, d)
    nq = [5, 1, 17, 16] if chunked else [1] * len(lens)
    cuq = np.concatenate([[0], np.cumsum(nq)]).astype(np.int32)
    q = rand(rng, (cuq[-1], h, d), np.float32)
    dout = rand(rng, (cuq[-1], h, d), np.float32)
    opts = dict(causal=True, softcap=4.0)
    out, lse = cpuattn.attention_varlen(q, k, v, cuq, cuk, return_lse=True, **opts)
    dq_w, dk_w, dv_w = cpuattn.attention_varlen_backward(dout, q, k, v, out, lse, cuq, cuk,
                                                         **opts)
    dq, dk_pages, dv_pages = cpuattn.paged_attention_backward(
        dout, q, k_pages, v_pages, bt, seq_lens, out, lse,
        cu_seqlens_q=cuq if chunked else None, **opts)
    np.testing.assert_array_equal(dq, dq_w)
    assert dk_pages.shape == k_pages.shape and dk_pages.dtype == k_pages.dtype
    used = np.zeros(k_pages.shape[:2], bool)
    for b, n in enumerate(lens):
        for j in range(n):
            p, s = bt[b, j // page_size], j % page_size
            used[p, s] = True
            np.testing.assert_array_equal(dk_pages[p, s], dk_w[cuk[b] + j])
            np.testing.assert_array_equal(dv_pages[p, s], dv_w[cuk[b] + j])
    assert np.all(dk_pages[~used] == 0) and np.all(dv_pages[~used] == 0)


def test_paged_shared_page_gets_summed_gradients():
    rng = np.random.default_rng(12)
    ps, h, hkv, d = 4, 2, 1, 16
    k_pages = rand(rng, (6, ps, hkv, d), np.float32)
    v_pages = rand(rng, (6, ps, hkv, d), np.float32)
    # both sequences start with page 3 (a shared prefix); page 0 and 5 unused
    bt = np.array([[3, 1, -1], [3, 4, 2]], np.int32)
    seq_lens = np.array([6, 10], np.int32)
    q = rand(rng, (2, h, d), np.float32)
    dout = rand(rng, (2, h, d), np.float32)
    grads = []
    outs = []
    for b in range(2):   # each sequence alone, through the dense API
        chain = bt[b, : (seq_lens[b] + ps - 1) // ps]
        kb = k_pages[chain].reshape(-1, hkv, d)[: seq_lens[b]][None]
        vb = v_pages[chain].reshape(-1, hkv, d)[: seq_lens[b]][None]
        o, l = cpuattn.attention(q[None, b:b + 1], kb, vb, causal=True, return_lse=True)
        outs.append((o[0, 0], l[0, :, 0]))
        grads.append(cpuattn.attention_backward(dout[None, b:b + 1], q[None, b:b + 1], kb, vb,
                                                o, l, causal=True))
    out = np.stack([o for o, _ in outs])
    lse = np.stack([l for _, l in outs], axis=1)
    dq, dk_pages, dv_pages = cpuattn.paged_attention_backward(
        dout, q, k_pages, v_pages, bt, seq_lens, out, lse)
    np.testing.assert_allclose(dq, np.concatenate([g[0][0] for g in grads]), rtol=1e-6)
    dk0, dk1 = grads[0][1][0], grads[1][1][0]
    np.testing.assert_allclose(dk_pages[3], dk0[:4] + dk1[:4], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dk_pages[1][:2], dk0[4:6], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dv_pages[3], grads[0][2][0][:4] + grads[1][2][0][:4],
                               rtol=1e-5, atol=1e-7)
    assert np.all(dk_pages[[0, 5]] == 0) and np.all(dk_pages[1][2:] == 0)


def test_paged_bad_inputs():
    rng = np.random.default_rng(13)
    k_pages, v_pages, bt, seq_lens, k, v, cuk = paged_setup(rng, [5, 9], 4, 2, 1, 8)
    q = rand(rng, (2, 2, 8), np.float32)
    out, lse = np.zeros_like(q), np.zeros((2, 2), np.float32)
    def args(**kw):
        return dict(dict(dout=q, q=q, k_pages=k_pages, v_pages=v_pages, block_table=bt,
                         seq_lens=seq_lens, out=out, lse=lse), **kw)
    bad = bt.copy()
    bad[1, 2] = k_pages.shape[0]
    with pytest.raises(cpuattn.PageError, match="block_table"):
        cpuattn.paged_attention_backward(**args(block_table=bad))
    bad[1, 2] = -1
    with pytest.raises(cpuattn.PageError, match="block_table"):
        cpuattn.paged_attention_backward(**args(block_table=bad))
    with pytest.raises(cpuattn.ShapeError, match="seq_lens"):
        cpuattn.paged_attention_backward(**args(seq_lens=np.array([5, 100], np.int32)))
    with pytest.raises(cpuattn.ShapeError, match="seq_lens"):
        cpuattn.paged_attention_backward(**args(seq_lens=np.array([5, -1], np.int32)))
    q3 = rand(rng, (8, 2, 8), np.float32)
    lse3 = np.zeros((2, 8), np.float32)
    with pytest.raises(cpuattn.ShapeError, match="cu_seqlens_q"):   # 6 queries, 5 tokens
        cpuattn.paged_attention_backward(**args(dout=q3, q=q3, out=q3, lse=lse3,
                                                cu_seqlens_q=np.array([0, 6, 8], np.int32)))
    with pytest.raises(cpuattn.ShapeError, match="lse"):
        cpuattn.paged_attention_backward(**args(lse=np.zeros((2, 3), np.float32)))
    with pytest.raises(cpuattn.DTypeError, match="k_pages"):
        cpuattn.paged_attention_backward(**args(dout=q.astype(np.float64), q=q.astype(np.float64),
                                                out=out.astype(np.float64),
                                                lse=lse.astype(np.float64)))


def test_dense_bad_inputs():
    rng = np.random.default_rng(14)
    dout, q, k, v = make(rng, 1, 6, 8, 2, 1, 8, dtype=np.float32)
    out, lse = cpuattn.attention(q, k, v, return_lse=True)
    bw = cpuattn.attention_backward
    with pytest.raises(cpuattn.ShapeError, match="lse"):
        bw(dout, q, k, v, out, lse[:, :, :-1])
    with pytest.raises(cpuattn.DTypeError, match="lse"):
        bw(dout, q, k, v, out, lse.astype(np.float64))
    with pytest.raises(cpuattn.DTypeError, match="dout"):
        bw(dout.astype(np.float64), q, k, v, out, lse)
    with pytest.raises(cpuattn.ShapeError, match="out"):
        bw(dout, q, k, v, out[:, :-1], lse)
    with pytest.raises(cpuattn.DTypeError, match="k"):
        bw(dout, q, k.astype(np.float64), v, out, lse)
    with pytest.raises(cpuattn.DTypeError, match="q"):
        bw(dout, q.astype(np.int32), k, v, out, lse)
    with pytest.raises(cpuattn.ShapeError, match="num_heads"):
        bw(dout, q, np.concatenate([k, k, k], 2), np.concatenate([v, v, v], 2), out, lse)
    with pytest.raises(cpuattn.ShapeError, match="q"):
        bw(dout[0], q[0], k[0], v[0], out[0], lse[0])
    with pytest.raises(cpuattn.ShapeError, match="scale"):
        bw(dout, q, k, v, out, lse, scale=float("nan"))
    with pytest.raises(cpuattn.ShapeError, match="window"):
        bw(dout, q, k, v, out, lse, window=(-2, 0))
    with pytest.raises(cpuattn.ShapeError, match="softcap"):
        bw(dout, q, k, v, out, lse, softcap=-1.0)
    with pytest.raises(cpuattn.ShapeError, match="cu_seqlens_q"):
        cpuattn.attention_varlen_backward(dout[0], q[0], k[0], v[0], out[0], lse[0],
                                          [0, 7], [0, 8])


# ---- torch ----

def bottom_right_mask(torch, sq, sk, causal, window):
    return torch.from_numpy(visible_mask(sq, sk, causal, window))


@pytest.mark.parametrize("sq,sk,h,hkv,causal,window", [
    (40, 40, 4, 4, False, (-1, -1)),
    (40, 70, 6, 2, True, (-1, -1)),
    (33, 50, 4, 1, True, (12, -1)),
])
def test_against_torch_sdpa_autograd(sq, sk, h, hkv, causal, window):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(15)
    dout, q, k, v = make(rng, 2, sq, sk, h, hkv, 24)
    tq, tk, tv = (torch.tensor(x.transpose(0, 2, 1, 3), requires_grad=True) for x in (q, k, v))
    g = h // hkv
    mask = bottom_right_mask(torch, sq, sk, causal, window)
    o = F.scaled_dot_product_attention(tq, tk.repeat_interleave(g, 1), tv.repeat_interleave(g, 1),
                                       attn_mask=mask)
    o.backward(torch.from_numpy(dout.transpose(0, 2, 1, 3)))
    want = [t.grad.numpy().transpose(0, 2, 1, 3) for t in (tq, tk, tv)]
    assert_grads_close(run_backward(dout, q, k, v, causal=causal, window=window), want, 1e-12)


def test_torch_adapter_gradcheck():
    torch = pytest.importorskip("torch")
    import cpuattn.torch as ct

    rng = np.random.default_rng(16)
    q, k, v = (torch.tensor(rand(rng, s), requires_grad=True)
               for s in ((1, 4, 4, 3), (1, 6, 2, 3), (1, 6, 2, 3)))
    for opts in (dict(causal=True), dict(window=(2, 1), softcap=1.5)):
        assert torch.autograd.gradcheck(lambda q, k, v: ct.attention(q, k, v, **opts), (q, k, v))
    out = ct.attention(q, k, v, causal=True)
    np.testing.assert_array_equal(out.detach().numpy(), cpuattn.attention(
        q.detach().numpy(), k.detach().numpy(), v.detach().numpy(), causal=True))


def test_torch_adapter_bfloat16_and_layouts():
    torch = pytest.importorskip("torch")
    pytest.importorskip("ml_dtypes")
    import cpuattn.torch as ct

    torch.manual_seed(0)
    base = [torch.randn(2, 4, 30, 16) for _ in range(3)]   # (B, H, S, D) storage
    q32, k32, v32 = (x.transpose(1, 2).requires_grad_() for x in base)
    ct.attention(q32, k32, v32, causal=True).square().sum().backward()
    q16, k16, v16 = (x.to(torch.bfloat16).transpose(1, 2).detach().requires_grad_() for x in base)
    out = ct.attention(q16, k16, v16, causal=True)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 30, 4, 16)
    out.float().square().sum().backward()
    for lo, hi in ((q16, q32), (k16, k32), (v16, v32)):
        assert lo.grad.dtype == torch.bfloat16
        err = (lo.grad.float() - hi.grad).abs().max() / hi.grad.abs().max()
        assert err < 5e-2
    with pytest.raises(cpuattn.DTypeError):
        ct.attention(q32.int(), k32, v32)
