"""Paged attention (decode and cu_seqlens_q) and page-chain gather."""
import numpy as np
import pytest

import cpuattn
from cpuattn import CpuAttnError, DTypeError, PageError, ShapeError
from conftest import BF16, assert_lse, make_pages, randn, ref_paged, tol

CASES = [  # (seq_lens, page_size, heads, kv_heads, head_dim)
    ([5], 1, 4, 1, 32),
    ([0, 1, 37, 600], 16, 8, 2, 64),
    ([17, 1000, 3], 7, 6, 3, 40),
    ([513, 512, 511], 32, 8, 8, 128),
    ([2048], 16, 32, 8, 128),
    ([33, 90], 16, 7, 1, 80),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"P{c[1]}H{c[2]}/{c[3]}D{c[4]}")
def test_decode_against_reference(rng, case):
    lens, page, h, hkv, d = case
    kp, vp, bt, lens = make_pages(rng, lens, page, hkv, d)
    q = randn(rng, (len(lens), h, d))
    out, lse = cpuattn.paged_attention(q, kp, vp, bt, lens, return_lse=True)
    ref, ref_lse = ref_paged(q, kp, vp, bt, lens)
    np.testing.assert_allclose(out, ref, **tol(np.float32))
    assert_lse(lse, ref_lse)
    assert np.all(out[lens == 0] == 0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"P{c[1]}H{c[2]}/{c[3]}D{c[4]}")
@pytest.mark.parametrize("opts", [{}, {"window": (40, -1)}, {"softcap": 8.0},
                                  {"causal": False, "window": (7, 3)}], ids=str)
def test_chunked_prefill_against_reference(rng, case, opts):
    lens, page, h, hkv, d = case
    kp, vp, bt, lens = make_pages(rng, lens, page, hkv, d)
    nq = np.minimum(lens, [1, 70, 2, 9][: len(lens)] + [3] * max(0, len(lens) - 4))
    cu = np.concatenate([[0], np.cumsum(nq)]).astype(np.int32)
    q = randn(rng, (cu[-1], h, d))
    out, lse = cpuattn.paged_attention(q, kp, vp, bt, lens, cu_seqlens_q=cu, return_lse=True, **opts)
    ref, ref_lse = ref_paged(q, kp, vp, bt, lens, cu, **opts)
    np.testing.assert_allclose(out, ref, **tol(np.float32))
    assert_lse(lse, ref_lse)


def test_every_simd_path(rng, each_isa):
    kp, vp, bt, lens = make_pages(rng, [700, 5, 64], 16, 2, 72)
    q = randn(rng, (3, 8, 72))
    np.testing.assert_allclose(cpuattn.paged_attention(q, kp, vp, bt, lens),
                               ref_paged(q, kp, vp, bt, lens)[0], **tol(np.float32))
    cu = np.array([0, 20, 22, 86], np.int32)
    q2 = randn(rng, (86, 8, 72))
    np.testing.assert_allclose(cpuattn.paged_attention(q2, kp, vp, bt, lens, cu_seqlens_q=cu),
                               ref_paged(q2, kp, vp, bt, lens, cu)[0], **tol(np.float32))


@pytest.mark.parametrize("dtype", [np.float16, BF16], ids=["float16", "bfloat16"])
def test_low_precision_pages_with_fp32_queries(rng, dtype):
    if dtype is None:
        pytest.skip("ml_dtypes not installed")
    kp, vp, bt, lens = make_pages(rng, [300, 1030], 16, 2, 64, dtype=dtype)
    q = randn(rng, (2, 8, 64))
    out = cpuattn.paged_attention(q, kp, vp, bt, lens)
    assert out.dtype == np.float32
    # the pages hold exactly what the reference sees: only accumulation differs
    np.testing.assert_allclose(out, ref_paged(q, kp, vp, bt, lens)[0], atol=1e-5, rtol=1e-5)
    qh = q.astype(dtype)
    outh = cpuattn.paged_attention(qh, kp, vp, bt, lens)
    assert outh.dtype == dtype
    np.testing.assert_allclose(outh.astype(np.float64), ref_paged(qh, kp, vp, bt, lens)[0], **tol(dtype))


