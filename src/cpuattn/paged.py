"""Paged KV cache, functional API (vLLM / flash_attn_with_kvcache style).

K/V live in pages ``(num_pages, page_size, num_kv_heads, head_dim)``; row b
of ``block_table`` lists the pages of sequence b in order. Only the first
``ceil(seq_lens[b] / page_size)`` entries of a row are read (and checked);
page slots past a sequence's length are never read.
"""
import numpy as np

from . import _forward
from . import _validate as V
from .dense import _check_kv
from .errors import DTypeError, PageError, ShapeError


def check_pages(k_pages, v_pages):
    """Validated page arrays: returns (k_pages, v_pages, kv dtype code)."""
    k_pages, v_pages = V.as_array(k_pages, "k_pages"), V.as_array(v_pages, "v_pages")
    V.check_ndim(k_pages, "k_pages", 4, "(num_pages, page_size, num_kv_heads, head_dim)")
    V.check_ndim(v_pages, "v_pages", 4, "(num_pages, page_size, num_kv_heads, head_dim)")
    if v_pages.dtype != k_pages.dtype:
        raise DTypeError(f"v_pages: expected the dtype of k_pages ({k_pages.dtype}), "
                         f"got {v_pages.dtype}")
    if v_pages.shape[:3] != k_pages.shape[:3]:
        raise ShapeError(f"v_pages: expected (num_pages, page_size, num_kv_heads) "
                         f"{k_pages.shape[:3]} (as k_pages), got {v_pages.shape[:3]}")
    if k_pages.shape[1] < 1:
        raise ShapeError(f"k_pages: page_size must be >= 1, got {k_pages.shape[1]}")
    return k_pages, v_pages, V.dtype_code(k_pages, "k_pages")


def check_block_table(block_table, seq_lens, num_pages, page_size):
    """Validated (block_table int32/int64 (B, W), seq_lens int64 (B,)).

    Raises ShapeError for malformed arrays or lengths beyond the table, and
    PageError for a used entry outside [0, num_pages). Entries past a
    sequence's pages are never read, so they may hold anything (e.g. -1)."""
    bt = block_table if isinstance(block_table, np.ndarray) else np.asarray(block_table)
    if bt.dtype != np.int32 and bt.dtype != np.int64:
        if bt.dtype.kind not in "iu":
            raise DTypeError(f"block_table: expected an integer dtype (int32), got {bt.dtype}")
        bt = bt.astype(np.int64)
    if bt.ndim != 2:
        raise ShapeError(f"block_table: expected shape (batch, max_pages_per_seq), got {bt.shape}")
    lens = V.check_index_array(seq_lens, "seq_lens", 1, bt.shape[0])
    if lens.size:
        if lens.min() < 0:
            b = int(np.argmin(lens))
            raise ShapeError(f"seq_lens: expected lengths >= 0, got {lens[b]} for sequence {b}")
        width = bt.shape[1]
        if int(lens.max()) > width * page_size:
            b = int(np.argmax(lens))
            raise ShapeError(f"seq_lens: sequence {b} has length {lens[b]}, which needs "
                             f"{(lens[b] + page_size - 1) // page_size} pages, but block_table "
                             f"has {width} columns")
    bad = _forward.check_chains(bt, lens, num_pages, page_size)
    if bad is not None:
        raise PageError(f"block_table[{bad[0]}, {bad[1]}]: expected a page id in "
                        f"[0, {num_pages}), got {bt[bad]}")
    if bt.dtype != np.int32 or not bt.flags.c_contiguous:
        # unused entries may not fit int32: zero them, they are never read
        used = np.arange(bt.shape[1])[None, :] < ((lens + page_size - 1) // page_size)[:, None]
        bt = np.where(used, bt, 0).astype(np.int32)
    return bt, lens


def check_queries(q, cu_seqlens_q, lens):
    """cu_seqlens_q (int64) of a validated 3-D q over sequences of lengths lens.

    Without cu_seqlens_q, one query per sequence (decode); with it, each
    sequence's queries are its last positions, so there may be at most
    seq_lens[b] of them."""
    batch = lens.shape[0]
    if cu_seqlens_q is None:
        if q.shape[0] != batch:
            raise ShapeError(f"q: expected one query per sequence, shape ({batch}, {q.shape[1]}, "
                             f"{q.shape[2]}), got {q.shape}")
        return np.arange(batch + 1, dtype=np.int64)
    cuq = V.check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0])
    if cuq.shape[0] != batch + 1:
        raise ShapeError(f"cu_seqlens_q: expected shape ({batch + 1},) for {batch} "
                         f"sequences, got {cuq.shape}")
    nq = np.diff(cuq)
    if np.any(nq > lens):
        b = int(np.argmax(nq > lens))
        raise ShapeError(f"cu_seqlens_q: sequence {b} has {nq[b]} queries but seq_lens[{b}] "
                         f"is {lens[b]} (its queries are its last positions)")
    return cuq


def paged_attention(q, k_pages, v_pages, block_table, seq_lens, *, cu_seqlens_q=None,
                    causal=True, scale=None, window=(-1, -1), softcap=0.0, return_lse=False,
                    out=None):
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
    q = V.as_array(q, "q")
    V.check_ndim(q, "q", 3, "(tokens, num_heads, head_dim)")
    k_pages, v_pages, kv_code = check_pages(k_pages, v_pages)
    q_code = V.dtype_code(q, "q")
    if not _forward.kernel_available(q_code, kv_code):
        raise DTypeError(f"k_pages: no kernel for q {q.dtype} over {k_pages.dtype} pages "
                         "(float64 q needs float64 pages and vice versa)")
    h, hkv, d, dv = _check_kv(q, k_pages, v_pages, 1, "k_pages", "v_pages")
    num_pages, page_size = k_pages.shape[:2]
    bt, lens = check_block_table(block_table, seq_lens, num_pages, page_size)
    batch = lens.shape[0]
    cuq = check_queries(q, cu_seqlens_q, lens)
    nq = np.diff(cuq)
    opts = V.check_options(scale, window, softcap, causal, d)
    total = q.shape[0]
    out, lse = V.prepare_outputs(out, (total, h, dv), q,
                                 [("q", q, True), ("k_pages", k_pages, False),
                                  ("v_pages", v_pages, False)], return_lse, (h, total))
    if total:
        q_start = cuq[:-1].copy()
        seqs = V.Sequences(q_start, q_start, nq, lens)   # k_start: unused for pages
        _forward.forward(q, k_pages, v_pages, out, lse, layout="paged", seqs=seqs, opts=opts,
                         block_table=bt)
    return (out, lse) if return_lse else out


def gather_pages(pages, block_table, seq_lens):
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
    num_pages, page_size = pages.shape[:2]
    if page_size < 1:
        raise ShapeError(f"pages: page_size must be >= 1, got {page_size}")
    bt, lens = check_block_table(block_table, seq_lens, num_pages, page_size)
    batch = lens.shape[0]
    max_len = int(lens.max()) if batch else 0
    out = np.zeros((batch, max_len) + pages.shape[2:], dtype=pages.dtype)
    for b in range(batch):
        n = int(lens[b])
        if n:
            chain = bt[b, : (n + page_size - 1) // page_size]
            out[b, :n] = pages[chain].reshape((-1,) + pages.shape[2:])[:n]
    return out
