"""KVCache and the llama-style GQAttention layer."""
import math
import subprocess
import sys

import os

import numpy as np
import pytest

import cpuattn
import cpuattn.layers
from cpuattn import DTypeError, KVCache, ShapeError
from cpuattn.layers import GQAttention, rope

HAS_POOL = hasattr(cpuattn, "PagePool")
needs_pool = pytest.mark.skipif(not HAS_POOL, reason="cpuattn.PagePool not in this build yet")


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------- KVCache

def test_kvcache_amortised_growth():
    cache = KVCache(2, 2, 8, capacity=4)
    rng = np.random.default_rng(0)
    ks, vs = [], []
    for _ in range(1000):
        k, v = rand(rng, 2, 1, 2, 8), rand(rng, 2, 1, 2, 8)
        cache.append(k, v)
        ks.append(k)
        vs.append(v)
    assert len(cache) == 1000 and cache.seq_lens.tolist() == [1000, 1000]
    assert cache.capacity == 1024                      # 4 doubled 8 times
    assert cache.num_reallocations == 8 <= math.ceil(math.log2(1000 / 4))
    np.testing.assert_array_equal(cache.keys(), np.concatenate(ks, axis=1))
    np.testing.assert_array_equal(cache.values(), np.concatenate(vs, axis=1))


def test_kvcache_views_do_not_copy():
    cache = KVCache(2, 1, 4)
    cache.append(np.ones((2, 3, 1, 4), np.float32), np.ones((2, 3, 1, 4), np.float32))
    assert np.shares_memory(cache.keys(), cache.keys(1))
    assert cache.keys().shape == (2, 3, 1, 4) and cache.values(0).shape == (3, 1, 4)
    with pytest.raises(ValueError):
        cache.seq_lens[0] = 5                           # read-only view


def test_kvcache_per_sequence_lengths_and_reset():
    rng = np.random.default_rng(1)
    cache = KVCache(3, 2, 4, capacity=2)
    k, v = rand(rng, 3, 5, 2, 4), rand(rng, 3, 5, 2, 4)
    start = cache.append(k, v, lengths=[5, 2, 0])
    assert start.tolist() == [0, 0, 0] and cache.seq_lens.tolist() == [5, 2, 0]
    k2, v2 = rand(rng, 3, 1, 2, 4), rand(rng, 3, 1, 2, 4)
    assert cache.append(k2, v2).tolist() == [5, 2, 0]
    assert cache.seq_lens.tolist() == [6, 3, 1] and len(cache) == 6
    np.testing.assert_array_equal(cache.keys(1), np.concatenate([k[1, :2], k2[1]]))
    np.testing.assert_array_equal(cache.values(2), v2[2])
    np.testing.assert_array_equal(cache.keys(0), np.concatenate([k[0], k2[0]]))
    cache.reset([1])
    assert cache.seq_lens.tolist() == [6, 0, 1]
    cache.reset()
    assert cache.seq_lens.tolist() == [0, 0, 0] and len(cache) == 0


def test_kvcache_bad_input_changes_nothing():
    cache = KVCache(2, 2, 4)
    ok = np.zeros((2, 1, 2, 4), np.float32)
    cache.append(ok, ok)
    for k, v, lengths in [(np.zeros((2, 1, 3, 4), np.float32), ok, None),     # heads
                          (np.zeros((1, 1, 2, 4), np.float32), ok, None),     # batch
                          (ok, np.zeros((2, 2, 2, 4), np.float32), None),     # n of v
                          (ok, ok, [2, 0]),                                   # > n
                          (ok, ok, [-1, 0]),                                  # < 0
                          (ok, ok, [1])]:                                     # length
        with pytest.raises(ShapeError):
            cache.append(k, v, lengths)
    with pytest.raises(DTypeError):
        cache.append(ok.astype(np.int32), ok)
    assert cache.seq_lens.tolist() == [1, 1]
    with pytest.raises(ShapeError):
        cache.keys(2)
    with pytest.raises(ShapeError):
        KVCache(0, 2, 4)
    with pytest.raises(DTypeError):
        KVCache(1, 2, 4, dtype="int8")


# ---------------------------------------------------------------- layer

