"""Dense and packed (varlen) flash attention against the float64 oracle."""
import threading

import numpy as np
import pytest

import cpuattn
from cpuattn import CpuAttnError, DTypeError, ShapeError
from conftest import BF16, assert_lse, make_pages, randn, ref_paged, ref_varlen, tol

# (batch, seq_q, seq_k, heads, kv_heads, head_dim)
SHAPES = [
    (1, 1, 1, 1, 1, 1),
    (2, 5, 7, 4, 2, 16),
    (1, 1, 300, 8, 1, 64),        # decode-shaped, MQA
    (1, 100, 130, 8, 2, 40),      # odd head_dim
    (2, 63, 65, 3, 1, 80),        # tile boundaries, group of 3
    (1, 200, 70, 4, 4, 33),       # seq_q > seq_k
    (1, 129, 129, 6, 3, 96),
    (1, 70, 600, 8, 8, 112),      # several tiles, no GQA
    (1, 40, 1100, 4, 2, 128),     # crosses split-KV chunks (one query block)
    (1, 17, 33, 16, 2, 256),      # group of 8
    (1, 3, 20, 14, 2, 64),        # group of 7
]


def run_and_check(q, k, v, dtype, **opts):
    out, lse = cpuattn.attention(q, k, v, return_lse=True, **opts)
    ref, ref_lse = cpuattn.reference_attention(q, k, v, return_lse=True, **opts)
    assert out.dtype == q.dtype and out.shape == ref.shape
    np.testing.assert_allclose(out.astype(np.float64), ref, **tol(dtype))
    assert lse.dtype == (np.float64 if dtype == np.float64 else np.float32)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], **tol(lse.dtype))
    return out, lse


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shapes_against_reference(rng, shape, causal, dtype):
    b, sq, sk, h, hkv, d = shape
    q, k, v = randn(rng, (b, sq, h, d), dtype), randn(rng, (b, sk, hkv, d), dtype), \
        randn(rng, (b, sk, hkv, d), dtype)
    run_and_check(q, k, v, dtype, causal=causal)


@pytest.mark.parametrize("shape", [(1, 70, 90, 4, 2, 64), (1, 2, 700, 8, 2, 128),
                                   (1, 33, 33, 4, 4, 40)])
def test_every_simd_path(rng, each_isa, shape):
    b, sq, sk, h, hkv, d = shape
    q, k, v = randn(rng, (b, sq, h, d)), randn(rng, (b, sk, hkv, d)), randn(rng, (b, sk, hkv, d))
    for opts in ({"causal": True}, {"window": (20, 5), "softcap": 3.0}):
        run_and_check(q, k, v, np.float32, **opts)
    run_and_check(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), np.float64,
                  causal=True)


@pytest.mark.parametrize("window", [(0, 0), (5, -1), (-1, 3), (16, 16), (100, 0)])
@pytest.mark.parametrize("causal", [False, True])
def test_window(rng, window, causal):
    q, k, v = randn(rng, (1, 90, 4, 32)), randn(rng, (1, 150, 2, 32)), randn(rng, (1, 150, 2, 32))
    run_and_check(q, k, v, np.float32, causal=causal, window=window)


@pytest.mark.parametrize("sk", [63, 64, 65, 511, 512, 513])
def test_softcap_at_tile_boundaries(rng, sk):
    # a padded key must not come back through tanh as a finite score
    q, k, v = randn(rng, (1, 3, 4, 64)), randn(rng, (1, sk, 4, 64)), randn(rng, (1, sk, 4, 64))
    run_and_check(q * 4, k * 4, v, np.float32, softcap=2.0)
    run_and_check(q, k, v, np.float32, softcap=30.0, causal=True)


def test_scale_and_dv_differs(rng):
    q, k, v = randn(rng, (2, 9, 4, 48)), randn(rng, (2, 11, 2, 48)), randn(rng, (2, 11, 2, 24))
    out, _ = run_and_check(q, k, v, np.float32, scale=0.3, causal=True)
    assert out.shape == (2, 9, 4, 24)


