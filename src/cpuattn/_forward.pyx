"""Parallel driver of the forward engine (csrc/forward.c).

Takes arrays the facade has already validated: nothing here checks shapes or
indices. Work items run in a dynamic OpenMP loop with the GIL released; each
thread has its own scratch; split-KV partials are merged in a second loop in
a fixed order, so results do not depend on the thread count.
"""
from libc.stdint cimport int32_t, int64_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset
from cython.parallel cimport prange, threadid
cimport numpy as cnp
import numpy as np

from ._threads cimport current_isa, effective_threads

cnp.import_array()

cdef extern from "forward.h" nogil:
    ctypedef struct cpa_fwd_args:
        const void *q
        const void *k
        const void *v
        void *out
        void *lse
        int64_t q_tok, q_head, o_tok, o_head
        int64_t k_tok, k_head, k_page, v_tok, v_head, v_page
        int64_t lse_head, lse_tok
        int32_t num_heads, num_kv_heads, head_dim_qk, head_dim_v
        int32_t q_dtype, kv_dtype
        double scale, softcap
        int32_t causal
        int64_t window_left, window_right
        int64_t num_seqs
        const int64_t *q_off
        const int64_t *o_off
        const int64_t *lse_off
        const int64_t *k_off
        const int64_t *v_off
        const int64_t *q_len
        const int64_t *k_len
        const int32_t *block_table
        int64_t bt_stride, page_size
    ctypedef struct cpa_fwd_item:
        int64_t seq, slot
        int32_t kvh, nkvh, qblock
        int64_t key_lo, key_hi
    ctypedef struct cpa_fwd_merge:
        int64_t seq, slot0
        int32_t kvh, nkvh, nsplit
    ctypedef void (*cpa_fwd_item_fn)(const cpa_fwd_args *, const cpa_fwd_item *, char *, char *) noexcept nogil
    int64_t cpa_fwd_plan(const cpa_fwd_args *a, cpa_fwd_item *items, cpa_fwd_merge *merges,
                         int64_t *n_merges, int64_t *n_slots)
    int cpa_fwd_uses_tiled(const cpa_fwd_args *a)
    size_t cpa_fwd_scratch_bytes(const cpa_fwd_args *a, int any_tiled)
    size_t cpa_fwd_slot_bytes(const cpa_fwd_args *a)
    cpa_fwd_item_fn cpa_fwd_kernel(const cpa_fwd_args *a, int isa)
    void cpa_fwd_merge_one(const cpa_fwd_args *a, const cpa_fwd_merge *m, const char *partials,
                           char *scratch)

# Below this many (query row x key x head_dim) multiply-adds a call stays on
# the calling thread: waking an OpenMP team costs microseconds.
cdef int64_t SERIAL_WORK = 1 << 17


cdef inline const int64_t *i64(cnp.ndarray a):
    return <const int64_t *>cnp.PyArray_DATA(a)


def kernel_available(int q_dtype, int kv_dtype):
    """Whether the engine has a kernel for this (query, kv) dtype pair."""
    cdef cpa_fwd_args a
    memset(&a, 0, sizeof(a))
    a.q_dtype = q_dtype
    a.kv_dtype = kv_dtype
    return cpa_fwd_kernel(&a, current_isa()) != NULL


def forward(cnp.ndarray q, cnp.ndarray k, cnp.ndarray v, cnp.ndarray out, lse,
            int q_dtype, int kv_dtype, tuple strides, tuple dims,
            double scale, double softcap, bint causal, int64_t window_left, int64_t window_right,
            cnp.ndarray q_off, cnp.ndarray o_off, cnp.ndarray lse_off,
            cnp.ndarray k_off, cnp.ndarray v_off, cnp.ndarray q_len, cnp.ndarray k_len,
            block_table, int64_t page_size):
    """Run attention over validated arrays (see forward.h for the layout).

    strides: (q_tok, q_head, o_tok, o_head, k_tok, k_head, k_page,
              v_tok, v_head, v_page, lse_head, lse_tok) in elements.
    dims: (num_heads, num_kv_heads, head_dim_qk, head_dim_v).
    Index arrays are contiguous int64 (block_table: int32 2-D or None).
    """
    cdef cpa_fwd_args a
    memset(&a, 0, sizeof(a))
    a.q = cnp.PyArray_DATA(q)
    a.k = cnp.PyArray_DATA(k)
    a.v = cnp.PyArray_DATA(v)
    a.out = cnp.PyArray_DATA(out)
    a.lse = cnp.PyArray_DATA(<cnp.ndarray>lse) if lse is not None else NULL
    (a.q_tok, a.q_head, a.o_tok, a.o_head, a.k_tok, a.k_head, a.k_page,
     a.v_tok, a.v_head, a.v_page, a.lse_head, a.lse_tok) = strides
    a.num_heads, a.num_kv_heads, a.head_dim_qk, a.head_dim_v = dims
    a.q_dtype = q_dtype
    a.kv_dtype = kv_dtype
    a.scale = scale
    a.softcap = softcap
    a.causal = causal
    a.window_left = window_left
    a.window_right = window_right
    a.num_seqs = q_len.shape[0]
    a.q_off = i64(q_off)
    a.o_off = i64(o_off)
    a.lse_off = i64(lse_off)
    a.k_off = i64(k_off)
    a.v_off = i64(v_off)
    a.q_len = i64(q_len)
    a.k_len = i64(k_len)
    if block_table is not None:
        a.block_table = <const int32_t *>cnp.PyArray_DATA(<cnp.ndarray>block_table)
        a.bt_stride = (<cnp.ndarray>block_table).shape[1]
        a.page_size = page_size
    run(&a)


