"""quantize_kv / dequantize_kv: the bytes against an independent numpy
implementation of the contract's formulas (fp8 rounding by ml_dtypes), edge
rows, errors, and fuzzing."""
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, strategies as st

import cpuattn
from cpuattn import DTypeError, ShapeError

FORMATS = ["int8", "int4", "float8_e4m3fn", "float8_e5m2"]
QMAX = {"int8": 127, "int4": 7, "float8_e4m3fn": 448, "float8_e5m2": 57344}


def ref_quantize(x, fmt):
    """The contract, written with numpy: float32 arithmetic, half-to-even."""
    x = np.asarray(x, dtype=np.float32)
    d = x.shape[-1]
    qmax = np.float32(QMAX[fmt])
    if fmt == "int4":
        g = -(-d // 32)
        pad = np.zeros(x.shape[:-1] + (g * 32,), np.float32)
        pad[..., :d] = x
        grp = pad.reshape(x.shape[:-1] + (g, 32))
        amax = np.abs(grp).max(axis=-1)
        amax = np.where(np.isfinite(grp).all(axis=-1), amax, np.nan)
        s16 = (amax / qmax).astype(np.float16)
        s = np.repeat(s16.astype(np.float32), 32, axis=-1)[..., :d]
        with np.errstate(divide="ignore", invalid="ignore"):
            c = np.clip(np.rint(x / s), -7, 7)
        c = np.where(s > 0, c, 0).astype(np.int8)
        lo, hi = c[..., 0::2] & 0xF, c[..., 1::2] & 0xF
        return (lo | (hi << 4)).astype(np.uint8), s16
    amax = np.abs(x).max(axis=-1)
    amax = np.where(np.isfinite(x).all(axis=-1), amax, np.nan)
    s = (amax / qmax).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = x / s[..., None]
    ok = (s > 0)[..., None]
    if fmt == "int8":
        return np.where(ok, np.clip(np.rint(v), -127, 127), 0).astype(np.int8), s
    v = np.where(ok, np.clip(v, -qmax, qmax), 0)
    return v.astype(getattr(ml_dtypes, fmt)), s


def ref_dequantize(codes, s, fmt):
    if fmt == "int4":
        lo = (codes & 0xF).astype(np.int8)
        hi = (codes >> 4).astype(np.int8)
        c = np.empty(codes.shape[:-1] + (2 * codes.shape[-1],), np.int8)
        c[..., 0::2], c[..., 1::2] = lo, hi
        c = np.where(c >= 8, c - 16, c).astype(np.float32)
        return np.repeat(s.astype(np.float32), 32, axis=-1)[..., :c.shape[-1]] * c
    return np.asarray(s, np.float32)[..., None] * codes.astype(np.float32)


def same_bytes(a, b):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(1, 1, 2), (3, 2, 64), (5, 4, 80), (2, 1, 128), (1, 3, 256),
                                   (7, 2, 30), (2, 2, 34)])
