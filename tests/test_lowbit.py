"""Low-bit KV pages (int8, int4, fp8; K and V types chosen apart) in
paged_attention, gather_pages and PagePool, against the float64 reference
over the dequantised pages."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import cpuattn
from cpuattn import DTypeError, ShapeError
from conftest import BF16, make_pages, randn, ref_paged, tol

LOW = ["int8", "int4", "float8_e4m3fn", "float8_e5m2"]
PAIRS = [(t, t) for t in LOW] + [("int8", "float16"), ("int4", "float8_e5m2"),
                                 ("float8_e4m3fn", "int8"), ("float32", "int4"),
                                 ("bfloat16", "int8"), ("int8", "int4")]
CASES = [  # (seq_lens, page_size, heads, kv_heads, head_dim)
    ([5], 1, 4, 1, 32),
    ([0, 1, 37, 300], 16, 8, 2, 64),
    ([17, 200, 3], 32, 6, 3, 80),
    ([130, 64], 16, 8, 8, 128),
    ([70], 16, 8, 1, 256),
    ([33, 90], 1, 16, 2, 128),
]


def encode(pages, dtype):
    """(stored pages, their scale, the float32 values they stand for)."""
    if dtype in LOW:
        codes, scale = cpuattn.quantize_kv(pages, dtype)
        return codes, scale, cpuattn.dequantize_kv(codes, scale, dtype)
    stored = pages.astype(BF16 if dtype == "bfloat16" else np.dtype(dtype))
    return stored, None, stored.astype(np.float32)


def spoil_hidden(rng, stored, scale, table, lens):
    """Garbage codes and NaN scales in every slot no sequence shows: pages
    outside the chains and slots past each sequence's length."""
    page_size = stored.shape[1]
    used = {int(p): 0 for p in range(stored.shape[0])}
    for b, n in enumerate(lens):
        for j in range(-(-int(n) // page_size)):
            used[int(table[b, j])] = max(used[int(table[b, j])], min(page_size, int(n) - j * page_size))
    raw = stored.view(np.uint8)
    for p, keep in used.items():
        raw[p, keep:] = rng.integers(0, 256, raw[p, keep:].shape, dtype=np.uint8)
        if scale is not None:
            scale[p, keep:] = np.nan


def lowbit_pages(rng, lens, page, hkv, d, kt, vt, spoil=True):
    kp, vp, bt, lens = make_pages(rng, lens, page, hkv, d)
    (kc, ks, kf), (vc, vs, vf) = encode(kp, kt), encode(vp, vt)
    if spoil:
        for stored, scale, t in ((kc, ks, kt), (vc, vs, vt)):
            if t in LOW:
                spoil_hidden(rng, stored, scale, bt, lens)
    return (kc, ks, kf), (vc, vs, vf), bt, lens


def check(q, K, Vv, bt, lens, cu=None, **opts):
    (kc, ks, kf), (vc, vs, vf) = K, Vv
    out, lse = cpuattn.paged_attention(q, kc, vc, bt, lens, k_scale=ks, v_scale=vs,
                                       cu_seqlens_q=cu, return_lse=True, **opts)
    ref, ref_lse = ref_paged(q, kf, vf, bt, lens, cu, **opts)
    np.testing.assert_allclose(out, ref, **tol(np.float32))
    fin = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isfinite(lse), fin)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], atol=1e-5, rtol=1e-5)
    return out


@pytest.mark.parametrize("kt,vt", PAIRS, ids=lambda x: x)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"P{c[1]}H{c[2]}/{c[3]}D{c[4]}")
def test_decode_and_chunked_prefill_against_reference(rng, kt, vt, case):
    lens, page, h, hkv, d = case
    K, Vv, bt, lens = lowbit_pages(rng, lens, page, hkv, d, kt, vt)
    check(randn(rng, (len(lens), h, d)), K, Vv, bt, lens)
    nq = np.minimum(lens, [1, 70, 2, 9][: len(lens)] + [3] * max(0, len(lens) - 4))
    cu = np.concatenate([[0], np.cumsum(nq)]).astype(np.int32)
    check(randn(rng, (cu[-1], h, d)), K, Vv, bt, lens, cu)


