"""Dense and packed (varlen) attention: validation and dispatch to the engine."""
import numpy as np

from . import _forward
from . import _validate as V
from .errors import DTypeError, ShapeError


def _check_dense_dtypes(q, k, v):
    code = V.dtype_code(q, "q")
    for name, a in (("k", k), ("v", v)):
        V.dtype_code(a, name)
        if a.dtype != q.dtype:
            raise DTypeError(f"{name}: expected the dtype of q ({q.dtype}), got {a.dtype}")
    if not _forward.kernel_available(code, code):
        raise DTypeError(f"q: no kernel for dtype {q.dtype}")
    return code


def _check_kv(q, k, v, qlayout_heads_axis, kname="k", vname="v"):
    """Shared head/dim checks: returns (H, Hkv, Dqk, Dv)."""
    h, d = q.shape[qlayout_heads_axis], q.shape[-1]
    hkv, dk = k.shape[-2], k.shape[-1]
    if v.shape[-2] != hkv:
        raise ShapeError(f"{vname}: expected num_kv_heads {hkv} (as {kname}), got {v.shape[-2]}")
    if dk != d:
        raise ShapeError(f"{kname}: expected head_dim {d} (as q), got {dk}")
    if d < 1 or v.shape[-1] < 1:
        raise ShapeError(f"q/{vname}: head_dim must be >= 1, got {d} and {v.shape[-1]}")
    V.check_heads(h, hkv)
    return h, hkv, d, v.shape[-1]


def _check_dense_qkv(q, k, v):
    """q, k, v of the dense API (and its backward), already arrays.

    Returns (dtype code, (batch, seq_q, seq_k), (H, Hkv, Dqk, Dv))."""
    V.check_ndim(q, "q", 4, "(batch, seq_q, num_heads, head_dim)")
    V.check_ndim(k, "k", 4, "(batch, seq_k, num_kv_heads, head_dim)")
    V.check_ndim(v, "v", 4, "(batch, seq_k, num_kv_heads, head_dim)")
    code = _check_dense_dtypes(q, k, v)
    b, sq = q.shape[:2]
    if k.shape[0] != b or v.shape[0] != b:
        raise ShapeError(f"k/v: expected batch {b} (as q), got {k.shape[0]} and {v.shape[0]}")
    sk = k.shape[1]
    if v.shape[1] != sk:
        raise ShapeError(f"v: expected seq_k {sk} (as k), got {v.shape[1]}")
    dims = _check_kv(q, k, v, 2)
    for name, n in (("seq_q", sq), ("seq_k", sk)):
        if n > V.INDEX_MAX:
            raise ShapeError(f"{name}: at most {V.INDEX_MAX}, got {n}")
    return code, (b, sq, sk), dims


def _check_packed_qkv(q, k, v):
    """q, k, v of the packed (varlen) API (and its backward), already arrays.

    Returns (dtype code, (H, Hkv, Dqk, Dv))."""
    V.check_ndim(q, "q", 3, "(total_q, num_heads, head_dim)")
    V.check_ndim(k, "k", 3, "(total_k, num_kv_heads, head_dim)")
    V.check_ndim(v, "v", 3, "(total_k, num_kv_heads, head_dim)")
    code = _check_dense_dtypes(q, k, v)
    if v.shape[0] != k.shape[0]:
        raise ShapeError(f"v: expected total_k {k.shape[0]} (as k), got {v.shape[0]}")
    return code, _check_kv(q, k, v, 1)


def _check_cu_seqlens_qk(cu_seqlens_q, cu_seqlens_k, total_q, total_k):
    """Both cu_seqlens of a packed batch (one batch size): (cuq, cuk) int64."""
    cuq = V.check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", total_q)
    cuk = V.check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", total_k)
    if cuq.shape != cuk.shape:
        raise ShapeError(f"cu_seqlens_k: expected shape {cuq.shape} (as cu_seqlens_q), "
                         f"got {cuk.shape}")
    return cuq, cuk