cdef void run(cpa_fwd_args *a) except *:
    cdef cpa_fwd_item_fn kernel = cpa_fwd_kernel(a, current_isa())
    if kernel == NULL:
        raise RuntimeError("cpuattn internal error: no kernel for this dtype pair")
    cdef int64_t n_merges = 0, n_slots = 0, i, work = 0
    cdef int64_t n_items = cpa_fwd_plan(a, NULL, NULL, &n_merges, &n_slots)
    if n_items == 0:
        return
    cdef cpa_fwd_item *items = <cpa_fwd_item *>malloc(n_items * sizeof(cpa_fwd_item))
    cdef cpa_fwd_merge *merges = <cpa_fwd_merge *>malloc((n_merges + 1) * sizeof(cpa_fwd_merge))
    cdef char *partials = NULL
    cdef char *scratch_raw = NULL
    cdef char *scratch
    cdef int nt = effective_threads(), max_split = 0, tid
    cdef size_t per_thread
    try:
        if items == NULL or merges == NULL:
            raise MemoryError("cpuattn: cannot allocate the work list")
        cpa_fwd_plan(a, items, merges, &n_merges, &n_slots)
        for i in range(n_merges):
            if merges[i].nsplit > max_split:
                max_split = merges[i].nsplit
        for i in range(n_items):
            work += (items[i].key_hi - items[i].key_lo + 1) * a.head_dim_qk * items[i].nkvh
        work *= a.num_heads // a.num_kv_heads
        if nt > n_items:
            nt = <int>n_items
        if work < SERIAL_WORK:
            nt = 1
        per_thread = cpa_fwd_scratch_bytes(a, cpa_fwd_uses_tiled(a))
        if per_thread < <size_t>((max_split + a.head_dim_v) * 8 + 64):
            per_thread = <size_t>((max_split + a.head_dim_v) * 8 + 64)
        per_thread = (per_thread + 63) // 64 * 64
        scratch_raw = <char *>malloc(per_thread * nt + 64)
        if scratch_raw == NULL:
            raise MemoryError("cpuattn: cannot allocate kernel scratch")
        scratch = <char *>((<uintptr_t>scratch_raw + 63) & ~(<uintptr_t>63))
        if n_slots > 0:
            partials = <char *>malloc(n_slots * cpa_fwd_slot_bytes(a))
            if partials == NULL:
                raise MemoryError("cpuattn: cannot allocate split-KV partials")
        with nogil:
            for i in prange(n_items, schedule="dynamic", num_threads=nt, use_threads_if=nt > 1):
                tid = threadid()
                kernel(a, &items[i], scratch + tid * per_thread, partials)
            if n_merges > 0:
                for i in prange(n_merges, schedule="dynamic", num_threads=nt,
                                use_threads_if=nt > 1 and n_merges > 1):
                    tid = threadid()
                    cpa_fwd_merge_one(a, &merges[i], partials, scratch + tid * per_thread)
    finally:
        free(items)
        free(merges)
        free(partials)
        free(scratch_raw)


ctypedef fused index_t:
    int32_t
    int64_t


cdef int64_t _first_bad_entry(const index_t[:, :] table, const int64_t[::1] lens,
                              int64_t num_pages, int64_t page_size, int64_t *bad_col) noexcept nogil:
    """Row of the first used block-table entry outside [0, num_pages), or -1."""
    cdef int64_t b, j, used
    for b in range(table.shape[0]):
        used = (lens[b] + page_size - 1) // page_size
        for j in range(used):
            if table[b, j] < 0 or table[b, j] >= num_pages:
                bad_col[0] = j
                return b
    return -1


def check_chains(table, lens, int64_t num_pages, int64_t page_size):
    """Checked block table: (row, col) of the first used entry outside
    [0, num_pages) or None. `table` is an int32/int64 2-D array, `lens` int64
    contiguous with values already checked to be >= 0 and to fit the table."""
    cdef int64_t col = 0, row
    if table.dtype == np.int32:
        row = _first_bad_entry[int32_t](table, lens, num_pages, page_size, &col)
    else:
        row = _first_bad_entry[int64_t](table, lens, num_pages, page_size, &col)
    return None if row < 0 else (row, col)