@pytest.mark.parametrize("kt,vt", [("int8", "int8"), ("int4", "int4"), ("float8_e4m3fn", "float8_e5m2")])
def test_every_simd_path_with_options(rng, each_isa, kt, vt):
    K, Vv, bt, lens = lowbit_pages(rng, [700, 5, 64], 16, 2, 96, kt, vt)
    for opts in ({}, {"window": (40, -1)}, {"softcap": 8.0}, {"causal": False, "window": (7, 3)}):
        check(randn(rng, (3, 8, 96)), K, Vv, bt, lens, **opts)
        cu = np.array([0, 20, 22, 86], np.int32)
        check(randn(rng, (86, 8, 96)), K, Vv, bt, lens, cu, **opts)


@pytest.mark.parametrize("qdtype", [np.float16, BF16], ids=["float16", "bfloat16"])
def test_half_precision_queries(rng, qdtype):
    K, Vv, bt, lens = lowbit_pages(rng, [90, 3], 16, 2, 64, "int8", "int4")
    q = randn(rng, (2, 8, 64)).astype(qdtype)
    out = cpuattn.paged_attention(q, K[0], Vv[0], bt, lens, k_scale=K[1], v_scale=Vv[1])
    ref = ref_paged(q.astype(np.float64), K[2], Vv[2], bt, lens)[0]
    assert out.dtype == q.dtype
    np.testing.assert_allclose(out.astype(np.float64), ref, **tol(qdtype))


def test_split_kv_long_context(rng):
    for kt in ("int8", "int4"):
        K, Vv, bt, lens = lowbit_pages(rng, [5000, 1500], 16, 1, 128, kt, kt)
        check(randn(rng, (2, 8, 128)), K, Vv, bt, lens)


def test_window_hidden_slots_never_leak(rng):
    """NaN scales and garbage codes in slots the window hides from every
    query leave the output as it is over clean pages."""
    K, Vv, bt, lens = lowbit_pages(rng, [300], 16, 2, 64, "int8", "int8", spoil=False)
    q = randn(rng, (1, 4, 64))
    clean = cpuattn.paged_attention(q, K[0], Vv[0], bt, lens, k_scale=K[1], v_scale=Vv[1],
                                    window=(50, -1))
    for stored, scale in ((K[0], K[1]), (Vv[0], Vv[1])):
        for j in range(0, 300 - 51):   # keys the decode query at 299 does not see
            page, slot = bt[0, j // 16], j % 16
            scale[page, slot] = np.nan
            stored[page, slot] = rng.integers(-128, 128, stored[page, slot].shape)
    spoiled = cpuattn.paged_attention(q, K[0], Vv[0], bt, lens, k_scale=K[1], v_scale=Vv[1],
                                      window=(50, -1))
    np.testing.assert_array_equal(spoiled, clean)
    assert np.all(np.isfinite(spoiled))


def test_per_tensor_fp8_scale(rng):
    kp, vp, bt, lens = make_pages(rng, [40, 17], 8, 2, 32)
    import ml_dtypes
    kc = (kp / 4).astype(ml_dtypes.float8_e4m3fn)
    vc = (vp / 2).astype(ml_dtypes.float8_e5m2)
    q = randn(rng, (2, 4, 32))
    out = cpuattn.paged_attention(q, kc, vc, bt, lens, k_scale=4.0, v_scale=2.0)
    ref = ref_paged(q, kc.astype(np.float32) * 4, vc.astype(np.float32) * 2, bt, lens)[0]
    np.testing.assert_allclose(out, ref, **tol(np.float32))
    # no scale: 1.0 (vLLM's default)
    out1 = cpuattn.paged_attention(q, kc, vc, bt, lens)
    ref1 = ref_paged(q, kc.astype(np.float32), vc.astype(np.float32), bt, lens)[0]
    np.testing.assert_allclose(out1, ref1, **tol(np.float32))


def test_out_and_lse(rng):
    K, Vv, bt, lens = lowbit_pages(rng, [10, 20], 4, 1, 8, "int4", "int8")
    q = randn(rng, (2, 2, 8))
    out = np.empty((2, 2, 8), np.float32)
    res, lse = cpuattn.paged_attention(q, K[0], Vv[0], bt, lens, k_scale=K[1], v_scale=Vv[1],
                                       out=out, return_lse=True)
    assert res is out and lse.shape == (2, 2) and lse.dtype == np.float32
    np.testing.assert_allclose(out, ref_paged(q, K[2], Vv[2], bt, lens)[0], **tol(np.float32))


@pytest.mark.parametrize("kt,vt", [("int8", "int4"), ("float8_e5m2", "float8_e4m3fn")])
def test_bitwise_across_thread_counts_and_batch_invariant(rng, threads, kt, vt):
    K, Vv, bt, lens = lowbit_pages(rng, [2000, 7, 600, 1], 16, 2, 64, kt, vt)
    q = randn(rng, (4, 8, 64))
    args = dict(k_scale=K[1], v_scale=Vv[1])
    outs = []
    for n in (1, 2, 3):
        threads(n)
        outs.append(cpuattn.paged_attention(q, K[0], Vv[0], bt, lens, **args))
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])
    for b in range(4):
        alone = cpuattn.paged_attention(q[b:b + 1], K[0], Vv[0], bt[b:b + 1], lens[b:b + 1], **args)
        np.testing.assert_array_equal(alone[0], outs[0][b])


