"""Paged KV cache, functional API (vLLM / flash_attn_with_kvcache style).

K/V live in pages ``(num_pages, page_size, num_kv_heads, head_dim)``; row b
of ``block_table`` lists the pages of sequence b in order. Only the first
``ceil(seq_lens[b] / page_size)`` entries of a row are read (and checked);
page slots past a sequence's length are never read.
"""
from __future__ import annotations

import numbers
from typing import Literal, overload

import numpy as np

from . import _quant, quant
from . import _validate as V
from ._plan import PagedPlan
from ._typing import Array, ArrayLike, FloatArray, Window
from .errors import PageError, ShapeError


@overload
def paged_attention(q: ArrayLike, k_pages: ArrayLike, v_pages: ArrayLike, block_table: ArrayLike,
                    seq_lens: ArrayLike, *, cu_seqlens_q: ArrayLike | None = ...,
                    causal: bool = ..., scale: float | None = ..., window: Window = ...,
                    softcap: float = ..., return_lse: Literal[False] = ...,
                    out: Array | None = ..., k_scale: ArrayLike | float | None = ...,
                    v_scale: ArrayLike | float | None = ..., sinks: ArrayLike | None = ...,
                    alibi_slopes: ArrayLike | None = ..., tree_mask: ArrayLike | None = ...) -> Array: ...
@overload
def paged_attention(q: ArrayLike, k_pages: ArrayLike, v_pages: ArrayLike, block_table: ArrayLike,
                    seq_lens: ArrayLike, *, cu_seqlens_q: ArrayLike | None = ...,
                    causal: bool = ..., scale: float | None = ..., window: Window = ...,
                    softcap: float = ..., return_lse: Literal[True],
                    out: Array | None = ..., k_scale: ArrayLike | float | None = ...,
                    v_scale: ArrayLike | float | None = ..., sinks: ArrayLike | None = ...,
                    alibi_slopes: ArrayLike | None = ..., tree_mask: ArrayLike | None = ...) -> tuple[Array, FloatArray]: ...
@overload
def paged_attention(q: ArrayLike, k_pages: ArrayLike, v_pages: ArrayLike, block_table: ArrayLike,
                    seq_lens: ArrayLike, *, cu_seqlens_q: ArrayLike | None = ...,
                    causal: bool = ..., scale: float | None = ..., window: Window = ...,
                    softcap: float = ..., return_lse: bool = ...,
                    out: Array | None = ..., k_scale: ArrayLike | float | None = ...,
                    v_scale: ArrayLike | float | None = ..., sinks: ArrayLike | None = ...,
                    alibi_slopes: ArrayLike | None = ..., tree_mask: ArrayLike | None = ...) -> Array | tuple[Array, FloatArray]: ...


