"""Backward passes: dense, packed (varlen) and paged attention gradients.

FlashAttention-2 recomputation from the forward's lse: ``P = exp(S - lse)``,
``Di = rowsum(dO * O)``, ``dS = P * (dP - Di)``, ``dV = P^T dO``,
``dK = scale * dS^T Q``, ``dQ = scale * dS K``. The engine (csrc/backward.c)
computes in float32, or float64 for float64 input; float16/bfloat16 inputs
are converted to float32 here and the gradients converted back.
"""
from __future__ import annotations

import numpy as np

from . import _backward
from . import _validate as V
from ._typing import Array, ArrayLike, FloatArray, Window

Grads = tuple[Array, Array, Array] | tuple[Array, Array, Array, FloatArray]


def _run(call, out, dout, lse):
    """Convert a checked call and the forward's results to the compute
    dtype, allocate the gradients and run the engine: (dq, dk, dv) in the
    compute dtype, and Di = rowsum(dO * O) laid out like lse (the q pass
    computes it for every query row)."""
    ct = V.compute_dtype(call.q.dtype)

    def conv(x):
        return x if x.dtype == ct else x.astype(ct)
    call = call._replace(q=conv(call.q), k=conv(call.k), v=conv(call.v))
    dq = np.empty(call.q.shape, ct)
    dk = np.empty(call.k.shape, ct)
    dv = np.empty(call.v.shape, ct)
    di = np.zeros(lse.shape, ct)
    if dq.size or dk.size or dv.size:
        _backward.backward(call, conv(out), conv(dout), conv(lse), di, dq, dk, dv)
    return dq, dk, dv, di


def _grads(call, lse, di, grads):
    """The backward's result: (dq, dk, dv) in their dtypes, and with sinks
    dsinks (num_heads,) in the compute dtype (float32, float64 for float64
    input). The sink is one more logit of each row's softmax with no value,
    so dL/dsink_h = -sum over the rows of head h of exp(sink_h - lse) * Di."""
    if call.sinks is None:
        return grads
    heads = 1 if call.layout == "dense" else 0   # lse (B, H, Sq) or (H, T)
    shape = [1] * lse.ndim
    shape[heads] = call.heads
    with np.errstate(all="ignore"):
        l64 = lse.astype(np.float64)
        p = np.exp(call.sinks.reshape(shape) - l64)
        p = np.where(np.isneginf(l64), 0.0, p)
        axes = tuple(i for i in range(lse.ndim) if i != heads)
        ds = -(p * di).sum(axis=axes)
    return grads + (ds.astype(V.compute_dtype(call.q.dtype)),)


def attention_backward(dout: ArrayLike, q: ArrayLike, k: ArrayLike, v: ArrayLike, out: ArrayLike,
                       lse: ArrayLike, *, causal: bool = False, scale: float | None = None,
                       window: Window = (-1, -1), softcap: float = 0.0,
                       sinks: ArrayLike | None = None, alibi_slopes: ArrayLike | None = None
                       ) -> Grads:
    """Gradients of :func:`cpuattn.attention` with respect to q, k and v
    (and the sinks).

    Args:
        dout: ``(batch, seq_q, num_heads, head_dim_v)``, gradient of the output.
        q: ``(batch, seq_q, num_heads, head_dim)``.
        k: ``(batch, seq_k, num_kv_heads, head_dim)``.
        v: ``(batch, seq_k, num_kv_heads, head_dim_v)``.
        out: ``(batch, seq_q, num_heads, head_dim_v)``, the forward output.
        lse: ``(batch, num_heads, seq_q)``, float32 (float64 for float64
            input), as returned by ``cpuattn.attention(..., return_lse=True)``.
            dout, q, k, v and out share one dtype: float32, float64, float16 or
            bfloat16. Any strides work as long as the last axis is contiguous.
        causal, scale, window, softcap, sinks, alibi_slopes: the options of
            the forward call (its lse includes the sinks).

    Returns:
        ``(dq, dk, dv)`` shaped like q, k, v, in their dtype; dk/dv are summed
        over the query heads of each KV group. Rows that saw no key (lse
        ``-inf``) get zero gradients, and keys no row sees get zero dk/dv.
        With ``sinks``, a fourth gradient ``dsinks`` ``(num_heads,)``, float32
        (float64 for float64 input).

    Compute is float32 (float64 for float64 input). float16/bfloat16 inputs
    are converted to float32 copies first and the gradients rounded back.
    Memory beyond inputs and gradients is O(threads x tile); the result is
    bitwise identical for any thread count. Raises ShapeError / DTypeError on
    bad input.
    """
    call = V.dense_call(q, k, v, causal, scale, window, softcap, sinks, alibi_slopes)
    out, dout, lse = V.forward_results(call, out, dout, lse)
    *grads, di = _run(call, out, dout, lse)
    return _grads(call, lse, di, tuple(g.astype(call.q.dtype, copy=False) for g in grads))


