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
from . import _validate as V
from ._typing import Array, ArrayLike, FloatArray, Window


@overload
def paged_attention(q: ArrayLike, k_pages: ArrayLike, v_pages: ArrayLike, block_table: ArrayLike,
                    seq_lens: ArrayLike, *, cu_seqlens_q: ArrayLike | None = ...,
                    causal: bool = ..., scale: float | None = ..., window: Window = ...,
                    softcap: float = ..., return_lse: Literal[False] = ...,
                    out: Array | None = ...) -> Array: ...
@overload
def paged_attention(q: ArrayLike, k_pages: ArrayLike, v_pages: ArrayLike, block_table: ArrayLike,
                    seq_lens: ArrayLike, *, cu_seqlens_q: ArrayLike | None = ...,
                    causal: bool = ..., scale: float | None = ..., window: Window = ...,
                    softcap: float = ..., return_lse: Literal[True],
                    out: Array | None = ...) -> tuple[Array, FloatArray]: ...
@overload
def paged_attention(q: ArrayLike, k_pages: ArrayLike, v_pages: ArrayLike, block_table: ArrayLike,
                    seq_lens: ArrayLike, *, cu_seqlens_q: ArrayLike | None = ...,
                    causal: bool = ..., scale: float | None = ..., window: Window = ...,
                    softcap: float = ..., return_lse: bool = ...,
                    out: Array | None = ...) -> Array | tuple[Array, FloatArray]: ...


def paged_attention(q: ArrayLike, k_pages: ArrayLike, v_pages: ArrayLike, block_table: ArrayLike,
                    seq_lens: ArrayLike, *, cu_seqlens_q: ArrayLike | None = None,
                    causal: bool = True, scale: float | None = None, window: Window = (-1, -1),
                    softcap: float = 0.0, return_lse: bool = False, out: Array | None = None
                    ) -> Array | tuple[Array, FloatArray]:
    """Attention over a paged KV cache: decode, chunked prefill, mixed batches.

    Args:
        q: decode: ``(batch, num_heads, head_dim)``, one query per sequence at
            position ``seq_lens[b] - 1``. With ``cu_seqlens_q``: ``(total_q,
            num_heads, head_dim)``; sequence b's ``n_b = cu[b+1] - cu[b]``
            queries are its last n_b positions (n_b <= seq_lens[b]).
        k_pages, v_pages: ``(num_pages, page_size, num_kv_heads, head_dim)``,
            one dtype, which may be lower precision than q (float32 q over
            float16/bfloat16 pages); float64 q needs float64 pages.
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

    Returns:
        ``out`` or ``(out, lse)``. A sequence of length 0 gives zero rows.

    Integer index arrays of another integer dtype are accepted and converted
    after their range is checked. Each KV page is read once per KV head for
    all query heads of its group.
    """
    if cu_seqlens_q is None and out is None:
        # plain decode calls: checked in C, a few microseconds less per call
        res = _forward.paged_decode(q, k_pages, v_pages, block_table, seq_lens, scale, causal,
                                    window, softcap, return_lse)
        if res is not None:
            return res
    call = V.paged_call(q, k_pages, v_pages, block_table, seq_lens, cu_seqlens_q, causal, scale,
                        window, softcap)
    out, lse = V.outputs(call, out, return_lse)
    if call.q.shape[0]:
        _forward.forward(call, out, lse)
    return (out, lse) if return_lse else out


def gather_pages(pages: ArrayLike, block_table: ArrayLike, seq_lens: ArrayLike) -> Array:
    """Gather page chains into a padded dense array.

    Args:
        pages: ``(num_pages, page_size, num_kv_heads, head_dim)``.
        block_table: int32 ``(batch, max_pages_per_seq)``; seq_lens: int32 ``(batch,)``.

    Returns:
        ``(batch, max(seq_lens), num_kv_heads, head_dim)`` in the pages' dtype;
        rows past a sequence's length are 0.
    """
    pages = V.as_array(pages, "pages")
    V.check_ndim(pages, "pages", 4, "(num_pages, page_size, num_kv_heads, head_dim)")
    V.check_page_size(pages, "pages")
    num_pages, page_size = pages.shape[:2]
    bt, lens = V.block_table(block_table, seq_lens, num_pages, page_size)
    batch = lens.shape[0]
    max_len = int(lens.max()) if batch else 0
    out = np.zeros((batch, max_len) + pages.shape[2:], dtype=pages.dtype)
    for b in range(batch):
        n = int(lens[b])
        if n:
            chain = bt[b, : (n + page_size - 1) // page_size]
            out[b, :n] = pages[chain].reshape((-1,) + pages.shape[2:])[:n]
    return out
