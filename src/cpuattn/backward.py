"""Backward passes: dense, packed (varlen) and paged attention gradients.

FlashAttention-2 recomputation from the forward's lse: ``P = exp(S - lse)``,
``Di = rowsum(dO * O)``, ``dS = P * (dP - Di)``, ``dV = P^T dO``,
``dK = scale * dS^T Q``, ``dQ = scale * dS K``. The engine (csrc/backward.c)
computes in float32, or float64 for float64 input; float16/bfloat16 inputs
are converted to float32 here and the gradients converted back.
"""
import numpy as np

from . import _backward
from . import _validate as V
from .dense import _check_cu_seqlens_qk, _check_dense_qkv, _check_kv, _check_packed_qkv
from .errors import DTypeError, ShapeError
from .paged import check_block_table, check_pages, check_queries


_DENSE = ("(batch, seq_q, num_heads, head_dim_v)", "(batch, num_heads, seq_q)")
_PACKED = ("(total_q, num_heads, head_dim_v)", "(num_heads, total_q)")


def _check_forward_results(out, dout, lse, q, out_shape, lse_shape, layouts):
    """out and dout: the forward output's shape and q's dtype; lse: as the
    forward returned it. layouts: _DENSE or _PACKED, for the messages.
    Returns lse as an array."""
    layout, lse_layout = layouts
    for name, arr in (("out", out), ("dout", dout)):
        if arr.shape != out_shape:
            raise ShapeError(f"{name}: expected shape {out_shape} {layout}, got {arr.shape}")
        if arr.dtype != q.dtype:
            raise DTypeError(f"{name}: expected dtype {q.dtype} (as q), got {arr.dtype}")
    lse = V.as_array(lse, "lse")
    want = np.dtype(V.compute_dtype(q.dtype))
    if lse.dtype != want:
        raise DTypeError(f"lse: expected dtype {want} for {q.dtype} input "
                         f"(as returned by the forward), got {lse.dtype}")
    if lse.shape != lse_shape:
        raise ShapeError(f"lse: expected shape {lse_shape} {lse_layout}, got {lse.shape}")
    return lse


def _run(arrays, layout, seqs, opts):
    """Convert to the compute dtype, allocate gradients, run the engine.

    arrays: dict of dout, q, k, v, out, lse (validated); layout: "dense" or
    "packed". Returns (dq, dk, dv) in the compute dtype.
    """
    ct = V.compute_dtype(arrays["q"].dtype)
    a = {n: (x if x.dtype == ct else x.astype(ct)) for n, x in arrays.items()}
    dq = np.empty(a["q"].shape, ct)
    dk = np.empty(a["k"].shape, ct)
    dv = np.empty(a["v"].shape, ct)
    di = np.empty(a["lse"].shape, ct)
    if dq.size or dk.size or dv.size:
        _backward.backward(a["dout"], a["q"], a["k"], a["v"], a["out"], a["lse"], di, dq, dk, dv,
                           layout=layout, seqs=seqs, opts=opts)
    return dq, dk, dv


def attention_backward(dout, q, k, v, out, lse, *, causal=False, scale=None, window=(-1, -1),
                       softcap=0.0):
    """Gradients of :func:`cpuattn.attention` with respect to q, k and v.

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
        causal, scale, window, softcap: the options of the forward call.

    Returns:
        ``(dq, dk, dv)`` shaped like q, k, v, in their dtype; dk/dv are summed
        over the query heads of each KV group. Rows that saw no key (lse
        ``-inf``) get zero gradients, and keys no row sees get zero dk/dv.

    Compute is float32 (float64 for float64 input). float16/bfloat16 inputs
    are converted to float32 copies first and the gradients rounded back.
    Memory beyond inputs and gradients is O(threads x tile); the result is
    bitwise identical for any thread count. Raises ShapeError / DTypeError on
    bad input.
    """
    dout, q, k, v, out = (V.as_array(x, n) for x, n in
                          ((dout, "dout"), (q, "q"), (k, "k"), (v, "v"), (out, "out")))
    _, (b, sq, sk), (h, hkv, d, dv) = _check_dense_qkv(q, k, v)
    lse = _check_forward_results(out, dout, lse, q, (b, sq, h, dv), (b, h, sq), _DENSE)
    opts = V.check_options(scale, window, softcap, causal, d)
    zeros = np.zeros(b, dtype=np.int64)
    seqs = V.Sequences(zeros, zeros, np.full(b, sq, np.int64), np.full(b, sk, np.int64))
    dq, dk, dv_ = _run(dict(dout=dout, q=q, k=k, v=v, out=out, lse=lse), "dense", seqs, opts)
    return dq.astype(q.dtype, copy=False), dk.astype(q.dtype, copy=False), \
        dv_.astype(q.dtype, copy=False)