def test_bad_input_raises_documented_error(rng):
    K, Vv, bt, lens = lowbit_pages(rng, [10, 20], 4, 2, 8, "int8", "int4")
    kp, vp, _, _ = make_pages(rng, [10, 20], 4, 2, 8)
    kp, vp = kp[:K[0].shape[0]], vp[:K[0].shape[0]]
    q = randn(rng, (2, 4, 8))
    ok = dict(k_pages=K[0], v_pages=Vv[0], k_scale=K[1], v_scale=Vv[1])
    cases = [
        (dict(k_scale=None), ShapeError, "k_scale"),
        (dict(v_scale=None), ShapeError, "v_scale"),
        (dict(k_scale=K[1][:, :2]), ShapeError, "k_scale"),
        (dict(k_scale=K[1].astype(np.float16)), DTypeError, "k_scale"),
        (dict(v_scale=Vv[1].astype(np.float32)), DTypeError, "v_scale"),
        (dict(v_scale=Vv[1][..., :0]), ShapeError, "v_scale"),
        (dict(k_pages=kp, k_scale=K[1]), ShapeError, "k_scale"),
        (dict(k_scale=1.0), ShapeError, "k_scale"),          # int8 takes an array
        (dict(v_pages=Vv[0][:2]), ShapeError, "v_pages"),
        (dict(q=q.astype(np.float64)), DTypeError, "k_pages"),
        (dict(q=randn(rng, (2, 4, 6))), ShapeError, "head_dim"),
        (dict(k_pages=K[0].view(np.uint8)), ShapeError, "k_pages"),   # int8 bytes read as int4
    ]
    for change, exc, word in cases:
        args = dict(q=q, **ok)
        args.update(change)
        with pytest.raises(exc, match=word):
            cpuattn.paged_attention(args.pop("q"), args.pop("k_pages"), args.pop("v_pages"),
                                    bt, lens, **args)
    with pytest.raises(ShapeError, match="scale"):
        cpuattn.gather_pages(K[0], bt, lens)
    with pytest.raises(ShapeError, match="scale"):
        cpuattn.gather_pages(kp, bt, lens, scale=K[1])


@pytest.mark.parametrize("dtype", LOW)
def test_gather_pages_dequantises(rng, dtype):
    (kc, ks, kf), _, bt, lens = lowbit_pages(rng, [9, 0, 21], 4, 2, 64, dtype, dtype)
    got = cpuattn.gather_pages(kc, bt, lens, scale=ks)
    assert got.dtype == np.float32 and got.shape == (3, 21, 2, 64)
    want = cpuattn.gather_pages(kf, bt, lens)
    np.testing.assert_array_equal(got, want)


# ---- the page pool ----

@pytest.mark.parametrize("kt,vt", [("int8", "int8"), ("int4", "float16"), ("float8_e4m3fn", "int4"),
                                   ("float8_e5m2", "float8_e5m2")])