@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["float16", "bfloat16"])
def test_half_precision(rng, dtype):
    if dtype is None:
        pytest.skip("ml_dtypes not installed")
    q, k, v = (randn(rng, s).astype(dtype) for s in [(1, 40, 8, 64), (1, 90, 2, 64), (1, 90, 2, 64)])
    out = cpuattn.attention(q, k, v, causal=True)
    assert out.dtype == dtype
    ref = cpuattn.reference_attention(q, k, v, causal=True)
    np.testing.assert_allclose(out.astype(np.float64), ref, **tol(dtype))


def test_rows_that_see_no_key_are_zero(rng):
    # causal with seq_q > seq_k: the first seq_q - seq_k rows see nothing
    q, k, v = randn(rng, (1, 6, 2, 8)), randn(rng, (1, 2, 2, 8)), randn(rng, (1, 2, 2, 8))
    out, lse = cpuattn.attention(q, k, v, causal=True, return_lse=True)
    assert np.all(out[0, :4] == 0) and np.all(np.isneginf(lse[0, :, :4]))
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse[0, :, 4:]))
    # no keys at all
    out, lse = cpuattn.attention(q, k[:, :0], v[:, :0], return_lse=True)
    assert np.all(out == 0) and np.all(np.isneginf(lse))


def test_hidden_nan_does_not_leak_visible_nan_does(rng):
    q, k, v = randn(rng, (1, 100, 4, 32)), randn(rng, (1, 100, 2, 32)), randn(rng, (1, 100, 2, 32))
    clean = cpuattn.attention(q, k, v, causal=True)
    k2, v2 = k.copy(), v.copy()
    k2[0, 70:] = np.nan   # keys 70.. are hidden from rows < 70
    v2[0, 70:] = np.inf
    dirty = cpuattn.attention(q, k2, v2, causal=True)
    np.testing.assert_array_equal(dirty[0, :70], clean[0, :70])
    assert np.all(np.isnan(dirty[0, 70:]))
    q2 = q.copy()
    q2[0, 5, 1] = np.nan
    out = cpuattn.attention(q2, k, v, causal=True)
    assert np.all(np.isnan(out[0, 5, 1])) and np.isfinite(np.delete(out[0, 5], 1, axis=0)).all()


def test_strided_inputs_without_copy(rng):
    # (B, H, S, D) arrays passed as transposed views; negative strides
    qt, kt, vt = randn(rng, (2, 4, 50, 32)), randn(rng, (2, 2, 60, 32)), randn(rng, (2, 2, 60, 32))
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (qt, kt, vt))
    ref = cpuattn.reference_attention(q, k, v, causal=True)
    np.testing.assert_allclose(cpuattn.attention(q, k, v, causal=True), ref, **tol(np.float32))
    qr = np.ascontiguousarray(q[:, ::-1])[:, ::-1]
    np.testing.assert_allclose(cpuattn.attention(qr, k, v, causal=True), ref, **tol(np.float32))
    # broadcast (stride-0) K/V and a non-contiguous last axis (copied once)
    kb = np.broadcast_to(k[:1], k.shape)
    vb = np.broadcast_to(v[:1], v.shape)
    np.testing.assert_allclose(cpuattn.attention(q, kb, vb),
                               cpuattn.reference_attention(q, kb, vb), **tol(np.float32))
    qd = np.asfortranarray(q)
    np.testing.assert_allclose(cpuattn.attention(qd[..., ::1], k, v, causal=True), ref,
                               **tol(np.float32))
    q_odd = randn(rng, (2, 50, 4, 64))[..., ::2]
    np.testing.assert_allclose(cpuattn.attention(q_odd, k, v),
                               cpuattn.reference_attention(q_odd, k, v), **tol(np.float32))


def test_out_in_place(rng):
    q, k, v = randn(rng, (1, 30, 4, 16)), randn(rng, (1, 30, 4, 16)), randn(rng, (1, 30, 4, 16))
    ref = cpuattn.attention(q, k, v, causal=True)
    out = np.full_like(q, 7.0)
    res = cpuattn.attention(q, k, v, causal=True, out=out)
    assert res is out
    np.testing.assert_array_equal(out, ref)
    qc = q.copy()
    cpuattn.attention(qc, k, v, causal=True, out=qc)
    np.testing.assert_array_equal(qc, ref)