def paged_attention(q: ArrayLike, k_pages: ArrayLike, v_pages: ArrayLike, block_table: ArrayLike,
                    seq_lens: ArrayLike, *, cu_seqlens_q: ArrayLike | None = None,
                    causal: bool = True, scale: float | None = None, window: Window = (-1, -1),
                    softcap: float = 0.0, return_lse: bool = False, out: Array | None = None,
                    k_scale: ArrayLike | float | None = None, v_scale: ArrayLike | float | None = None,
                    sinks: ArrayLike | None = None, alibi_slopes: ArrayLike | None = None,
                    tree_mask: ArrayLike | None = None) -> Array | tuple[Array, FloatArray]:
    """Attention over a paged KV cache: decode, chunked prefill, mixed batches.

    Args:
        q: decode: ``(batch, num_heads, head_dim)``, one query per sequence at
            position ``seq_lens[b] - 1``. With ``cu_seqlens_q``: ``(total_q,
            num_heads, head_dim)``; sequence b's ``n_b = cu[b+1] - cu[b]``
            queries are its last n_b positions (n_b <= seq_lens[b]).
        k_pages, v_pages: ``(num_pages, page_size, num_kv_heads, head_dim)``
            (``head_dim // 2`` bytes for int4), each float32, float16,
            bfloat16, or low-bit: int8, int4 (uint8 pairs), float8_e4m3fn,
            float8_e5m2 (the ml_dtypes dtypes); K and V may differ. Float64
            q needs float64 pages (and only those); low-bit pages need a
            float32, float16 or bfloat16 q. Low-bit pages are dequantised
            inside the kernels, never copied.
        block_table: int32 ``(batch, max_pages_per_seq)``: the pages of each
            sequence in order. Entries past ``ceil(seq_lens[b] / page_size)``
            are ignored; used entries must be in ``[0, num_pages)`` (PageError).
        seq_lens: int32 ``(batch,)``: KV length of each sequence, the query
            tokens' own K/V included (write them to the cache first).
        cu_seqlens_q: optional int32 ``(batch + 1,)``.
        causal, scale, window, softcap, sinks, alibi_slopes: as
            :func:`cpuattn.attention` (``causal`` defaults to True here).
        tree_mask: speculative-decoding verify (with ``cu_seqlens_q`` and
            ``causal=True``): a bool array of ``sum_b n_b ** 2`` entries,
            sequence b's row-major ``n_b x n_b`` block saying which of its
            draft tokens (its last n_b) each of its queries sees; see
            :class:`cpuattn.PagedPlan`.
        return_lse: also return lse ``(num_heads, total_q)`` float32.
        out: optional output array ``(total_q, num_heads, head_dim)`` in q's dtype.
        k_scale, v_scale: the scales of low-bit pages (see
            :func:`cpuattn.quantize_kv`): int8 and fp8 float32 ``(num_pages,
            page_size, num_kv_heads)``, int4 float16 ``(num_pages, page_size,
            num_kv_heads, ceil(head_dim / 32))``; for fp8 also one float for
            the whole tensor (default 1.0). None for float pages (a scale
            there raises ShapeError, as int8/int4 pages without one do).

    Returns:
        ``out`` or ``(out, lse)``. A sequence of length 0 gives zero rows.

    Raises:
        ShapeError: a shape, option or scale that does not fit (the message
            names the argument, what was expected and what was got).
        DTypeError: an unsupported dtype of q, the pages, the scales or an
            index array.
        PageError: a block-table entry outside ``[0, num_pages)`` where a
            sequence reads it, or a sequence longer than its table; checked
            before any kernel runs, nothing is written.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> pages = rng.standard_normal((4, 16, 2, 64), dtype=np.float32)  # 4 pages of 16 slots
        >>> q = rng.standard_normal((2, 4, 64), dtype=np.float32)           # 2 sequences, 1 token
        >>> block_table = np.array([[3, 1], [0, 2]], np.int32)
        >>> seq_lens = np.array([20, 7], np.int32)
        >>> out = cpuattn.paged_attention(q, pages, pages, block_table, seq_lens)
        >>> out.shape
        (2, 4, 64)
        >>> kv = pages[[3, 1]].reshape(1, 32, 2, 64)[:, :20]                 # sequence 0's keys
        >>> ref = cpuattn.reference_attention(q[:1, None], kv, kv)[:, 0]
        >>> bool(np.allclose(out[:1], ref, atol=1e-5))
        True

    Integer index arrays of another integer dtype are accepted and converted
    after their range is checked. Each KV page is read once per KV head for
    all query heads of its group. This is ``PagedPlan(block_table, seq_lens,
    page_size=..., num_pages=..., cu_seqlens_q=...).run(q, k_pages, v_pages,
    ...)``: a serving loop that calls it once per layer with the same
    indices makes the plan once instead (:class:`cpuattn.PagedPlan`).
    """
    if type(k_pages) is not np.ndarray or k_pages.ndim != 4:
        k_pages = V.as_array(k_pages, "k_pages", kv=True)
        V.check_ndim(k_pages, "k_pages", 4, "(num_pages, page_size, num_kv_heads, head_dim)")
    V.check_page_size(k_pages, "k_pages")
    plan = PagedPlan(block_table, seq_lens, page_size=k_pages.shape[1],
                     num_pages=k_pages.shape[0], cu_seqlens_q=cu_seqlens_q, tree_mask=tree_mask)
    return plan.run(q, k_pages, v_pages, causal=causal, scale=scale, window=window,
                    softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes, k_scale=k_scale,
                    v_scale=v_scale, return_lse=return_lse, out=out)


