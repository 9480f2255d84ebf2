"""Paged KV cache, functional API (vLLM / flash_attn_with_kvcache style).

K/V live in pages ``(num_pages, page_size, num_kv_heads, head_dim)``; row b
of ``block_table`` lists the pages of sequence b in order. Only the first
``ceil(seq_lens[b] / page_size)`` entries of a row are read (and checked);
page slots past a sequence's length are never read.
"""
from __future__ import annotations

from typing import Literal, overload

import numpy as np

from . import _forward
from . import quant
from . import _validate as V
from ._typing import Array, ArrayLike, FloatArray, Window


@overload
def paged_attention(q: ArrayLike, k_pages: ArrayLike, v_pages: ArrayLike, block_table: ArrayLike,
                    seq_lens: ArrayLike, *, cu_seqlens_q: ArrayLike | None = ...,
                    causal: bool = ..., scale: float | None = ..., window: Window = ...,
                    softcap: float = ..., return_lse: Literal[False] = ...,
                    out: Array | None = ..., k_scale: ArrayLike | float | None = ...,
                    v_scale: ArrayLike | float | None = ...) -> Array: ...
@overload
def paged_attention(q: ArrayLike, k_pages: ArrayLike, v_pages: ArrayLike, block_table: ArrayLike,
                    seq_lens: ArrayLike, *, cu_seqlens_q: ArrayLike | None = ...,
                    causal: bool = ..., scale: float | None = ..., window: Window = ...,
                    softcap: float = ..., return_lse: Literal[True],
                    out: Array | None = ..., k_scale: ArrayLike | float | None = ...,
                    v_scale: ArrayLike | float | None = ...) -> tuple[Array, FloatArray]: ...
@overload
def paged_attention(q: ArrayLike, k_pages: ArrayLike, v_pages: ArrayLike, block_table: ArrayLike,
                    seq_lens: ArrayLike, *, cu_seqlens_q: ArrayLike | None = ...,
                    causal: bool = ..., scale: float | None = ..., window: Window = ...,
                    softcap: float = ..., return_lse: bool = ...,
                    out: Array | None = ..., k_scale: ArrayLike | float | None = ...,
                    v_scale: ArrayLike | float | None = ...) -> Array | tuple[Array, FloatArray]: ...


def paged_attention(q: ArrayLike, k_pages: ArrayLike, v_pages: ArrayLike, block_table: ArrayLike,
                    seq_lens: ArrayLike, *, cu_seqlens_q: ArrayLike | None = None,
                    causal: bool = True, scale: float | None = None, window: Window = (-1, -1),
                    softcap: float = 0.0, return_lse: bool = False, out: Array | None = None,
                    k_scale: ArrayLike | float | None = None, v_scale: ArrayLike | float | None = None
                    ) -> Array | tuple[Array, FloatArray]:
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
        causal, scale, window, softcap: as :func:`cpuattn.attention`
            (``causal`` defaults to True here).
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

    Integer index arrays of another integer dtype are accepted and converted
    after their range is checked. Each KV page is read once per KV head for
    all query heads of its group.
    """
    if cu_seqlens_q is None and out is None:
        # plain decode calls: checked in C, tens of microseconds less per call
        res = _forward.paged_decode(q, k_pages, v_pages, block_table, seq_lens, scale, causal,
                                    window, softcap, return_lse, k_scale, v_scale)
        if res is not None:
            return res
    call = V.paged_call(q, k_pages, v_pages, block_table, seq_lens, cu_seqlens_q, causal, scale,
                        window, softcap, k_scale=k_scale, v_scale=v_scale)
    out, lse = V.outputs(call, out, return_lse)
    if call.q.shape[0]:
        _forward.forward(call, out, lse)
    return (out, lse) if return_lse else out


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