def test_varlen_with_empty_sequences(rng):
    lens_q = [3, 0, 50, 1, 0, 70]
    lens_k = [3, 5, 80, 0, 0, 70]
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q, k, v = randn(rng, (cu_q[-1], 6, 40)), randn(rng, (cu_k[-1], 2, 40)), randn(rng, (cu_k[-1], 2, 40))
    for opts in ({"causal": True}, {"causal": False, "window": (10, 2), "softcap": 5.0}):
        out, lse = cpuattn.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **opts)
        ref, ref_lse = ref_varlen(q, k, v, cu_q, cu_k, **opts)
        np.testing.assert_allclose(out, ref, **tol(np.float32))
        assert lse.shape == (6, cu_q[-1])
        assert_lse(lse, ref_lse)


def test_batch_invariance_bitwise(rng):
    """A sequence's rows do not depend on what else is in the batch."""
    lens = [37, 300, 1, 129]
    seqs = [(randn(rng, (n, 8, 64)), randn(rng, (n, 2, 64)), randn(rng, (n, 2, 64))) for n in lens]
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    packed = cpuattn.attention_varlen(*(np.concatenate(x) for x in zip(*seqs)), cu, cu, causal=True)
    for b, (q, k, v) in enumerate(seqs):
        alone = cpuattn.attention(q[None], k[None], v[None], causal=True)[0]
        assert alone.tobytes() == packed[cu[b]:cu[b + 1]].tobytes()
    order = [2, 0, 3, 1]
    cu2 = np.concatenate([[0], np.cumsum([lens[i] for i in order])]).astype(np.int32)
    shuffled = cpuattn.attention_varlen(*(np.concatenate([seqs[i][j] for i in order])
                                          for j in range(3)), cu2, cu2, causal=True)
    for pos, b in enumerate(order):
        assert shuffled[cu2[pos]:cu2[pos + 1]].tobytes() == packed[cu[b]:cu[b + 1]].tobytes()


def test_deterministic_across_thread_counts(rng, threads):
    q, k, v = randn(rng, (2, 150, 8, 64)), randn(rng, (2, 700, 2, 64)), randn(rng, (2, 700, 2, 64))
    q1 = randn(rng, (3, 1, 8, 64))
    results = []
    for n in (1, 2, 3):
        threads(n)
        results.append((cpuattn.attention(q, k, v, causal=True).tobytes(),
                        cpuattn.attention(q1, k[:1].repeat(3, 0), v[:1].repeat(3, 0)).tobytes()))
    assert results[0] == results[1] == results[2]


def test_concurrent_calls_from_python_threads(rng):
    cases = [(randn(rng, (1, 64, 4, 32)), randn(rng, (1, 200, 2, 32)), randn(rng, (1, 200, 2, 32)))
             for _ in range(6)]
    expected = [cpuattn.attention(*c, causal=True) for c in cases]
    errors, results = [], [None] * len(cases)

    def work(i):
        try:
            for _ in range(5):
                results[i] = cpuattn.attention(*cases[i], causal=True)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    for r, e in zip(results, expected):
        np.testing.assert_array_equal(r, e)


def test_long_sequence_accumulates_in_fp32(rng):
    # 32k keys with large-magnitude scores: the softmax statistics stay fp32
    sk = 32768
    q, k, v = randn(rng, (1, 2, 2, 64)) * 3, randn(rng, (1, sk, 1, 64)) * 3, randn(rng, (1, sk, 1, 64))
    run_and_check(q, k, v, np.float32)


