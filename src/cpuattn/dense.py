"""Dense and packed (varlen) attention: validation and dispatch to the engine."""
from __future__ import annotations

from typing import Literal, overload

from . import _forward, _plan
from . import _validate as V
from ._typing import Array, ArrayLike, FloatArray, Window


@overload
def attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, causal: bool = ...,
              scale: float | None = ..., window: Window = ..., softcap: float = ...,
              sinks: ArrayLike | None = ..., alibi_slopes: ArrayLike | None = ...,
              return_lse: Literal[False] = ..., out: Array | None = ...) -> Array: ...
@overload
def attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, causal: bool = ...,
              scale: float | None = ..., window: Window = ..., softcap: float = ...,
              sinks: ArrayLike | None = ..., alibi_slopes: ArrayLike | None = ...,
              return_lse: Literal[True], out: Array | None = ...) -> tuple[Array, FloatArray]: ...
@overload
def attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, causal: bool = ...,
              scale: float | None = ..., window: Window = ..., softcap: float = ...,
              sinks: ArrayLike | None = ..., alibi_slopes: ArrayLike | None = ...,
              return_lse: bool = ..., out: Array | None = ...
              ) -> Array | tuple[Array, FloatArray]: ...


def attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, causal: bool = False,
              scale: float | None = None, window: Window = (-1, -1), softcap: float = 0.0,
              sinks: ArrayLike | None = None, alibi_slopes: ArrayLike | None = None,
              return_lse: bool = False, out: Array | None = None
              ) -> Array | tuple[Array, FloatArray]:
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
        sinks: optional float ``(num_heads,)``: a logit per query head that
            joins the softmax denominator and carries no value (gpt-oss):
            ``lse = log(exp(sink) + sum_j exp(s_j))``, ``out = sum_j
            exp(s_j - lse) v_j``; not scaled or capped. A row that sees no
            key gives 0 with lse = sink.
        alibi_slopes: optional float ``(num_heads,)``: the score of the query
            at position p and key j becomes ``softcap(scale * q.k) - slope *
            |p - j|`` (flash-attn's convention).
        return_lse: also return the natural-log sum-exp of the scores,
            ``(batch, num_heads, seq_q)`` float32 (float64 for float64 input).
        out: optional output array to write in place (same shape and dtype as
            the result, contiguous last axis); may be ``q`` itself.

    Returns:
        ``out`` ``(batch, seq_q, num_heads, head_dim_v)`` in q's dtype, or
        ``(out, lse)``. Rows that see no key are exactly 0 with lse ``-inf``
        (their sink with ``sinks``).

    Raises:
        ShapeError: a shape, stride, window or option that does not fit
            (the message names the argument, what was expected and what was
            got); nothing is written.
        DTypeError: q, k, v of different or unsupported dtypes, or ``out`` of
            another dtype.

    Memory beyond inputs and outputs is O(threads x tile); compute is fp32
    (fp64 for float64 input).

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> q = rng.standard_normal((1, 5, 4, 64), dtype=np.float32)   # 4 query heads
        >>> k = rng.standard_normal((1, 5, 2, 64), dtype=np.float32)   # 2 kv heads (GQA)
        >>> out, lse = cpuattn.attention(q, k, k, causal=True, return_lse=True)
        >>> out.shape, lse.shape
        ((1, 5, 4, 64), (1, 4, 5))
        >>> ref = cpuattn.reference_attention(q, k, k, causal=True)
        >>> bool(np.allclose(out, ref, atol=1e-5))
        True
    """
    res = _plan.dense_attention(q, k, v, causal, scale, window, softcap, sinks, alibi_slopes,
                                return_lse, out)
    if res is not None:   # plain inputs, checked in C (the same rules as below)
        return res
    call = V.dense_call(q, k, v, causal, scale, window, softcap, sinks, alibi_slopes)
    out, lse = V.outputs(call, out, return_lse)
    if out.size or (lse is not None and lse.size):
        _forward.forward(call, out, lse)
    return (out, lse) if return_lse else out


def _attention_ranges(q: ArrayLike, k: ArrayLike, v: ArrayLike, seqs: Array, out: Array, *,
                      causal: bool, scale: float | None = None, window: Window = (-1, -1),
                      softcap: float = 0.0, sinks: ArrayLike | None = None) -> Array:
    """Private (the transformers backend): :func:`attention` of a padded
    batch in one engine call over the dense, strided K/V, no copy.

    ``seqs``: int64 C-contiguous ``(4, batch)``, rows q_start, k_start,
    q_len, k_len: batch row b attends its queries ``q_start[b] ..
    q_start[b] + q_len[b] - 1`` to its keys ``k_start[b] .. k_start[b] +
    k_len[b] - 1`` only, with causal / window bottom-right aligned within
    those ranges (as if they were the whole row). Writes those rows of
    ``out`` ``(batch, seq_q, num_heads, head_dim_v)`` and leaves the others.
    Other arguments and errors as :func:`attention` (ShapeError for a range
    outside its row). Returns ``out``.
    """
    res = _plan.dense_attention(q, k, v, causal, scale, window, softcap, sinks, None, False,
                                out, seqs)
    if res is None:   # not plain: the general checks raise, or give the plain form
        call = V.dense_call(q, k, v, causal, scale, window, softcap, sinks)
        V.outputs(call, out, False)
        o = call.opts
        res = _plan.dense_attention(call.q, call.k, call.v, o.causal, o.scale,
                                    (o.window_left, o.window_right), o.softcap, call.sinks,
                                    None, False, out, seqs)
        if res is None:
            raise RuntimeError("cpuattn internal error: checked dense inputs not plain")
    return out


@overload
def attention_varlen(q: ArrayLike, k: ArrayLike, v: ArrayLike, cu_seqlens_q: ArrayLike,
                     cu_seqlens_k: ArrayLike, *, causal: bool = ..., scale: float | None = ...,
                     window: Window = ..., softcap: float = ...,
              sinks: ArrayLike | None = ..., alibi_slopes: ArrayLike | None = ..., return_lse: Literal[False] = ...,
                     out: Array | None = ...) -> Array: ...
@overload
def attention_varlen(q: ArrayLike, k: ArrayLike, v: ArrayLike, cu_seqlens_q: ArrayLike,
                     cu_seqlens_k: ArrayLike, *, causal: bool = ..., scale: float | None = ...,
                     window: Window = ..., softcap: float = ...,
              sinks: ArrayLike | None = ..., alibi_slopes: ArrayLike | None = ..., return_lse: Literal[True],
                     out: Array | None = ...) -> tuple[Array, FloatArray]: ...
@overload
def attention_varlen(q: ArrayLike, k: ArrayLike, v: ArrayLike, cu_seqlens_q: ArrayLike,
                     cu_seqlens_k: ArrayLike, *, causal: bool = ..., scale: float | None = ...,
                     window: Window = ..., softcap: float = ...,
              sinks: ArrayLike | None = ..., alibi_slopes: ArrayLike | None = ..., return_lse: bool = ...,
                     out: Array | None = ...) -> Array | tuple[Array, FloatArray]: ...
def attention_varlen(q: ArrayLike, k: ArrayLike, v: ArrayLike, cu_seqlens_q: ArrayLike,
                     cu_seqlens_k: ArrayLike, *, causal: bool = False,
                     scale: float | None = None, window: Window = (-1, -1), softcap: float = 0.0,
                     sinks: ArrayLike | None = None, alibi_slopes: ArrayLike | None = None,
                     return_lse: bool = False, out: Array | None = None
                     ) -> Array | tuple[Array, FloatArray]:
    """Flash attention over a packed batch of variable-length sequences.

    Args:
        q: ``(total_q, num_heads, head_dim)``; k: ``(total_k, num_kv_heads,
            head_dim)``; v: ``(total_k, num_kv_heads, head_dim_v)``.
        cu_seqlens_q, cu_seqlens_k: integer ``(batch + 1,)``, starting at 0,
            non-decreasing, ending at total_q / total_k. Sequence b is rows
            ``cu[b]:cu[b+1]``; masks apply per sequence (bottom-right causal).
        Other options (``sinks``, ``alibi_slopes`` included) as :func:`attention`.

    Returns:
        ``out`` ``(total_q, num_heads, head_dim_v)``, or ``(out, lse)`` with lse
        ``(num_heads, total_q)``. Empty sequences give no rows; a sequence with
        queries but no keys gives zero rows and lse ``-inf``.
    """
    call = V.packed_call(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, window, softcap,
                         sinks, alibi_slopes)
    out, lse = V.outputs(call, out, return_lse)
    if call.q.shape[0]:
        _forward.forward(call, out, lse)
    return (out, lse) if return_lse else out
