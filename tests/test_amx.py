"""bfloat16 shapes the amx path takes (head_dim a multiple of 32, Dv of 16),
on every SIMD path of this machine: dense and chunked paged prefill, even and
uneven key rows (pages of 16 and of 6), a 16-dim value tail, MLA's wide
query groups, thread-count determinism, batch invariance, and the same bytes
in a forked child and in a thread started after import (the tile state is
requested once per process and configured per item on each thread).

CI has no AMX: there these run on avx512bf16 (and tests/test_native.py runs
the amx path's tile products emulated in C); on an AMX Xeon each_isa adds
"amx" and the same assertions hold for it."""
import os
import pickle
import threading

import numpy as np
import pytest

import cpuattn
from conftest import make_pages, randn, ref_paged, tol

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = ml_dtypes.bfloat16

# (batch, seq_q, seq_k, heads, kv_heads, head_dim, head_dim_v)
TILE_SHAPES = [
    (1, 150, 150, 8, 2, 128, 128),
    (2, 90, 120, 4, 1, 64, 48),      # a 16-dim value tail
    (1, 33, 300, 8, 8, 64, 64),      # no GQA, more keys than queries
    (1, 2, 200, 32, 1, 192, 128),    # wide query group: 64 rows of one kv head
    (1, 70, 1100, 4, 2, 96, 96),     # split into several key tiles
]


def _bf16(rng, shape):
    return randn(rng, shape).astype(BF16)


def _check(out, ref):
    assert out.dtype == BF16
    np.testing.assert_allclose(out.astype(np.float64), ref, **tol(BF16))


@pytest.mark.parametrize("shape", TILE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("opts", [{"causal": True}, {"causal": False},
                                  {"causal": True, "window": (40, 0), "softcap": 5.0}],
                         ids=["causal", "full", "window-softcap"])
def test_tile_shapes_against_reference(rng, each_isa, shape, opts):
    b, sq, sk, h, hkv, d, dv = shape
    q, k, v = _bf16(rng, (b, sq, h, d)), _bf16(rng, (b, sk, hkv, d)), _bf16(rng, (b, sk, hkv, dv))
    out, lse = cpuattn.attention(q, k, v, return_lse=True, **opts)
    ref, ref_lse = cpuattn.reference_attention(q, k, v, return_lse=True, **opts)
    _check(out, ref)
    fin = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isfinite(lse), fin)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("page_size", [16, 6])
def test_chunked_paged_prefill(rng, each_isa, page_size):
    """New tokens over cached ones, read through a block table: rows inside
    one page are evenly spaced (loaded in place), rows across pages are not
    (copied first); stale slots hold NaN/inf (make_pages)."""
    h, hkv, d = 8, 2, 64
    seq_lens, new = [300, 90, 65], [40, 70, 1]
    kp, vp, bt, sl = make_pages(rng, seq_lens, page_size, hkv, d, dtype=BF16)
    cu = np.concatenate([[0], np.cumsum(new)]).astype(np.int32)
    q = _bf16(rng, (int(cu[-1]), h, d))
    out = cpuattn.paged_attention(q, kp, vp, bt, sl, cu_seqlens_q=cu)
    _check(out, ref_paged(q, kp, vp, bt, sl, cu_q=cu)[0])


def test_mla_latent_view(rng, each_isa):
    """MLA: one latent kv head of 576, values its first 512 columns (a view of
    the same pages), 16 query heads over 2 new tokens: 32 rows, tiled."""
    kv, _, bt, sl = make_pages(rng, [200, 77], 16, 1, 576, dtype=BF16)
    cu = np.array([0, 2, 4], np.int32)
    q = _bf16(rng, (4, 16, 576))
    out = cpuattn.paged_attention(q, kv, kv[..., :512], bt, sl, cu_seqlens_q=cu, scale=576 ** -0.5)
    _check(out, ref_paged(q, kv, kv[..., :512], bt, sl, cu_q=cu, scale=576 ** -0.5)[0])


def test_bitwise_across_threads_and_batches(rng, each_isa, threads):
    q, k, v = _bf16(rng, (3, 130, 8, 128)), _bf16(rng, (3, 130, 2, 128)), _bf16(rng, (3, 130, 2, 128))
    threads(1)
    one = cpuattn.attention(q, k, v, causal=True)
    for n in (2, 3):
        threads(n)
        np.testing.assert_array_equal(cpuattn.attention(q, k, v, causal=True).view(np.uint16),
                                      one.view(np.uint16))
    alone = cpuattn.attention(q[1:2], k[1:2], v[1:2], causal=True)
    np.testing.assert_array_equal(alone.view(np.uint16), one[1:2].view(np.uint16))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_forked_child_and_new_thread_give_the_same_bytes(rng, each_isa):
    q, k, v = _bf16(rng, (1, 100, 8, 64)), _bf16(rng, (1, 100, 2, 64)), _bf16(rng, (1, 100, 2, 64))
    want = cpuattn.attention(q, k, v, causal=True).view(np.uint16)
    got = {}
    t = threading.Thread(target=lambda: got.update(thread=cpuattn.attention(q, k, v, causal=True)))
    t.start()
    t.join()
    np.testing.assert_array_equal(got["thread"].view(np.uint16), want)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: compute on the inherited path, send the bytes
        try:
            os.close(r)
            data = pickle.dumps(cpuattn.attention(q, k, v, causal=True).view(np.uint16))
            with os.fdopen(w, "wb") as f:
                f.write(data)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    np.testing.assert_array_equal(pickle.loads(data), want)