BAD = [
    (lambda q, k, v: cpuattn.attention(q[0], k, v), ShapeError, "q"),
    (lambda q, k, v: cpuattn.attention(q, k[:, :, :1].repeat(3, 2), v), ShapeError, "num_kv_heads"),
    (lambda q, k, v: cpuattn.attention(q, k[..., :8], v), ShapeError, "head_dim"),
    (lambda q, k, v: cpuattn.attention(q, k[:1], v[:1]), ShapeError, "batch"),
    (lambda q, k, v: cpuattn.attention(q, k, v[:, :3]), ShapeError, "seq_k"),
    (lambda q, k, v: cpuattn.attention(q.astype(np.int32), k, v), DTypeError, "q"),
    (lambda q, k, v: cpuattn.attention(q, k.astype(np.float64), v), DTypeError, "k"),
    (lambda q, k, v: cpuattn.attention(q, k, v, softcap=-1.0), ShapeError, "softcap"),
    (lambda q, k, v: cpuattn.attention(q, k, v, softcap=float("nan")), ShapeError, "softcap"),
    (lambda q, k, v: cpuattn.attention(q, k, v, scale=float("inf")), ShapeError, "scale"),
    (lambda q, k, v: cpuattn.attention(q, k, v, window=(-2, 0)), ShapeError, "window"),
    (lambda q, k, v: cpuattn.attention(q, k, v, window=(1,)), ShapeError, "window"),
    (lambda q, k, v: cpuattn.attention(q, k, v, causal="yes"), ShapeError, "causal"),
    (lambda q, k, v: cpuattn.attention(q, k, v, out=np.empty((1, 2, 3))), ShapeError, "out"),
    (lambda q, k, v: cpuattn.attention(q, k, v, out=np.empty(q.shape, np.float64)), DTypeError, "out"),
    (lambda q, k, v: cpuattn.attention(q, k, v, out=k), ShapeError, "out"),
    (lambda q, k, v: cpuattn.attention("abc", k, v), DTypeError, "q"),
]