def test_pool_stores_quantize_kv_bytes_and_attends(rng, kt, vt):
    pool = cpuattn.PagePool(12, 4, 2, 64, k_dtype=kt, v_dtype=vt)
    assert (pool.k_dtype, pool.v_dtype) == (kt, vt)
    a, b = pool.create_sequence(), pool.create_sequence()
    ka, va = randn(rng, (7, 2, 64)), randn(rng, (7, 2, 64))
    kb, vb = randn(rng, (10, 2, 64)), randn(rng, (10, 2, 64))
    pool.append(a, ka[:3], va[:3])
    pool.append(b, kb, vb)
    pool.append(a, ka[3:], va[3:])
    gk, gv = pool.gather(a)
    assert gk.dtype == (np.float32 if kt in LOW else np.dtype(kt))
    assert gv.dtype == (np.float32 if vt in LOW else np.dtype(vt))
    bt, lens = pool.block_table([a, b])
    for pages, scales, t, rows, seq in ((pool.k_pages, pool.k_scales, kt, ka, 0),
                                        (pool.v_pages, pool.v_scales, vt, va, 0)):
        if t in LOW:
            codes, sc = cpuattn.quantize_kv(rows, t)
            chain = bt[seq]
            flat_codes = pages[chain].reshape((-1,) + pages.shape[2:])[:7]
            flat_sc = scales[chain].reshape((-1,) + scales.shape[2:])[:7]
            np.testing.assert_array_equal(flat_codes.view(np.uint8), codes.view(np.uint8))
            np.testing.assert_array_equal(flat_sc, sc)
        else:
            assert scales is None
    q = randn(rng, (2, 4, 64))
    out = pool.attention(q, [a, b])
    direct = cpuattn.paged_attention(q, pool.k_pages, pool.v_pages, bt, lens,
                                     k_scale=pool.k_scales, v_scale=pool.v_scales)
    np.testing.assert_array_equal(out, direct)
    kf = np.concatenate(pool.gather(a)[:1] + pool.gather(b)[:1])
    vf = np.concatenate(pool.gather(a)[1:] + pool.gather(b)[1:])
    from conftest import ref_varlen
    ref = ref_varlen(q, kf.astype(np.float64), vf.astype(np.float64), [0, 1, 2], [0, 7, 17])[0]
    np.testing.assert_allclose(out, ref, **tol(np.float32))


def test_pool_fork_cow_and_truncate_move_scales(rng):
    pool = cpuattn.PagePool(8, 4, 1, 32, dtype="int8")
    s = pool.create_sequence()
    pool.append(s, randn(rng, (6, 1, 32)), randn(rng, (6, 1, 32)))
    before_k, before_v = pool.gather(s)
    f = pool.fork(s)
    pool.append(f, 100 * randn(rng, (3, 1, 32)), randn(rng, (3, 1, 32)))   # COW of the shared page
    k, v = pool.gather(s)
    np.testing.assert_array_equal(k, before_k)
    np.testing.assert_array_equal(v, before_v)
    fk, _ = pool.gather(f)
    np.testing.assert_array_equal(fk[:6], before_k)
    assert np.abs(fk[6:]).max() > 20
    pool.truncate(f, 2)
    pool.append(f, randn(rng, (1, 1, 32)), randn(rng, (1, 1, 32)))
    np.testing.assert_array_equal(pool.gather(f)[0][:2], before_k[:2])
    pool._check_invariants()
    assert pool.nbytes == 2 * 8 * 4 * (32 + 4)


def test_pool_rejects_bad_low_bit_config():
    with pytest.raises(ShapeError, match="head_dim"):
        cpuattn.PagePool(4, 4, 1, 33, k_dtype="int4")
    with pytest.raises(DTypeError, match="v_dtype"):
        cpuattn.PagePool(4, 4, 1, 32, v_dtype="int3")