def layer_reference(layer, x, start=0):
    """float64 numpy oracle: projections, RoPE, reference attention over the
    tokens of one pass (positions start..start+seq-1)."""
    w = {n: getattr(layer, n).astype(np.float64) for n in ("wq", "wk", "wv", "wo")}
    b, s, _ = x.shape
    h, hkv, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
    x = x.astype(np.float64)
    q = (x @ w["wq"]).reshape(b, s, h, d)
    k = (x @ w["wk"]).reshape(b, s, hkv, d)
    v = (x @ w["wv"]).reshape(b, s, hkv, d)
    if layer.rope_theta is not None:
        pos = np.broadcast_to(start + np.arange(s), (b, s))
        q, k = rope(q, pos, layer.rope_theta), rope(k, pos, layer.rope_theta)
    o = cpuattn.reference_attention(q, k, v, causal=layer.causal)
    return o.reshape(b, s, h * d) @ w["wo"]


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("rope_theta", [None, 10000.0], ids=["norope", "rope"])
def test_steps_equal_full_pass(heads, kv_heads, rope_theta):
    layer = GQAttention(32, heads, kv_heads, rope_theta=rope_theta, seed=3)
    x = rand(np.random.default_rng(2), 2, 9, 32)
    full, cache = layer(x)
    assert full.dtype == np.float32 and full.shape == (2, 9, 32) and len(cache) == 9
    np.testing.assert_allclose(full, layer_reference(layer, x), rtol=1e-5, atol=1e-5)
    steps, cache = layer(x[:, :4])                      # prefill a chunk, then decode
    outs = [steps]
    for t in range(4, 9):
        y, cache = layer(x[:, t:t + 1], cache)
        outs.append(y)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)
    assert cache.seq_lens.tolist() == [9, 9]


def test_non_causal_and_float64():
    layer = GQAttention(16, 2, 1, head_dim=6, causal=False, dtype="float64", rope_theta=500.0)
    x = np.random.default_rng(4).standard_normal((1, 5, 16))
    y, cache = layer(x)
    assert y.dtype == np.float64 and cache.dtype == np.float64
    np.testing.assert_allclose(y, layer_reference(layer, x), rtol=1e-10, atol=1e-10)


def test_unequal_lengths_match_solo_runs():
    layer = GQAttention(32, 4, 2, rope_theta=10000.0, seed=5)
    rng = np.random.default_rng(6)
    lens = [6, 3, 0]
    x = rand(rng, 3, 6, 32)
    y, cache = layer(x, lengths=lens)                   # right-padded prefill
    assert cache.seq_lens.tolist() == lens
    assert not y[1, 3:].any() and not y[2].any()        # padding rows are 0
    nxt = rand(rng, 3, 1, 32)
    y2, cache = layer(nxt, cache)                       # decode: one token each
    for b, n in enumerate(lens):
        solo = np.concatenate([x[b:b + 1, :n], nxt[b:b + 1]], axis=1)
        ref, _ = layer(solo)
        np.testing.assert_allclose(y[b, :n], ref[0, :n], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y2[b], ref[0, n:], rtol=1e-5, atol=1e-5)


def test_bad_configs_raise_shape_error():
    with pytest.raises(ShapeError, match="num_kv_heads"):
        GQAttention(32, 4, 3)
    with pytest.raises(ShapeError, match="d_model"):
        GQAttention(30, 4, 2)
    GQAttention(30, 4, 2, head_dim=8)                   # explicit head_dim is fine
    with pytest.raises(ShapeError, match="even"):
        GQAttention(12, 4, 2, rope_theta=10000.0)       # head_dim 3
    with pytest.raises(ShapeError, match="rope_theta"):
        GQAttention(32, 4, 2, rope_theta=-1.0)
    with pytest.raises(ShapeError):
        GQAttention(32, 0, 1)
    with pytest.raises(DTypeError):
        GQAttention(32, 4, 2, dtype="int32")
    layer = GQAttention(32, 4, 2)
    with pytest.raises(ShapeError, match="d_model=32"):
        layer(np.zeros((1, 2, 31), np.float32))
    with pytest.raises(ShapeError, match="3-D"):
        layer(np.zeros((2, 32), np.float32))
    with pytest.raises(ShapeError, match="lengths"):
        layer(np.zeros((1, 2, 32), np.float32), lengths=[3])
    with pytest.raises(ShapeError, match="cache"):
        layer(np.zeros((1, 2, 32), np.float32), KVCache(1, 4, 8))
    with pytest.raises(ShapeError, match="cache"):
        layer(np.zeros((2, 2, 32), np.float32), layer.new_cache(1))
    with pytest.raises(DTypeError, match="cache"):
        layer(np.zeros((1, 2, 32), np.float32), KVCache(1, 2, 8, dtype="float64"))


def test_weight_setters_validate():
    layer = GQAttention(32, 4, 2, head_dim=4)
    assert layer.wq.shape == (32, 16) and layer.wk.shape == (32, 8)
    assert layer.wv.shape == (32, 8) and layer.wo.shape == (16, 32)
    w = np.arange(32 * 8, dtype=np.float64).reshape(32, 8)
    layer.wk = w
    assert layer.wk.dtype == np.float32 and np.array_equal(layer.wk, w)
    w[0, 0] = -1                                        # the layer holds its own copy
    assert layer.wk[0, 0] == 0
    with pytest.raises(ShapeError, match="wq"):
        layer.wq = np.zeros((32, 8), np.float32)
    with pytest.raises(ShapeError, match="wo"):
        layer.wo = np.zeros((32, 16), np.float32)
    with pytest.raises(DTypeError, match="wv"):
        layer.wv = np.zeros((32, 8), np.int64)


