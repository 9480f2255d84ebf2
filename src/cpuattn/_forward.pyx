"""Parallel driver of the forward engine (csrc/forward.c).

Takes arrays the facade has already validated: nothing here checks shapes or
indices. Work items run on the worker pool (csrc/workers.h) with the GIL
released, claimed one at a time; each thread has its own scratch; split-KV partials are merged in a second loop in
a fixed order, so results do not depend on the thread count.
"""
from libc.stdint cimport int32_t, int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset
cimport numpy as cnp
import numpy as np

from ._engine cimport (
    cpa_fwd_args, cpa_fwd_item, cpa_fwd_merge, cpa_fwd_item_fn, cpa_fwd_plan, cpa_fwd_uses_tiled,
    cpa_fwd_scratch_bytes, cpa_fwd_share, cpa_fwd_slot_bytes, cpa_fwd_kernel, cpa_fwd_merge_one,
    CPA_F32, CPA_F64, CPA_F16, CPA_BF16, CPA_I8, CPA_I4, CPA_E4M3, CPA_E5M2, CPA_DTYPE_COUNT,
    cpa_dtype_name, cpa_dtype_bits,
    cpa_rows, rows_of, set_call)
from ._threads cimport current_isa, parallel_for, team_size, thread_scratch

cnp.import_array()


# The storage dtypes of the engine, from its one table (csrc/engine.h):
# (name, kernel code, bits per element).
DTYPES = tuple((cpa_dtype_name(c).decode(), c, cpa_dtype_bits(c)) for c in range(CPA_DTYPE_COUNT))


def kernel_available(int q_dtype, int k_dtype, int v_dtype):
    """Whether the engine has a kernel for these (query, K, V) dtype codes."""
    cdef cpa_fwd_args a
    memset(&a, 0, sizeof(a))
    a.q_dtype = q_dtype
    a.k_dtype = k_dtype
    a.v_dtype = v_dtype
    return cpa_fwd_kernel(&a, current_isa()) != NULL


# The (sequence, token, head) axes of (q and out, k and v, lse) per call
# form; -1: the array has no such axis. Paged K/V: the page is the sequence axis.
LAYOUTS = {
    "dense": ((0, 1, 2), (0, 1, 2), (0, 2, 1)),    # (B, S, H, D); lse (B, H, S)
    "packed": ((-1, 0, 1), (-1, 0, 1), (-1, 1, 0)),  # (T, H, D); lse (H, T)
    "paged": ((-1, 0, 1), (0, 1, 2), (-1, 1, 0)),   # q packed, pages (P, page_size, Hkv, D)
}


def forward(call, cnp.ndarray out, lse):
    """Run a checked call (``_validate.Call``) into out (and lse, or None),
    allocated by ``_validate.outputs``; see forward.h for the layout."""
    cdef cnp.ndarray q = call.q, k = call.k, v = call.v
    cdef cpa_fwd_args a
    memset(&a, 0, sizeof(a))
    set_call(&a, call, LAYOUTS[call.layout], out, lse)
    a.q_dtype = float_code(q)
    a.k_dtype = page_code(k)
    a.v_dtype = page_code(v)
    a.k_scale = scale_rows(call.k_scale)
    a.v_scale = scale_rows(call.v_scale)
    a.sinks = doubles(call.sinks)
    a.alibi = doubles(call.alibi)
    cdef cnp.ndarray bt
    if call.block_table is not None:
        bt = call.block_table
        a.block_table = <const int32_t *>cnp.PyArray_DATA(bt)
        a.bt_stride = bt.shape[1]
        a.page_size = k.shape[1]
    run(&a)


cdef const double *doubles(object x):
    """Data of a contiguous float64 array, or NULL for None."""
    return NULL if x is None else <const double *>cnp.PyArray_DATA(<cnp.ndarray>x)


cdef cpa_rows scale_rows(object scale):
    """The cpa_rows of page scales (page, slot, head[, group]); a 1-element
    1-D array is one per-tensor scale (all strides 0); None: no scales."""
    cdef cpa_rows r
    if scale is not None and (<cnp.ndarray>scale).ndim == 1:
        r.data = cnp.PyArray_DATA(<cnp.ndarray>scale)
        r.seq = r.tok = r.head = 0
        return r
    return rows_of(scale, (0, 1, 2))


cdef int float_code(cnp.ndarray x):
    """Kernel dtype code of a float array, or -1."""
    cdef int t = cnp.PyArray_TYPE(x)
    if t == cnp.NPY_FLOAT32:
        return CPA_F32
    if t == cnp.NPY_FLOAT64:
        return CPA_F64
    if t == cnp.NPY_FLOAT16:
        return CPA_F16
    if t >= 256 and x.dtype.name == "bfloat16":   # a user dtype (ml_dtypes)
        return CPA_BF16
    return -1


