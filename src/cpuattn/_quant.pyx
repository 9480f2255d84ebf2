"""Row quantisation for low-bit KV storage (csrc/quant.c defines the bytes).

Takes arrays the facade (``cpuattn.quant``) has already validated; the pool
and ``write_kv`` call the same C functions, so every path writes the same
bytes.
"""
from libc.stdint cimport int64_t
cimport numpy as cnp
import numpy as np

from ._engine cimport (CPA_I4, cpa_dequantize_rows, cpa_fp8_encode, cpa_quant_row_bytes,
                       cpa_quant_scales_per_row, cpa_quantize_rows)

cnp.import_array()


def quantize_rows(cnp.ndarray x, int code, codes_dtype):
    """x: C-contiguous float32 (n, d) -> (codes (n, row bytes) in codes_dtype,
    scales (n, scales per row): float32, or float16 for int4)."""
    cdef int64_t n = x.shape[0], d = x.shape[1]
    cdef int64_t rb = cpa_quant_row_bytes(code, d), ns = cpa_quant_scales_per_row(code, d)
    cdef cnp.ndarray codes = np.empty((n, rb), dtype=np.uint8)
    cdef cnp.ndarray scales = np.empty((n, ns), dtype=np.float16 if code == CPA_I4 else np.float32)
    with nogil:
        cpa_quantize_rows(code, <const float *>cnp.PyArray_DATA(x), d, n, d,
                          <unsigned char *>cnp.PyArray_DATA(codes), rb,
                          cnp.PyArray_DATA(scales), ns)
    return codes.view(codes_dtype), scales


def dequantize_rows(cnp.ndarray codes, cnp.ndarray scales, int code, int64_t d, bint per_tensor):
    """codes: C-contiguous (n, row bytes) of 1-byte elements; scales:
    C-contiguous (n, scales per row), or with per_tensor one float32 for all
    rows (fp8) -> float32 (n, d)."""
    cdef int64_t n = codes.shape[0]
    cdef int64_t sstride = 0 if per_tensor else cpa_quant_scales_per_row(code, d)
    cdef cnp.ndarray out = np.empty((n, d), dtype=np.float32)
    with nogil:
        cpa_dequantize_rows(code, <const unsigned char *>cnp.PyArray_DATA(codes), codes.shape[1],
                            cnp.PyArray_DATA(scales), sstride, n, d,
                            <float *>cnp.PyArray_DATA(out), d)
    return out


def encode_fp8(cnp.ndarray x, int code, float scale):
    """x: C-contiguous float32 -> uint8 fp8 codes of x / scale, same shape."""
    cdef cnp.ndarray codes = np.empty_like(x, dtype=np.uint8)
    cdef int64_t n = cnp.PyArray_SIZE(x)
    with nogil:
        cpa_fp8_encode(code, <const float *>cnp.PyArray_DATA(x), n, scale,
                       <unsigned char *>cnp.PyArray_DATA(codes))
    return codes