def test_submodule_import_and_no_torch():
    code = ("import sys, cpuattn; assert cpuattn.layers.GQAttention and cpuattn.KVCache; "
            "import cpuattn.integrations; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- PagePool cache

@needs_pool
@pytest.mark.parametrize("rope_theta", [None, 10000.0], ids=["norope", "rope"])
def test_paged_cache_matches_dense(rope_theta):
    layer = GQAttention(32, 4, 2, rope_theta=rope_theta, seed=7)
    rng = np.random.default_rng(8)
    lens = [5, 2, 7]
    x = rand(rng, 3, 7, 32)
    pool = cpuattn.PagePool(16, 4, 2, 8)
    seqs = [pool.create_sequence() for _ in lens]
    y, cache = layer(x, (pool, seqs), lengths=lens)
    assert cache == (pool, seqs) and [pool.seq_len(s) for s in seqs] == lens
    dense, dcache = layer(x, lengths=lens)
    np.testing.assert_allclose(y, dense, rtol=1e-5, atol=1e-5)
    for _ in range(3):
        t = rand(rng, 3, 1, 32)
        y, _ = layer(t, (pool, seqs))
        yd, dcache = layer(t, dcache)
        np.testing.assert_allclose(y, yd, rtol=1e-5, atol=1e-5)


@needs_pool
@pytest.mark.parametrize("kv", ["int8", "int4", "float8_e4m3fn"])
def test_low_bit_paged_cache(kv):
    """Over a low-bit pool the layer equals the same layer over a float32
    pool holding the dequantised K/V rows, and stays near the float pool."""
    layer = GQAttention(64, 4, 2, rope_theta=10000.0, seed=7)
    rng = np.random.default_rng(8)
    lens = [5, 2, 7]
    x, t = rand(rng, 3, 7, 64), rand(rng, 3, 1, 64)
    low, exact = cpuattn.PagePool(16, 4, 2, 16, dtype=kv), cpuattn.PagePool(16, 4, 2, 16)
    ls, es = [low.create_sequence() for _ in lens], [exact.create_sequence() for _ in lens]
    y_low, _ = layer(x, (low, ls), lengths=lens)
    y_exact, _ = layer(x, (exact, es), lengths=lens)
    step_low, _ = layer(t, (low, ls))
    step_exact, _ = layer(t, (exact, es))
    # the same attention over the dequantised rows, through a float32 pool
    deq = cpuattn.PagePool(16, 4, 2, 16)
    ds = [deq.create_sequence() for _ in lens]
    for s, d in zip(ls, ds):
        deq.append(d, *low.gather(s))
    q = layer._proj(t.astype(np.float32), "wq").reshape(3, 1, 4, 16)
    pos = np.array([[n] for n in lens])
    q = cpuattn.layers.rope(q, pos, 10000.0)[:, 0]
    o = deq.attention(q, ds)
    want = layer._proj(o.reshape(3, 1, 64), "wo")
    np.testing.assert_allclose(step_low, want, rtol=1e-4, atol=1e-5)
    assert low.k_dtype == kv and low.k_scales is not None
    for a, b in ((y_low, y_exact), (step_low, step_exact)):
        err = np.abs(a - b).max()
        assert 0 < err < 0.5 * np.abs(b).max()


@needs_pool
def test_example_reports_low_bit_quality():
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "examples", "llama_decode.py"),
                        "--kv", "int8", "--requests", "3", "--layers", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("kv int8:")]
    assert line and "max |logit diff| vs the float32 pool" in line[0], r.stdout
    diff = float(line[0].split("pool ")[1].split()[0])
    assert 0 < diff < 0.5


@needs_pool
def test_paged_cache_full_pool_changes_nothing():
    layer = GQAttention(32, 4, 2, seed=9)
    pool = cpuattn.PagePool(3, 4, 2, 8)
    seqs = [pool.create_sequence(), pool.create_sequence()]
    layer(rand(np.random.default_rng(0), 2, 3, 32), (pool, seqs))
    assert pool.num_free_pages == 1
    with pytest.raises(cpuattn.PoolFullError):         # sequence 0 fits, sequence 1 does not
        layer(rand(np.random.default_rng(1), 2, 2, 32), (pool, seqs))
    assert [pool.seq_len(s) for s in seqs] == [3, 3] and pool.num_free_pages == 1


@pytest.mark.parametrize("make", [lambda: cpuattn.layers.GQAttention(2**70, 4, 2),
                                  lambda: cpuattn.layers.GQAttention(2**30, 2**30, 2**30),
                                  lambda: cpuattn.KVCache(2**31 - 1, 2**31 - 1, 2**31 - 1)])
def test_absurd_sizes_raise_shape_error(make):
    """Sizes beyond int32, or shapes no array can have, are a ShapeError (not an
    OverflowError or numpy's ValueError)."""
    with pytest.raises(cpuattn.ShapeError):
        make()
