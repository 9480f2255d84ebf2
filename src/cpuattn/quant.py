"""Low-bit KV storage: quantize_kv and dequantize_kv define the bytes.

int8 and fp8 keep one float32 scale per token and kv head, int4 one float16
scale per group of 32 consecutive elements of a row; ``scale = max|x| / qmax``
(qmax 127 for int8, 7 for int4, 448 for float8_e4m3fn, 57344 for
float8_e5m2), codes round half to even and saturate. The page pool and
``write_kv`` call the same C code (csrc/quant.c), so they store exactly these
bytes.
"""
from __future__ import annotations

import numpy as np

from . import _quant
from . import _validate as V
from ._typing import Array, ArrayLike, DTypeLike, FloatArray, NDArray
from .errors import DTypeError, ShapeError


def _rows(x, name):
    x = V.as_array(x, name)
    if x.ndim < 2:
        raise ShapeError(f"{name}: expected (..., num_kv_heads, head_dim), got shape {x.shape}")
    if x.shape[-1] < 1:
        raise ShapeError(f"{name}: head_dim must be >= 1, got {x.shape[-1]}")
    return x


def quantize_kv(x: ArrayLike, dtype: DTypeLike) -> tuple[Array, FloatArray]:
    """Quantise K or V rows to a low-bit KV format.

    Args:
        x: ``(..., num_kv_heads, head_dim)`` of any float dtype (float32,
            float64, float16, bfloat16); quantised from its float32 values.
        dtype: ``"int8"``, ``"int4"``, ``"float8_e4m3fn"`` or ``"float8_e5m2"``
            (or the numpy dtype of int8 / fp8 codes).

    Returns:
        ``(codes, scale)``: codes ``(..., num_kv_heads, head_dim)`` int8 or
        fp8, or ``(..., num_kv_heads, head_dim // 2)`` uint8 for int4 (element
        ``2i`` in the low nibble); scale ``(..., num_kv_heads)`` float32, or
        ``(..., num_kv_heads, ceil(head_dim / 32))`` float16 for int4.
        ``dequantize_kv(codes, scale, dtype)`` gives ``scale * code``. A zero
        row (group) gets scale 0; one holding NaN or inf gets scale NaN and
        zero codes, so it shows as NaN after dequantising.

    Raises:
        DTypeError: an unknown ``dtype`` or a non-float ``x``.
        ShapeError: ``x`` with fewer than 2 axes, or an odd head_dim for int4.

    Examples:
        >>> x = np.random.default_rng(0).standard_normal((16, 2, 64), dtype=np.float32)
        >>> codes, scale = cpuattn.quantize_kv(x, "int8")
        >>> codes.dtype, codes.shape, scale.shape
        (dtype('int8'), (16, 2, 64), (16, 2))
        >>> err = np.abs(cpuattn.dequantize_kv(codes, scale, "int8") - x).max()
        >>> bool(err <= scale.max() / 2)     # at most half a step per element
        True
    """
    fmt = V.kv_format(dtype)
    x = _rows(x, "x")
    d = x.shape[-1]
    if fmt.group and d % 2:
        raise ShapeError(f"x: int4 needs an even head_dim, got {d}")
    flat = np.ascontiguousarray(x.reshape(-1, d), dtype=np.float32)
    codes, scales = _quant.quantize_rows(flat, fmt.code, fmt.codes_dtype)
    lead = x.shape[:-1]
    return codes.reshape(lead + codes.shape[-1:]), scales.reshape(V.scale_shape(fmt, lead, d))


def dequantize_kv(codes: ArrayLike, scale: ArrayLike | float,
                  dtype: DTypeLike) -> NDArray[np.float32]:
    """The float32 values ``scale * code`` of low-bit KV codes.

    Args:
        codes: as returned by :func:`quantize_kv` for ``dtype``.
        scale: its scales (float32 ``(..., num_kv_heads)``, float16 groups for
            int4); for fp8 also one Python float for the whole tensor.
        dtype: the format, as for :func:`quantize_kv`.

    Returns:
        float32 ``(..., num_kv_heads, head_dim)`` (head_dim is twice the last
        axis of int4 codes).

    Raises:
        DTypeError: an unknown ``dtype``, or codes / scales of another dtype
            than the format's.
        ShapeError: scales whose shape does not match the codes.

    Examples:
        >>> x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 1, 64)
        >>> codes, scale = cpuattn.quantize_kv(x, "int4")
        >>> codes.shape, scale.shape                  # two codes a byte, a scale per 32
        ((1, 1, 32), (1, 1, 2))
        >>> cpuattn.dequantize_kv(codes, scale, "int4").shape
        (1, 1, 64)
    """
    fmt = V.kv_format(dtype)
    codes = V.as_array(codes, "codes", kv=True)
    if codes.dtype != fmt.codes_dtype:
        raise DTypeError(f"codes: expected dtype {fmt.codes_dtype} for {fmt.name}, "
                           f"got {codes.dtype}")
    if codes.ndim < 2:
        raise ShapeError(f"codes: expected (..., num_kv_heads, head_dim), got shape {codes.shape}")
    d = codes.shape[-1] * (2 if fmt.group else 1)
    lead = codes.shape[:-1]
    scale, per_tensor = V.kv_scale(scale, fmt, lead, d, "scale")
    if codes.size == 0:
        return np.zeros(lead + (d,), dtype=np.float32)
    flat = np.ascontiguousarray(codes.reshape(-1, codes.shape[-1])).view(np.uint8)
    scales = np.ascontiguousarray(scale).reshape(1 if per_tensor else flat.shape[0], -1)
    out = _quant.dequantize_rows(flat, scales, fmt.code, d, per_tensor)
    return out.reshape(lead + (d,))