def _varlen(dout, q, k, v, out, lse, cuq, cuk, opts):
    """Packed backward on validated 3-D arrays; gradients in the compute dtype."""
    seqs = V.Sequences(cuq[:-1].copy(), cuk[:-1].copy(), np.diff(cuq), np.diff(cuk))
    return _run(dict(dout=dout, q=q, k=k, v=v, out=out, lse=lse), "packed", seqs, opts)


def attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *,
                              causal=False, scale=None, window=(-1, -1), softcap=0.0):
    """Gradients of :func:`cpuattn.attention_varlen` with respect to q, k and v.

    Args:
        dout, out: ``(total_q, num_heads, head_dim_v)``.
        q: ``(total_q, num_heads, head_dim)``; k: ``(total_k, num_kv_heads,
            head_dim)``; v: ``(total_k, num_kv_heads, head_dim_v)``; one dtype.
        lse: ``(num_heads, total_q)`` float32 (float64 for float64 input), as
            returned by ``attention_varlen(..., return_lse=True)``.
        cu_seqlens_q, cu_seqlens_k: integer ``(batch + 1,)`` as in the forward.
        causal, scale, window, softcap: the options of the forward call.

    Returns:
        ``(dq, dk, dv)`` shaped like q, k, v in their dtype. Otherwise as
        :func:`attention_backward` (per-sequence masks, bottom-right causal).
    """
    dout, q, k, v, out = (V.as_array(x, n) for x, n in
                          ((dout, "dout"), (q, "q"), (k, "k"), (v, "v"), (out, "out")))
    _, (h, hkv, d, dv) = _check_packed_qkv(q, k, v)
    total = q.shape[0]
    lse = _check_forward_results(out, dout, lse, q, (total, h, dv), (h, total), _PACKED)
    cuq, cuk = _check_cu_seqlens_qk(cu_seqlens_q, cu_seqlens_k, total, k.shape[0])
    opts = V.check_options(scale, window, softcap, causal, d)
    grads = _varlen(dout, q, k, v, out, lse, cuq, cuk, opts)
    return tuple(g.astype(q.dtype, copy=False) for g in grads)


def paged_attention_backward(dout, q, k_pages, v_pages, block_table, seq_lens, out, lse, *,
                             cu_seqlens_q=None, causal=True, scale=None, window=(-1, -1),
                             softcap=0.0):
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
        cu_seqlens_q, causal, scale, window, softcap: as the forward call
            (``causal`` defaults to True).

    Returns:
        ``(dq, dk_pages, dv_pages)``: dq like q in q's dtype; dk/dv_pages with
        the pool's shape and dtype. A page shared by several sequences
        receives the sum of their gradients; pages (and slots) no sequence
        uses are 0.

    Each sequence's page chain is gathered into a packed buffer (converted to
    the compute dtype), the packed backward runs on it, and its dK/dV are
    added into the page-shaped gradients in sequence order (deterministic).
    Raises ShapeError / DTypeError / PageError on bad input.
    """
    dout, q, out = V.as_array(dout, "dout"), V.as_array(q, "q"), V.as_array(out, "out")
    V.check_ndim(q, "q", 3, "(tokens, num_heads, head_dim)")
    k_pages, v_pages, _ = check_pages(k_pages, v_pages)
    num_pages, page_size = k_pages.shape[:2]
    bt, lens = check_block_table(block_table, seq_lens, num_pages, page_size)
    V.dtype_code(q, "q")
    if (q.dtype == np.float64) != (k_pages.dtype == np.float64):
        raise DTypeError(f"k_pages: no kernel for q {q.dtype} over {k_pages.dtype} pages "
                         "(float64 q needs float64 pages and vice versa)")
    h, hkv, d, dv = _check_kv(q, k_pages, v_pages, 1, "k_pages", "v_pages")
    batch = lens.shape[0]
    cuq = check_queries(q, cu_seqlens_q, lens)
    total = q.shape[0]
    lse = _check_forward_results(out, dout, lse, q, (total, h, dv), (h, total), _PACKED)
    opts = V.check_options(scale, window, softcap, causal, d)

    # (page, slot) of every cached token, sequence after sequence
    pos = np.concatenate([np.arange(n, dtype=np.int64) for n in lens]) if batch else \
        np.zeros(0, np.int64)
    seq = np.repeat(np.arange(batch), lens)
    page = bt[seq, pos // page_size]
    slot = pos % page_size
    ct = V.compute_dtype(q.dtype)
    k = k_pages[page, slot].astype(ct, copy=False)
    v = v_pages[page, slot].astype(ct, copy=False)
    cuk = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    dq, dk, dv_ = _varlen(dout, q, k, v, out, lse, cuq, cuk, opts)
    dk_pages = np.zeros(k_pages.shape, ct)
    dv_pages = np.zeros(v_pages.shape, ct)
    np.add.at(dk_pages, (page, slot), dk)
    np.add.at(dv_pages, (page, slot), dv_)
    return (dq.astype(q.dtype, copy=False), dk_pages.astype(k_pages.dtype, copy=False),
            dv_pages.astype(v_pages.dtype, copy=False))