@pytest.mark.parametrize("call,exc,word", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_raises_documented_error(rng, call, exc, word):
    q, k, v = randn(rng, (2, 5, 4, 16)), randn(rng, (2, 6, 2, 16)), randn(rng, (2, 6, 2, 16))
    before = [x.copy() for x in (q, k, v)]
    with pytest.raises(exc) as info:
        call(q, k, v)
    assert isinstance(info.value, CpuAttnError)
    assert word in str(info.value)
    for x, y in zip((q, k, v), before):
        np.testing.assert_array_equal(x, y)


def test_read_only_out_and_varlen_errors(rng):
    q, k, v = randn(rng, (5, 4, 16)), randn(rng, (6, 2, 16)), randn(rng, (6, 2, 16))
    cu_q, cu_k = np.array([0, 2, 5], np.int32), np.array([0, 3, 6], np.int32)
    out = np.empty((5, 4, 16), np.float32)
    out.flags.writeable = False
    with pytest.raises(ShapeError, match="out"):
        cpuattn.attention_varlen(q, k, v, cu_q, cu_k, out=out)
    for bad_q, bad_k, word in [([0, 3, 2, 5], [0, 1, 2, 6], "non-decreasing"),
                               ([1, 2, 5], cu_k, "start at 0"), ([0, 2, 4], cu_k, "end at"),
                               (cu_q, [0, 6], "shape")]:
        with pytest.raises(ShapeError, match=word):
            cpuattn.attention_varlen(q, k, v, np.array(bad_q), np.array(bad_k))
    with pytest.raises(DTypeError, match="cu_seqlens_q"):
        cpuattn.attention_varlen(q, k, v, cu_q.astype(np.float32), cu_k)


# bfloat16 storage on every path (avx512bf16 runs Q K^T on bf16 pairs). Shapes
# with g * seq_q > 8 take the tiled kernel; odd head_dim pads the last pair.
BF16_SHAPES = [
    (1, 1, 1, 1, 1, 1),
    (1, 100, 130, 8, 2, 40),
    (2, 63, 65, 3, 1, 80),        # group of 3
    (1, 200, 70, 4, 4, 33),       # seq_q > seq_k, odd head_dim, no GQA
    (1, 129, 129, 6, 3, 96),
    (1, 70, 600, 8, 8, 112),
    (1, 40, 1100, 4, 1, 128),     # group of 4, split-KV chunks
    (1, 17, 33, 16, 2, 256),      # group of 8
    (1, 1, 300, 8, 1, 64),        # decode-shaped
]


@pytest.mark.parametrize("shape", BF16_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("opts", [{}, {"causal": True}, {"window": (20, 5), "softcap": 3.0}],
                         ids=["full", "causal", "window-softcap"])
def test_bfloat16_every_simd_path(rng, each_isa, shape, opts):
    if BF16 is None:
        pytest.skip("ml_dtypes not installed")
    b, sq, sk, h, hkv, d = shape
    q, k, v = (randn(rng, s).astype(BF16) for s in [(b, sq, h, d), (b, sk, hkv, d), (b, sk, hkv, d)])
    out, lse = cpuattn.attention(q, k, v, return_lse=True, **opts)
    ref, ref_lse = cpuattn.reference_attention(q, k, v, return_lse=True, **opts)
    assert out.dtype == BF16
    np.testing.assert_allclose(out.astype(np.float64), ref, **tol(BF16))
    # lse is float32 and sees only the scores: the bf16 inputs are exact, so
    # it must be as close as the float32 kernel's (a Q rounded to bf16 after
    # scaling, or bf16 accumulation, would fail this)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], atol=2e-5, rtol=2e-5)


def test_bfloat16_masked_rows_and_hidden_nan(rng, each_isa):
    if BF16 is None:
        pytest.skip("ml_dtypes not installed")
    # seq_q > seq_k causal: the first rows see no key -> exactly 0, lse -inf
    q, k, v = (randn(rng, s).astype(BF16) for s in [(1, 90, 4, 48), (1, 70, 2, 48), (1, 70, 2, 48)])
    out, lse = cpuattn.attention(q, k, v, causal=True, return_lse=True)
    assert np.all(out[0, :20].astype(np.float32) == 0) and np.all(np.isneginf(lse[0, :, :20]))
    assert np.isfinite(lse[0, :, 20:]).all()
    # NaN keys / inf values hidden by the causal mask must not leak
    q, k, v = (randn(rng, s).astype(BF16) for s in [(1, 100, 8, 40), (1, 100, 2, 40), (1, 100, 2, 40)])
    clean = cpuattn.attention(q, k, v, causal=True)
    k2, v2 = k.copy(), v.copy()
    k2[0, 70:] = np.nan
    v2[0, 70:] = np.inf
    dirty = cpuattn.attention(q, k2, v2, causal=True)
    np.testing.assert_array_equal(dirty[0, :70].view(np.uint16), clean[0, :70].view(np.uint16))
    assert np.all(np.isnan(dirty[0, 70:].astype(np.float32)))
    # an inf key seen by a row gives NaN there (inf * q - inf), not a finite value
    k3 = k.copy()
    k3[0, 5, 0, 0] = np.inf
    out3 = cpuattn.attention(q, k3, v, causal=True).astype(np.float32)
    assert np.isnan(out3[0, 5:, :4]).any() and np.isfinite(out3[0, :5]).all()
    assert np.isfinite(out3[0, :, 4:]).all()   # the other KV head never sees it


def test_bfloat16_paged_prefill_every_simd_path(rng, each_isa):
    if BF16 is None:
        pytest.skip("ml_dtypes not installed")
    kp, vp, bt, lens = make_pages(rng, [700, 5, 64], 16, 2, 72, dtype=BF16)
    cu = np.array([0, 20, 22, 86], np.int32)
    q = randn(rng, (86, 8, 72))
    for qd in (BF16, np.float32):   # float32 queries keep the float32 Q K^T
        qq = q.astype(qd)
        out = cpuattn.paged_attention(qq, kp, vp, bt, lens, cu_seqlens_q=cu, window=(100, 0))
        ref = ref_paged(qq, kp, vp, bt, lens, cu, window=(100, 0))[0]
        t = tol(BF16) if qd is BF16 else dict(atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(out.astype(np.float64), ref, **t)