def test_shared_pages_and_any_page_order(rng):
    kp, vp, bt, lens = make_pages(rng, [48, 48], 16, 2, 32, spare=0)
    bt[1] = bt[0]                       # two sequences share one chain (a fork)
    q = randn(rng, (2, 4, 32))
    q[1] = q[0]
    out = cpuattn.paged_attention(q, kp, vp, bt, lens)
    assert out[0].tobytes() == out[1].tobytes()


def test_stale_and_unused_slots_never_read(rng):
    # make_pages fills spare pages and the tail of each last page with NaN/inf
    kp, vp, bt, lens = make_pages(rng, [30, 17, 1], 16, 2, 32, spare=4)
    q = randn(rng, (3, 4, 32))
    out = cpuattn.paged_attention(q, kp, vp, bt, lens)
    assert np.isfinite(out).all()
    bt2 = bt.copy()
    bt2[bt2 < 0] = 10**6                # unused entries may hold anything
    np.testing.assert_array_equal(cpuattn.paged_attention(q, kp, vp, bt2.astype(np.int64), lens), out)


def test_batch_invariance_and_threads(rng, threads):
    kp, vp, bt, lens = make_pages(rng, [2000, 40, 700], 16, 2, 64)
    q = randn(rng, (3, 8, 64))
    threads(2)
    full = cpuattn.paged_attention(q, kp, vp, bt, lens)
    for b in range(3):
        alone = cpuattn.paged_attention(q[b:b + 1], kp, vp, bt[b:b + 1], lens[b:b + 1])
        assert alone.tobytes() == full[b:b + 1].tobytes()
    for n in (1, 3):
        threads(n)
        assert cpuattn.paged_attention(q, kp, vp, bt, lens).tobytes() == full.tobytes()


def test_decode_matches_dense(rng):
    kp, vp, bt, lens = make_pages(rng, [100], 16, 2, 32)
    k = cpuattn.gather_pages(kp, bt, lens)
    v = cpuattn.gather_pages(vp, bt, lens)
    q = randn(rng, (1, 4, 32))
    np.testing.assert_allclose(cpuattn.paged_attention(q, kp, vp, bt, lens),
                               cpuattn.attention(q[:, None], k, v, causal=True)[:, 0], atol=1e-6)