def attention_varlen_backward(dout: ArrayLike, q: ArrayLike, k: ArrayLike, v: ArrayLike,
                              out: ArrayLike, lse: ArrayLike, cu_seqlens_q: ArrayLike,
                              cu_seqlens_k: ArrayLike, *, causal: bool = False,
                              scale: float | None = None, window: Window = (-1, -1),
                              softcap: float = 0.0, sinks: ArrayLike | None = None,
                              alibi_slopes: ArrayLike | None = None) -> Grads:
    """Gradients of :func:`cpuattn.attention_varlen` with respect to q, k and v.

    Args:
        dout, out: ``(total_q, num_heads, head_dim_v)``.
        q: ``(total_q, num_heads, head_dim)``; k: ``(total_k, num_kv_heads,
            head_dim)``; v: ``(total_k, num_kv_heads, head_dim_v)``; one dtype.
        lse: ``(num_heads, total_q)`` float32 (float64 for float64 input), as
            returned by ``attention_varlen(..., return_lse=True)``.
        cu_seqlens_q, cu_seqlens_k: integer ``(batch + 1,)`` as in the forward.
        causal, scale, window, softcap, sinks, alibi_slopes: the options of
            the forward call.

    Returns:
        ``(dq, dk, dv)`` shaped like q, k, v in their dtype (and ``dsinks``
        with ``sinks``). Otherwise as :func:`attention_backward`
        (per-sequence masks, bottom-right causal).
    """
    call = V.packed_call(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, window, softcap,
                         sinks, alibi_slopes)
    out, dout, lse = V.forward_results(call, out, dout, lse)
    *grads, di = _run(call, out, dout, lse)
    return _grads(call, lse, di, tuple(g.astype(call.q.dtype, copy=False) for g in grads))


def paged_attention_backward(dout: ArrayLike, q: ArrayLike, k_pages: ArrayLike,
                             v_pages: ArrayLike, block_table: ArrayLike, seq_lens: ArrayLike,
                             out: ArrayLike, lse: ArrayLike, *,
                             cu_seqlens_q: ArrayLike | None = None, causal: bool = True,
                             scale: float | None = None, window: Window = (-1, -1),
                             softcap: float = 0.0, sinks: ArrayLike | None = None,
                             alibi_slopes: ArrayLike | None = None) -> Grads:
    """Gradients of :func:`cpuattn.paged_attention` with respect to q and the pages.

    Args:
        dout, out: ``(total_q, num_heads, head_dim_v)`` (decode: ``(batch, ...)``).
        q: decode: ``(batch, num_heads, head_dim)``, one query per sequence at
            position ``seq_lens[b] - 1``; with ``cu_seqlens_q``: ``(total_q,
            num_heads, head_dim)``, sequence b's queries are its last
            ``n_b = cu[b+1] - cu[b]`` positions (``n_b <= seq_lens[b]``).
        k_pages, v_pages: ``(num_pages, page_size, num_kv_heads, head_dim)``,
            q's dtype, or float16/bfloat16 pages under float32 q.
        block_table: int32 ``(batch, max_pages_per_seq)``; entries past
            ``ceil(seq_lens[b] / page_size)`` are ignored, used entries must be
            in ``[0, num_pages)`` (else PageError).
        seq_lens: int32 ``(batch,)``, KV length of each sequence.
        lse: ``(num_heads, total_q)`` float32 (float64 for float64 q), as
            returned by the forward with ``return_lse=True``.
        cu_seqlens_q, causal, scale, window, softcap, sinks, alibi_slopes:
            as the forward call (``causal`` defaults to True).

    Returns:
        ``(dq, dk_pages, dv_pages)``: dq like q in q's dtype; dk/dv_pages with
        the pool's shape and dtype. A page shared by several sequences
        receives the sum of their gradients; pages (and slots) no sequence
        uses are 0. With ``sinks``, a fourth gradient ``dsinks``.

    Each sequence's page chain is gathered into a packed buffer (converted to
    the compute dtype), the packed backward runs on it, and its dK/dV are
    added into the page-shaped gradients in sequence order (deterministic).
    Raises ShapeError / DTypeError / PageError on bad input.
    """
    call = V.paged_call(q, k_pages, v_pages, block_table, seq_lens, cu_seqlens_q, causal, scale,
                        window, softcap, sinks, alibi_slopes)
    out, dout, lse = V.forward_results(call, out, dout, lse)
    q, k_pages, v_pages, bt, lens = call.q, call.k, call.v, call.block_table, call.seqs.k_len
    batch, page_size = lens.shape[0], k_pages.shape[1]

    # (page, slot) of every cached token, sequence after sequence
    pos = np.concatenate([np.arange(n, dtype=np.int64) for n in lens]) if batch else \
        np.zeros(0, np.int64)
    seq = np.repeat(np.arange(batch), lens)
    page = bt[seq, pos // page_size]
    slot = pos % page_size
    ct = V.compute_dtype(q.dtype)
    k = k_pages[page, slot].astype(ct, copy=False)
    v = v_pages[page, slot].astype(ct, copy=False)
    k_start = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64) if batch else lens
    packed = call._replace(k=k, v=v, layout="packed", block_table=None,
                           seqs=call.seqs._replace(k_start=k_start))
    dq, dk, dv_, di = _run(packed, out, dout, lse)
    dk_pages = np.zeros(k_pages.shape, ct)
    dv_pages = np.zeros(v_pages.shape, ct)
    np.add.at(dk_pages, (page, slot), dk)
    np.add.at(dv_pages, (page, slot), dv_)
    return _grads(call, lse, di,
                  (dq.astype(q.dtype, copy=False), dk_pages.astype(k_pages.dtype, copy=False),
                   dv_pages.astype(v_pages.dtype, copy=False)))