@settings(max_examples=40)
@given(st.data())
def test_fuzz_low_bit_pages(data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    kt = data.draw(st.sampled_from(LOW + ["float32", "float16"]))
    vt = data.draw(st.sampled_from(LOW + ["bfloat16"]))
    hkv = data.draw(st.integers(1, 3))
    g = data.draw(st.integers(1, 5))
    d = 2 * data.draw(st.integers(1, 40))
    page = data.draw(st.sampled_from([1, 3, 16]))
    lens = data.draw(st.lists(st.integers(0, 80), min_size=1, max_size=4))
    K, Vv, bt, lens = lowbit_pages(rng, lens, page, hkv, d, kt, vt)
    if data.draw(st.booleans()):
        check(randn(rng, (len(lens), g * hkv, d)), K, Vv, bt, lens,
              softcap=data.draw(st.sampled_from([0.0, 5.0])))
    else:
        nq = [data.draw(st.integers(0, n)) for n in lens]
        cu = np.concatenate([[0], np.cumsum(nq)]).astype(np.int32)
        check(randn(rng, (int(cu[-1]), g * hkv, d)), K, Vv, bt, lens, cu,
              window=(data.draw(st.integers(-1, 30)), -1))


@settings(max_examples=25)
@given(st.data())
def test_fuzz_low_bit_pool_state_machine(data):
    """Random appends, forks, truncates and frees on a low-bit pool: every
    live sequence gathers the dequantised rows it was given, quantised."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    kt, vt = data.draw(st.sampled_from(LOW)), data.draw(st.sampled_from(LOW))
    pool = cpuattn.PagePool(16, data.draw(st.sampled_from([1, 4])), 2, 32, k_dtype=kt, v_dtype=vt)
    model = {}
    for _ in range(data.draw(st.integers(1, 12))):
        op = data.draw(st.sampled_from(["new", "append", "fork", "truncate", "free"]))
        live = sorted(model)
        if op == "new" or not live:
            model[pool.create_sequence()] = (np.zeros((0, 2, 32), np.float32),) * 2
            continue
        s = data.draw(st.sampled_from(live))
        if op == "append":
            n = data.draw(st.integers(1, 6))
            k, v = randn(rng, (n, 2, 32)), randn(rng, (n, 2, 32))
            try:
                pool.append(s, k, v)
            except cpuattn.PoolFullError:
                continue
            qk = cpuattn.dequantize_kv(*cpuattn.quantize_kv(k, kt), kt)
            qv = cpuattn.dequantize_kv(*cpuattn.quantize_kv(v, vt), vt)
            model[s] = (np.concatenate([model[s][0], qk]), np.concatenate([model[s][1], qv]))
        elif op == "fork":
            model[pool.fork(s)] = model[s]
        elif op == "truncate":
            n = data.draw(st.integers(0, model[s][0].shape[0]))
            pool.truncate(s, n)
            model[s] = (model[s][0][:n], model[s][1][:n])
        else:
            pool.free_sequence(s)
            del model[s]
        pool._check_invariants()
        for t, (k, v) in model.items():
            gk, gv = pool.gather(t)
            np.testing.assert_array_equal(gk, k)
            np.testing.assert_array_equal(gv, v)


@pytest.mark.parametrize("kt,vt", [("int8", "int4"), ("float8_e4m3fn", "float8_e4m3fn")])
def test_shared_prefix_pages(rng, kt, vt):
    """Sequences whose chains share pages (a common prompt prefix) read the
    same codes and scales, and give what their own copies would."""
    K, Vv, bt, lens = lowbit_pages(rng, [48, 40], 16, 2, 64, kt, vt)
    shared = bt.copy()
    shared[1, :2] = bt[0, :2]            # sequence 1 reuses sequence 0's first 32 tokens
    q = randn(rng, (2, 8, 64))
    out = check(q, K, Vv, shared, lens)
    alone = cpuattn.paged_attention(q[1:], K[0], Vv[0], shared[1:], lens[1:],
                                    k_scale=K[1], v_scale=Vv[1])
    np.testing.assert_array_equal(alone[0], out[1])


@pytest.mark.parametrize("kt,vt", [("int8", "int4"), ("float8_e4m3fn", "float16"),
                                   ("int4", "float8_e5m2")])
def test_checked_fast_path_equals_general_path(rng, kt, vt):
    """Plain inputs are checked in C, others (strided scales, a numpy-scalar
    fp8 scale) by the general checks, which hand them back in plain form:
    the same bytes either way, with or without out=."""
    K, Vv, bt, lens = lowbit_pages(rng, [90, 1, 33], 16, 2, 64, kt, vt)
    q = randn(rng, (3, 8, 64))
    fast = cpuattn.paged_attention(q, K[0], Vv[0], bt, lens, k_scale=K[1], v_scale=Vv[1])
    out = np.empty_like(fast)
    cpuattn.paged_attention(q, K[0], Vv[0], bt, lens, k_scale=K[1], v_scale=Vv[1], out=out)
    np.testing.assert_array_equal(fast, out)
    strided = [None if s is None else np.asfortranarray(s) for s in (K[1], Vv[1])]
    np.testing.assert_array_equal(
        cpuattn.paged_attention(q, K[0], Vv[0], bt, lens, k_scale=strided[0], v_scale=strided[1]),
        fast)
    if kt.startswith("float8"):   # a per-tensor scale, as a float and as a numpy scalar
        a = cpuattn.paged_attention(q, K[0], Vv[0], bt, lens, k_scale=2.0, v_scale=Vv[1])
        b = cpuattn.paged_attention(q, K[0], Vv[0], bt, lens, k_scale=np.float32(2.0),
                                    v_scale=Vv[1], out=np.empty_like(fast))
        np.testing.assert_array_equal(a, b)