def test_gather_pages(rng):
    kp, vp, bt, lens = make_pages(rng, [20, 0, 33], 8, 2, 4)
    dense = cpuattn.gather_pages(kp, bt, lens)
    assert dense.shape == (3, 33, 2, 4)
    assert np.all(dense[1] == 0) and np.all(dense[0, 20:] == 0)
    for b, n in enumerate(lens):
        for j in range(n):
            np.testing.assert_array_equal(dense[b, j], kp[bt[b, j // 8], j % 8])


def test_out_and_lse_shapes(rng):
    kp, vp, bt, lens = make_pages(rng, [10, 20], 4, 1, 8)
    q = randn(rng, (2, 2, 8))
    out = np.empty((2, 2, 8), np.float32)
    res, lse = cpuattn.paged_attention(q, kp, vp, bt, lens, out=out, return_lse=True)
    assert res is out and lse.shape == (2, 2) and lse.dtype == np.float32


def test_bad_input_raises_documented_error(rng):
    kp, vp, bt, lens = make_pages(rng, [10, 20], 4, 2, 8, spare=0)
    q = randn(rng, (2, 4, 8))
    num_pages = kp.shape[0]
    bad_bt = bt.copy()
    bad_bt[1, 0] = num_pages
    neg_bt = bt.copy()
    neg_bt[0, 1] = -1
    cases = [
        (dict(block_table=bad_bt), PageError, "block_table"),
        (dict(block_table=neg_bt), PageError, "block_table"),
        (dict(seq_lens=np.array([10, 10**3], np.int32)), ShapeError, "seq_lens"),
        (dict(seq_lens=np.array([-1, 3], np.int32)), ShapeError, "seq_lens"),
        (dict(seq_lens=np.array([1], np.int32)), ShapeError, "seq_lens"),
        (dict(q=q[:1]), ShapeError, "q"),
        (dict(q=randn(rng, (3, 4, 8)), cu_seqlens_q=np.array([0, 1, 2, 3])), ShapeError, "cu_seqlens_q"),
        (dict(q=randn(rng, (12, 4, 8)), cu_seqlens_q=np.array([0, 11, 12])), ShapeError, "queries"),
        (dict(q=q.astype(np.float64)), DTypeError, "k_pages"),
        (dict(v_pages=vp.astype(np.float64)), DTypeError, "v_pages"),
        (dict(v_pages=vp[:, :2]), ShapeError, "v_pages"),
        (dict(block_table=bt.astype(np.float32)), DTypeError, "block_table"),
        (dict(q=randn(rng, (2, 3, 8))), ShapeError, "num_heads"),
    ]
    for change, exc, word in cases:
        args = dict(q=q, k_pages=kp, v_pages=vp, block_table=bt, seq_lens=lens)
        args.update(change)
        with pytest.raises(exc, match=word) as info:
            cpuattn.paged_attention(args.pop("q"), args.pop("k_pages"), args.pop("v_pages"),
                                    args.pop("block_table"), args.pop("seq_lens"), **args)
        assert isinstance(info.value, CpuAttnError)


@pytest.mark.parametrize("hkv,g,nq", [(9, 1, 1), (12, 2, 2), (16, 3, 1), (3, 8, 1), (10, 2, 4),
                                      (1, 5, 1), (2, 1, 7)])
@pytest.mark.parametrize("opts", [{}, {"window": (300, -1), "softcap": 5.0},
                                  {"causal": False, "window": (2, 1)}], ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=["float32", "float16", "bfloat16"])
def test_decode_kernel_head_groups(rng, each_isa, hkv, g, nq, opts, dtype):
    """The decode kernel (g * nq <= 8 query rows per kv head) takes up to 8 kv
    heads per work item: partial last groups, split-KV boundaries, queries
    hidden from some keys (nq > 1, windows) and stale NaN/inf slots. head_dim
    72 has whole vector chunks and a tail on every SIMD path (bf16 pages are
    read in pairs of vectors)."""
    if dtype is None:
        pytest.skip("ml_dtypes not installed")
    lens = np.array([nq, 511, 1025, 0, 77], np.int32)
    kp, vp, bt, lens = make_pages(rng, lens, 16, hkv, 72, dtype=dtype)
    nqs = np.minimum(lens, nq)
    cu = np.concatenate([[0], np.cumsum(nqs)]).astype(np.int32)
    q = randn(rng, (cu[-1], hkv * g, 72))
    out, lse = cpuattn.paged_attention(q, kp, vp, bt, lens, cu_seqlens_q=cu, return_lse=True, **opts)
    ref, ref_lse = ref_paged(q, kp, vp, bt, lens, cu, **opts)
    np.testing.assert_allclose(out, ref, **tol(np.float32))
    seen = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isneginf(lse), ~seen)
    np.testing.assert_allclose(lse[seen], ref_lse[seen], **tol(np.float32))
    assert np.all(out[~seen.T] == 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16, np.float64],
                         ids=["float32", "float16", "bfloat16", "float64"])
def test_decode_fast_path_matches_general_path(rng, dtype):
    """Plain decode calls take a C-checked entry point; any other form of the
    same call (int64 index arrays, lists, out=) takes the general checks. The
    results must be the same bytes, and bad input must still raise."""
    if dtype is None:
        pytest.skip("ml_dtypes not installed")
    kp, vp, bt, lens = make_pages(rng, [0, 1, 300, 17], 16, 2, 48, dtype=dtype)
    qd = np.float64 if dtype == np.float64 else np.float32
    q = randn(rng, (4, 6, 48), qd)
    fast, fast_lse = cpuattn.paged_attention(q, kp, vp, bt, lens, return_lse=True, softcap=3.0,
                                             window=(100, -1), scale=0.2)
    out = np.empty_like(fast)
    slow, slow_lse = cpuattn.paged_attention(q, kp, vp, bt.astype(np.int64), lens.tolist(),
                                             return_lse=True, softcap=3.0, window=(100, -1),
                                             scale=0.2, out=out)
    assert slow is out
    assert fast.tobytes() == slow.tobytes() and fast_lse.tobytes() == slow_lse.tobytes()
    ref, _ = ref_paged(q, kp, vp, bt, lens, softcap=3.0, window=(100, -1), scale=0.2)
    np.testing.assert_allclose(fast, ref, **tol(np.float64 if dtype == np.float64 else np.float32))
    bad = bt.copy()
    bad[2, 0] = kp.shape[0]
    with pytest.raises(PageError, match=r"block_table\[2, 0\]"):
        cpuattn.paged_attention(q, kp, vp, bad, lens)
    with pytest.raises(ShapeError, match="seq_lens"):
        cpuattn.paged_attention(q, kp, vp, bt, np.array([0, 1, 300, -1], np.int32))
    with pytest.raises(ShapeError, match="window"):
        cpuattn.paged_attention(q, kp, vp, bt, lens, window=(-2, 0))
    with pytest.raises(ShapeError, match="causal"):
        cpuattn.paged_attention(q, kp, vp, bt, lens, causal=1)


@pytest.mark.parametrize("hkv,g,lens", [(1, 4, [9000, 4096, 4097]), (2, 3, [5000, 2047]),
                                        (3, 2, [2100, 1024]), (5, 1, [1500])])
@pytest.mark.parametrize("dtype", [np.float32, BF16], ids=["float32", "bfloat16"])
def test_decode_long_splits_with_few_kv_heads(rng, each_isa, hkv, g, lens, dtype):
    """A decode item with fewer than 8 kv heads takes proportionally more keys
    per split (MQA: 4096): long sequences cross those split boundaries, with
    a window and queries hidden from some keys (nq = 2)."""
    if dtype is None:
        pytest.skip("ml_dtypes not installed")
    kp, vp, bt, lens = make_pages(rng, lens, 16, hkv, 64, dtype=dtype)
    q = randn(rng, (len(lens), hkv * g, 64))
    for opts in ({}, {"window": (3000, -1)}):
        out, lse = cpuattn.paged_attention(q, kp, vp, bt, lens, return_lse=True, **opts)
        ref, ref_lse = ref_paged(q, kp, vp, bt, lens, **opts)
        np.testing.assert_allclose(out, ref, **tol(np.float32))
        np.testing.assert_allclose(lse, ref_lse, **tol(np.float32))
    if g <= 4:
        cu = np.concatenate([[0], np.cumsum(np.full(len(lens), 2))]).astype(np.int32)
        q2 = randn(rng, (cu[-1], hkv * g, 64))
        out = cpuattn.paged_attention(q2, kp, vp, bt, lens, cu_seqlens_q=cu)
        np.testing.assert_allclose(out, ref_paged(q2, kp, vp, bt, lens, cu)[0], **tol(np.float32))


@pytest.mark.parametrize("window", [(10**30, -1), (2**63, 0), (-1, 2**40)])
def test_window_wider_than_any_position_is_unbounded(rng, window):
    """A window wider than any int32 position means no limit on that side (it
    used to overflow the C int64 conversion with an OverflowError)."""
    kp, vp, bt, lens = make_pages(rng, [40, 7], 16, 2, 16)
    q = randn(rng, (2, 4, 16))
    bounded = tuple(-1 if w > 2**31 else w for w in window)
    for call in (lambda w: cpuattn.paged_attention(q, kp, vp, bt, lens, window=w),
                 lambda w: cpuattn.paged_attention(q, kp, vp, bt.astype(np.int64), lens, window=w)):
        assert call(window).tobytes() == call(bounded).tobytes()
    qd, kd = randn(rng, (1, 5, 4, 16)), randn(rng, (1, 9, 2, 16))
    out = cpuattn.attention(qd, kd, kd, window=window)
    assert out.tobytes() == cpuattn.attention(qd, kd, kd, window=bounded).tobytes()