def gather_pages(pages: ArrayLike, block_table: ArrayLike, seq_lens: ArrayLike, *,
                 scale: ArrayLike | float | None = None) -> Array:
    """Gather page chains into a padded dense array.

    Args:
        pages: ``(num_pages, page_size, num_kv_heads, head_dim)`` float, or
            low-bit codes (int8, int4 uint8 pairs, fp8) with their ``scale``
            (as ``paged_attention``'s ``k_scale``).
        block_table: int32 ``(batch, max_pages_per_seq)``; seq_lens: int32 ``(batch,)``.
        scale: the scales of low-bit pages; None for float pages.

    Returns:
        ``(batch, max(seq_lens), num_kv_heads, head_dim)`` in the pages'
        dtype, or float32 (dequantised) for low-bit pages; rows past a
        sequence's length are 0.
    """
    pages = V.as_array(pages, "pages", kv=True)
    V.check_ndim(pages, "pages", 4, "(num_pages, page_size, num_kv_heads, head_dim)")
    V.check_page_size(pages, "pages")
    scales = V.page_scale(scale, pages, "scale", "pages")
    num_pages, page_size = pages.shape[:2]
    bt, lens = V.block_table(block_table, seq_lens, num_pages, page_size)
    codes = _gather(pages, bt, lens)
    fmt = V.kv_format_of(pages)
    if fmt is None:
        return codes
    if scales.ndim == 1:   # one per-tensor fp8 scale
        return quant.dequantize_kv(codes, float(scales[0]), fmt.name)
    return quant.dequantize_kv(codes, _gather(scales, bt, lens), fmt.name)