@pytest.mark.parametrize("in_dtype", ["float32", "float64", "float16", "bfloat16"])
def test_bytes_match_the_contract(fmt, shape, in_dtype):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 3).astype(np.dtype(getattr(ml_dtypes, in_dtype, in_dtype)))
    codes, scale = cpuattn.quantize_kv(x, fmt)
    want_codes, want_scale = ref_quantize(x.astype(np.float32), fmt)
    same_bytes(codes, want_codes)
    same_bytes(scale, want_scale)
    y = cpuattn.dequantize_kv(codes, scale, fmt)
    assert y.dtype == np.float32 and y.shape == shape
    np.testing.assert_array_equal(y, ref_dequantize(want_codes, want_scale, fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_nan_inf_rows_and_saturation(fmt):
    x = np.zeros((4, 1, 32), np.float32)
    x[1, 0, :] = np.linspace(-5, 5, 32)
    x[2, 0, 3] = np.nan
    x[3, 0, 7] = np.inf
    codes, scale = cpuattn.quantize_kv(x, fmt)
    s = scale.astype(np.float32).reshape(4)
    assert s[0] == 0 and np.isnan(s[2]) and np.isnan(s[3])
    assert not codes[[0, 2, 3]].view(np.uint8).any()
    y = cpuattn.dequantize_kv(codes, scale, fmt)
    assert (y[0] == 0).all() and np.isnan(y[2]).all() and np.isnan(y[3]).all()
    # the largest element hits qmax exactly; everything stays within qmax
    np.testing.assert_allclose(np.abs(y[1]).max(), 5, rtol=1e-3 if fmt == "int4" else 1e-6)
    same_bytes(codes, ref_quantize(x, fmt)[0])


def test_int8_rounds_half_to_even():
    # scale = 254 / 127 = 2: x / 2 = 0.5, 1.5, 2.5, -0.5, -1.5 -> 0, 2, 2, -0, -2
    x = np.array([[[254, 1, 3, 5, -1, -3]]], np.float32)
    codes, scale = cpuattn.quantize_kv(x, "int8")
    assert scale[0, 0] == 2
    assert codes[0, 0].tolist() == [127, 0, 2, 2, 0, -2]


def test_int4_nibble_order():
    x = np.array([[[7, -7, 1, 0]]], np.float32)   # scale 1 (float16 exact)
    codes, scale = cpuattn.quantize_kv(x, "int4")
    assert scale.dtype == np.float16 and scale[0, 0, 0] == 1
    assert codes[0, 0].tolist() == [0x07 | (0x9 << 4), 0x01]


def test_fp8_per_tensor_scale_and_empty():
    codes = np.array([[[0x38, 0xB8]]], np.uint8).view(ml_dtypes.float8_e4m3fn)   # 1.0, -1.0
    np.testing.assert_array_equal(cpuattn.dequantize_kv(codes, 0.5, "float8_e4m3fn"),
                                  [[[0.5, -0.5]]])
    empty, s = cpuattn.quantize_kv(np.zeros((0, 2, 8), np.float32), "int8")
    assert empty.shape == (0, 2, 8) and s.shape == (0, 2)
    assert cpuattn.dequantize_kv(empty, s, "int8").shape == (0, 2, 8)


def test_numpy_dtypes_name_formats():
    x = np.ones((1, 1, 4), np.float32)
    for dt, name in ((np.int8, "int8"), (ml_dtypes.float8_e5m2, "float8_e5m2")):
        a, b = cpuattn.quantize_kv(x, dt), cpuattn.quantize_kv(x, name)
        same_bytes(a[0], b[0])


@pytest.mark.parametrize("call, err, words", [
    (lambda: cpuattn.quantize_kv(np.ones((1, 1, 4)), "int2"), DTypeError, "dtype"),
    (lambda: cpuattn.quantize_kv(np.ones((1, 1, 4)), np.uint8), DTypeError, "dtype"),
    (lambda: cpuattn.quantize_kv(np.ones((1, 1, 5)), "int4"), ShapeError, "even head_dim"),
    (lambda: cpuattn.quantize_kv(np.ones(4), "int8"), ShapeError, "x"),
    (lambda: cpuattn.quantize_kv(np.ones((1, 4), np.int32), "int8"), DTypeError, "x"),
    (lambda: cpuattn.dequantize_kv(np.ones((1, 4), np.int8), np.ones(2, np.float32), "int8"),
     ShapeError, "scale"),
    (lambda: cpuattn.dequantize_kv(np.ones((1, 4), np.int8), np.ones(1, np.float64), "int8"),
     DTypeError, "scale"),
    (lambda: cpuattn.dequantize_kv(np.ones((1, 4), np.int8), None, "int8"), ShapeError, "scale"),
    (lambda: cpuattn.dequantize_kv(np.ones((1, 4), np.int8), 1.0, "int8"), ShapeError, "scale"),
    (lambda: cpuattn.dequantize_kv(np.ones((1, 4), np.uint8), np.ones(1, np.float32), "int8"),
     DTypeError, "codes"),
    (lambda: cpuattn.dequantize_kv(np.ones((1, 2), np.uint8), np.ones((1, 1), np.float32), "int4"),
     DTypeError, "scale"),
    (lambda: cpuattn.dequantize_kv(np.ones((1, 2), ml_dtypes.float8_e5m2), -1.0, "float8_e5m2"),
     ShapeError, "scale"),
])
def test_bad_input(call, err, words):
    with pytest.raises(err, match=words):
        call()


@given(fmt=st.sampled_from(FORMATS), rows=st.integers(0, 5), heads=st.integers(1, 3),
       half_d=st.integers(1, 40), mag=st.sampled_from([1e-30, 1e-3, 1.0, 1e4, 1e30]),
       seed=st.integers(0, 2**31 - 1))
def test_fuzz_bytes_and_error_bound(fmt, rows, heads, half_d, mag, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, heads, 2 * half_d)) * mag).astype(np.float32)
    codes, scale = cpuattn.quantize_kv(x, fmt)
    want_codes, want_scale = ref_quantize(x, fmt)
    same_bytes(codes, want_codes)
    same_bytes(scale, want_scale)
    y = cpuattn.dequantize_kv(codes, scale, fmt)
    if fmt == "int4" and mag in (1e-30, 1e30):
        # float16 scales: below its range the scale is 0 (zeros), above it
        # inf (NaN rows after dequantising): documented in the README
        assert np.all((y == 0) if mag < 1 else np.isnan(y))
        return
    # error bound of the format, relative to the row's (group's) scale
    s = ref_dequantize(np.ones_like(want_codes) if fmt != "int4" else
                       np.full_like(want_codes, 0x11), want_scale, fmt)
    bound = {"int8": 0.5, "int4": 0.5, "float8_e4m3fn": 16.0, "float8_e5m2": 8192.0}[fmt]
    assert np.all(np.abs(y - x) <= bound * np.abs(s) * 1.0001 + 1e-37)