def attention(q, k, v, *, causal=False, scale=None, window=(-1, -1), softcap=0.0,
              return_lse=False, out=None):
    """Flash attention over a dense batch.

    Args:
        q: ``(batch, seq_q, num_heads, head_dim)``.
        k: ``(batch, seq_k, num_kv_heads, head_dim)``.
        v: ``(batch, seq_k, num_kv_heads, head_dim_v)`` (usually head_dim_v == head_dim).
            q, k, v share one dtype: float32, float64, float16 or bfloat16.
            Any strides work without a copy as long as the last axis is contiguous.
        causal: bottom-right aligned: query ``i`` sits at position
            ``i + seq_k - seq_q`` and sees keys ``j <= i + seq_k - seq_q``.
        scale: score scale, default ``1 / sqrt(head_dim)``.
        window: ``(left, right)``, -1 = unbounded: query at position p sees
            keys ``p - left <= j <= p + right``.
        softcap: if > 0, scores become ``softcap * tanh(score / softcap)``.
        return_lse: also return the natural-log sum-exp of the scores,
            ``(batch, num_heads, seq_q)`` float32 (float64 for float64 input).
        out: optional output array to write in place (same shape and dtype as
            the result, contiguous last axis); may be ``q`` itself.

    Returns:
        ``out`` ``(batch, seq_q, num_heads, head_dim_v)`` in q's dtype, or
        ``(out, lse)``. Rows that see no key are exactly 0 with lse ``-inf``.

    Memory beyond inputs and outputs is O(threads x tile); compute is fp32
    (fp64 for float64 input). Raises ShapeError / DTypeError on bad input.
    """
    q, k, v = V.as_array(q, "q"), V.as_array(k, "k"), V.as_array(v, "v")
    code, (b, sq, sk), (h, hkv, d, dv) = _check_dense_qkv(q, k, v)
    opts = V.check_options(scale, window, softcap, causal, d)
    out, lse = V.prepare_outputs(out, (b, sq, h, dv), q,
                                 [("q", q, True), ("k", k, False), ("v", v, False)],
                                 return_lse, (b, h, sq))
    if out.size or (lse is not None and lse.size):
        zeros = np.zeros(b, dtype=np.int64)
        seqs = V.Sequences(zeros, zeros, np.full(b, sq, dtype=np.int64),
                           np.full(b, sk, dtype=np.int64))
        _forward.forward(q, k, v, out, lse, layout="dense", seqs=seqs, opts=opts)
    return (out, lse) if return_lse else out


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, scale=None,
                     window=(-1, -1), softcap=0.0, return_lse=False, out=None):
    """Flash attention over a packed batch of variable-length sequences.

    Args:
        q: ``(total_q, num_heads, head_dim)``; k: ``(total_k, num_kv_heads,
            head_dim)``; v: ``(total_k, num_kv_heads, head_dim_v)``.
        cu_seqlens_q, cu_seqlens_k: integer ``(batch + 1,)``, starting at 0,
            non-decreasing, ending at total_q / total_k. Sequence b is rows
            ``cu[b]:cu[b+1]``; masks apply per sequence (bottom-right causal).
        Other options as :func:`attention`.

    Returns:
        ``out`` ``(total_q, num_heads, head_dim_v)``, or ``(out, lse)`` with lse
        ``(num_heads, total_q)``. Empty sequences give no rows; a sequence with
        queries but no keys gives zero rows and lse ``-inf``.
    """
    q, k, v = V.as_array(q, "q"), V.as_array(k, "k"), V.as_array(v, "v")
    code, (h, hkv, d, dv) = _check_packed_qkv(q, k, v)
    cuq, cuk = _check_cu_seqlens_qk(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])
    opts = V.check_options(scale, window, softcap, causal, d)
    total = q.shape[0]
    out, lse = V.prepare_outputs(out, (total, h, dv), q,
                                 [("q", q, True), ("k", k, False), ("v", v, False)],
                                 return_lse, (h, total))
    if total:
        seqs = V.Sequences(cuq[:-1].copy(), cuk[:-1].copy(), np.diff(cuq), np.diff(cuk))
        _forward.forward(q, k, v, out, lse, layout="packed", seqs=seqs, opts=opts)
    return (out, lse) if return_lse else out