def _gather(pages, bt, lens):
    """Rows of each chain, padded with zeros: (batch, max_len) + row shape."""
    page_size = pages.shape[1]
    batch = lens.shape[0]
    max_len = int(lens.max()) if batch else 0
    out = np.zeros((batch, max_len) + pages.shape[2:], dtype=pages.dtype)
    for b in range(batch):
        n = int(lens[b])
        if n:
            chain = bt[b, : (n + page_size - 1) // page_size]
            out[b, :n] = pages[chain].reshape((-1,) + pages.shape[2:])[:n]
    return out


def write_kv(k_pages: ArrayLike, v_pages: ArrayLike, slots: ArrayLike, k: ArrayLike,
             v: ArrayLike, *, k_scale: ArrayLike | float | None = None,
             v_scale: ArrayLike | float | None = None) -> None:
    """Store K/V rows into page slots in place (vLLM's ``reshape_and_cache``).

    Args:
        k_pages, v_pages: ``(num_pages, page_size, num_kv_heads, head_dim)``
            arrays to write into (numpy arrays, or CPU tensors numpy views
            without a copy; writable; any strides), float or low-bit codes
            (int8, int4 uint8 pairs, fp8), K and V types apart.
        slots: int ``(n,)``: slot ``page * page_size + offset`` of each row;
            a negative slot is skipped (padding).
        k, v: ``(n, num_kv_heads, head_dim)`` of any float dtype: converted
            to float pages with round-to-nearest-even, or quantised into
            low-bit pages with exactly the bytes of
            :func:`cpuattn.quantize_kv`, their scales stored into
            ``k_scale`` / ``v_scale``.
        k_scale, v_scale: the scale arrays of low-bit pages, written in
            place (shaped as ``paged_attention``'s); for fp8 pages also one
            float for the whole tensor (default 1.0; codes are ``x /
            scale``, saturating). None for float pages.

    Every argument and slot is checked before anything is written: on any
    error nothing changes.

    Raises:
        PageError: a slot past ``num_pages * page_size``.
        ShapeError / DTypeError: bad arrays, read-only pages or scales, a
            scale on float pages or a missing one for int8/int4 pages.
    Examples:
        >>> k_pages = np.zeros((2, 4, 1, 8), np.float32)    # 2 pages of 4 slots
        >>> v_pages = np.zeros_like(k_pages)
        >>> k = np.ones((2, 1, 8), np.float32)
        >>> cpuattn.write_kv(k_pages, v_pages, np.array([5, -1]), k, 2 * k)  # -1: padding
        >>> float(k_pages[1, 1, 0, 0]), float(v_pages[1, 1, 0, 0]), float(k_pages.sum())
        (1.0, 2.0, 8.0)
    """
    kp = _target(k_pages, "k_pages")
    vp = _target(v_pages, "v_pages")
    if vp.shape[:3] != kp.shape[:3]:
        raise ShapeError(f"v_pages: expected (num_pages, page_size, num_kv_heads) "
                         f"{kp.shape[:3]} (as k_pages), got {vp.shape[:3]}")
    sl = V.check_slots(slots)
    stores = [_encoded(x, p, s, sl.shape[0], nm, pn, sn) for x, p, s, nm, pn, sn in (
        (k, kp, k_scale, "k", "k_pages", "k_scale"), (v, vp, v_scale, "v", "v_pages", "v_scale"))]
    num_slots = kp.shape[0] * kp.shape[1]
    bad = np.flatnonzero(sl >= num_slots)
    if bad.size:
        raise PageError(f"slots[{bad[0]}]: expected a slot in [0, {num_slots}) (num_pages * "
                        f"page_size), got {sl[bad[0]]}")
    used = sl >= 0
    page, offset = np.divmod(sl[used], kp.shape[1])
    for target, rows in (pair for store in stores for pair in store):
        target[page, offset] = rows[used]


def _target(x, name):
    """An array the caller's memory is written through (never a copy)."""
    arr = x if isinstance(x, np.ndarray) else V.as_array(x, name, kv=True)
    if not isinstance(x, np.ndarray) and arr.base is None:
        raise ShapeError(f"{name}: expected an array to write into (a numpy array or a CPU "
                         f"tensor numpy views without a copy), got {type(x).__name__}")
    if not arr.flags.writeable:
        raise ShapeError(f"{name}: expected a writable array, got a read-only one")
    return arr


def _encoded(x, pages, scale, n, name, pname, sname):
    """[(target array, rows to store there)] for rows x into pages (and
    their scales): rows (n, num_kv_heads, ...) in the target's dtype."""
    if pages.ndim == 4:
        V.check_page_size(pages, pname)
    else:
        V.check_ndim(pages, pname, 4, "(num_pages, page_size, num_kv_heads, head_dim)")
    fmt = V.kv_format_of(pages)
    if fmt is None:
        V.dtype_code(pages, pname)
    hkv, d = pages.shape[2], V.page_head_dim(pages)
    x = V.as_array(x, name)
    if x.shape != (n, hkv, d):
        raise ShapeError(f"{name}: expected shape ({n}, {hkv}, {d}) (one row per slot, as "
                         f"{pname}), got {x.shape}")
    if fmt is None:
        if scale is not None:
            raise ShapeError(f"{sname}: {pname} are {pages.dtype}, which takes no scale; "
                             f"got {type(scale).__name__}")
        return [(pages, x.astype(pages.dtype, copy=False))]
    flat = np.ascontiguousarray(x.reshape(-1, d), dtype=np.float32)
    per_tensor = fmt.name.startswith("float8") and (
        scale is None or (isinstance(scale, numbers.Real) and not isinstance(scale, (bool, np.bool_))))
    if per_tensor:
        s, _ = V.kv_scale(scale, fmt, pages.shape[:3], d, sname)
        codes = _quant.encode_fp8(flat, fmt.code, float(s[0]))
        return [(pages, codes.view(fmt.codes_dtype).reshape(n, hkv, d))]
    if scale is None:
        raise ShapeError(f"{sname}: {fmt.name} pages need their scales, got None")
    target = _target(scale, sname)
    want = V.scale_shape(fmt, pages.shape[:3], d)
    if target.shape != want or target.dtype != fmt.scale_dtype:
        raise ShapeError(f"{sname}: expected a {fmt.scale_dtype} array of shape {want} for "
                         f"{fmt.name} {pname}, got {target.dtype} {target.shape}")
    codes, scales = _quant.quantize_rows(flat, fmt.code, fmt.codes_dtype)
    return [(pages, codes.reshape((n, hkv) + codes.shape[1:])),
            (target, scales.reshape((n,) + want[2:]))]