cdef int page_code(cnp.ndarray x):
    """Kernel code of page storage, or -1: float, int8, int4 (uint8), fp8."""
    cdef int c = float_code(x)
    if c >= 0:
        return c
    cdef int t = cnp.PyArray_TYPE(x)
    if t == cnp.NPY_INT8:
        return CPA_I8
    if t == cnp.NPY_UINT8:
        return CPA_I4
    if t >= 256:   # ml_dtypes' fp8 types
        name = x.dtype.name
        if name == "float8_e4m3fn":
            return CPA_E4M3
        if name == "float8_e5m2":
            return CPA_E5M2
    return -1


ctypedef struct fwd_job:
    const cpa_fwd_args *a
    cpa_fwd_item_fn kernel
    const cpa_fwd_item *items
    const cpa_fwd_merge *merges
    char *scratch           # per_thread bytes for each thread id
    size_t per_thread
    char *partials


cdef void _run_item(void *ctx, int64_t i, int tid) noexcept nogil:
    cdef fwd_job *j = <fwd_job *>ctx
    j.kernel(j.a, &j.items[i], j.scratch + tid * j.per_thread, j.partials)


cdef void _run_merge(void *ctx, int64_t i, int tid) noexcept nogil:
    cdef fwd_job *j = <fwd_job *>ctx
    cpa_fwd_merge_one(j.a, &j.merges[i], j.partials, j.scratch + tid * j.per_thread)


cdef int plan_work(const cpa_fwd_args *a, fwd_work *w) except -1:
    """Fill w with the work list of call a (free_work releases it). It
    depends on the sequences' lengths, the head counts and the mask only."""
    cdef int64_t i
    free_work(w)
    w.n_items = cpa_fwd_plan(a, NULL, NULL, &w.n_merges, &w.n_slots)
    w.items = <cpa_fwd_item *>malloc((w.n_items + 1) * sizeof(cpa_fwd_item))
    w.merges = <cpa_fwd_merge *>malloc((w.n_merges + 1) * sizeof(cpa_fwd_merge))
    if w.items == NULL or w.merges == NULL:
        free_work(w)
        raise MemoryError("cpuattn: cannot allocate the work list")
    cpa_fwd_plan(a, w.items, w.merges, &w.n_merges, &w.n_slots)
    # sequences reading the same pages (fork, a shared prefix): one item each
    if cpa_fwd_share(a, w.items, w.n_items, &w.dec_rows) < 0:
        free_work(w)
        raise MemoryError("cpuattn: cannot allocate the work list")
    for i in range(w.n_merges):
        if w.merges[i].nsplit > w.max_split:
            w.max_split = w.merges[i].nsplit
    for i in range(w.n_items):
        w.work += (w.items[i].key_hi - w.items[i].key_lo + 1) * a.head_dim_qk * w.items[i].nkvh
    w.work *= a.num_heads // a.num_kv_heads
    w.tiled = cpa_fwd_uses_tiled(a)
    return 0


cdef void free_work(fwd_work *w) noexcept:
    free(w.items)
    free(w.merges)
    memset(w, 0, sizeof(fwd_work))


cdef int run_work(const cpa_fwd_args *a, const fwd_work *w) except -1:
    """Run call a over its planned work list w on the worker pool."""
    cdef cpa_fwd_item_fn kernel = cpa_fwd_kernel(a, current_isa())
    if kernel == NULL:
        raise RuntimeError("cpuattn internal error: no kernel for this dtype pair")
    if w.n_items == 0:
        return 0
    cdef int nt = team_size(w.n_items, w.work)
    cdef size_t per_thread = cpa_fwd_scratch_bytes(a, w.tiled, w.dec_rows)
    if per_thread < <size_t>((w.max_split + a.head_dim_v) * 8 + 64):
        per_thread = <size_t>((w.max_split + a.head_dim_v) * 8 + 64)
    per_thread = (per_thread + 63) // 64 * 64
    cdef char *scratch_raw = NULL
    cdef fwd_job job
    job.partials = NULL
    try:
        job.scratch = thread_scratch(&scratch_raw, per_thread, nt)
        if w.n_slots > 0:
            job.partials = <char *>malloc(w.n_slots * cpa_fwd_slot_bytes(a))
            if job.partials == NULL:
                raise MemoryError("cpuattn: cannot allocate split-KV partials")
        job.a, job.kernel, job.items, job.merges = a, kernel, w.items, w.merges
        job.per_thread = per_thread
        with nogil:
            parallel_for(nt, w.n_items, _run_item, &job)
            parallel_for(nt, w.n_merges, _run_merge, &job)
    finally:
        free(job.partials)
        free(scratch_raw)
    return 0


cdef int run(const cpa_fwd_args *a) except -1:
    cdef fwd_work w
    memset(&w, 0, sizeof(w))
    try:
        plan_work(a, &w)
        run_work(a, &w)
    finally:
        free_work(&w)
    return 0


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
