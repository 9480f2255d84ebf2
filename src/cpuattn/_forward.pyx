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
    cpa_fwd_scratch_bytes, cpa_fwd_slot_bytes, cpa_fwd_kernel, cpa_fwd_merge_one,
    CPA_F32, CPA_F64, CPA_F16, CPA_BF16, CPA_I8, CPA_I4, CPA_E4M3, CPA_E5M2, CPA_DTYPE_COUNT,
    cpa_dtype_name, cpa_dtype_bits,
    cpa_rows, rows_of, set_call, thread_scratch)
from ._threads cimport current_isa, parallel_for, team_size

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
    a.q_dtype = _float_code(q)
    a.k_dtype = _page_code(k)
    a.v_dtype = _page_code(v)
    a.k_scale = _scale_rows(call.k_scale)
    a.v_scale = _scale_rows(call.v_scale)
    cdef cnp.ndarray bt
    if call.block_table is not None:
        bt = call.block_table
        a.block_table = <const int32_t *>cnp.PyArray_DATA(bt)
        a.bt_stride = bt.shape[1]
        a.page_size = k.shape[1]
    run(&a)


cdef cpa_rows _scale_rows(object scale):
    """The cpa_rows of page scales (page, slot, head[, group]); a 1-element
    1-D array is one per-tensor scale (all strides 0); None: no scales."""
    cdef cpa_rows r
    if scale is not None and (<cnp.ndarray>scale).ndim == 1:
        r.data = cnp.PyArray_DATA(<cnp.ndarray>scale)
        r.seq = r.tok = r.head = 0
        return r
    return rows_of(scale, (0, 1, 2))


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
    cdef int nt, max_split = 0
    cdef size_t per_thread
    cdef fwd_job job
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
        nt = team_size(n_items, work)
        per_thread = cpa_fwd_scratch_bytes(a, cpa_fwd_uses_tiled(a))
        if per_thread < <size_t>((max_split + a.head_dim_v) * 8 + 64):
            per_thread = <size_t>((max_split + a.head_dim_v) * 8 + 64)
        per_thread = (per_thread + 63) // 64 * 64
        job.scratch = thread_scratch(&scratch_raw, per_thread, nt)
        if n_slots > 0:
            partials = <char *>malloc(n_slots * cpa_fwd_slot_bytes(a))
            if partials == NULL:
                raise MemoryError("cpuattn: cannot allocate split-KV partials")
        job.a, job.kernel, job.items, job.merges = a, kernel, items, merges
        job.per_thread, job.partials = per_thread, partials
        with nogil:
            parallel_for(nt, n_items, _run_item, &job)
            parallel_for(nt, n_merges, _run_merge, &job)
    finally:
        free(items)
        free(merges)
        free(partials)
        free(scratch_raw)


# ---- checked fast path for plain decode calls ----
# A serving loop calls paged decode once per layer per token: the general
# Python checks cost more than a small kernel. This entry point accepts only
# the plain case (numpy arrays, contiguous int32 index arrays, last axes
# contiguous, builtin option types) and checks it completely in C; anything
# else returns None and the caller takes the general path, which gives the
# same result or the documented error.

from libc.math cimport isfinite, sqrt

cdef int64_t INDEX_MAX = 2**31 - 1   # positions fit int32 (as in _validate)


cdef int _float_code(cnp.ndarray x):
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


cdef bint _rows_ok(cnp.ndarray x, int ndim):
    """ndim, non-empty, element-aligned strides, contiguous last axis."""
    if cnp.PyArray_NDIM(x) != ndim or cnp.PyArray_SIZE(x) == 0:
        return False
    cdef cnp.npy_intp isz = cnp.PyArray_ITEMSIZE(x)
    cdef int i
    for i in range(ndim):
        if cnp.PyArray_STRIDES(x)[i] % isz:
            return False
    return cnp.PyArray_DIMS(x)[ndim - 1] == 1 or cnp.PyArray_STRIDES(x)[ndim - 1] == isz


cdef bint _int32_c(object x, int ndim):
    return (type(x) is np.ndarray and cnp.PyArray_NDIM(<cnp.ndarray>x) == ndim
            and cnp.PyArray_TYPE(<cnp.ndarray>x) == cnp.NPY_INT32
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>x))


cdef bint _real(object x):
    return (type(x) is float or type(x) is int) and isfinite(<double>x)


cdef int _page_code(cnp.ndarray x):
    """Kernel code of page storage, or -1: float, int8, int4 (uint8), fp8."""
    cdef int c = _float_code(x)
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


_NOT_PLAIN = object()


cdef object _plain_scale(object s, int code, cnp.npy_intp *pd, int64_t d):
    """The scale array the kernel reads for pages of `code` (dims pd, head
    dim d): None for float pages, a 1-element array for a per-tensor fp8
    scale; _NOT_PLAIN for anything else (the general checks decide)."""
    if cpa_dtype_bits(code) >= 16:
        return None if s is None else _NOT_PLAIN
    if (code == CPA_E4M3 or code == CPA_E5M2) and (
            s is None or (type(s) is float and isfinite(<double>s) and s >= 0)):
        return np.full(1, 1.0 if s is None else s, np.float32)
    if type(s) is not np.ndarray:
        return _NOT_PLAIN
    cdef cnp.ndarray a = s
    cdef int want = cnp.NPY_FLOAT16 if code == CPA_I4 else cnp.NPY_FLOAT32
    cdef int nd = 4 if code == CPA_I4 else 3
    if (cnp.PyArray_TYPE(a) != want or cnp.PyArray_NDIM(a) != nd
            or not cnp.PyArray_IS_C_CONTIGUOUS(a)):
        return _NOT_PLAIN
    cdef cnp.npy_intp *sd = cnp.PyArray_DIMS(a)
    if sd[0] != pd[0] or sd[1] != pd[1] or sd[2] != pd[2]:
        return _NOT_PLAIN
    if nd == 4 and sd[3] != (d + 31) // 32:
        return _NOT_PLAIN
    return a


def paged_decode(q, k_pages, v_pages, block_table, seq_lens, scale, causal, window, softcap,
                 return_lse, k_scale=None, v_scale=None):
    """paged_attention without cu_seqlens_q and out, for plain inputs: the
    result, or None when any input is not of the plain kind (or invalid).
    Float or low-bit pages (K and V types apart); the scales of low-bit
    pages C-contiguous of their exact shape and dtype (fp8: also a float)."""
    if not (type(q) is np.ndarray and type(k_pages) is np.ndarray
            and type(v_pages) is np.ndarray and _int32_c(block_table, 2)
            and _int32_c(seq_lens, 1) and type(causal) is bool and type(return_lse) is bool
            and (scale is None or _real(scale)) and _real(softcap) and softcap >= 0
            and type(window) is tuple and len(window) == 2
            and type(window[0]) is int and type(window[1]) is int
            and -1 <= window[0] <= INDEX_MAX and -1 <= window[1] <= INDEX_MAX):
        return None
    cdef cnp.ndarray qa = q, ka = k_pages, va = v_pages
    cdef cnp.ndarray bt = block_table, sl = seq_lens
    if not (_rows_ok(qa, 3) and _rows_ok(ka, 4) and _rows_ok(va, 4)):
        return None
    cdef int qc = _float_code(qa), kc = _page_code(ka), vc = _page_code(va)
    if (qc < 0 or kc < 0 or vc < 0 or (qc == CPA_F64) != (kc == CPA_F64)
            or (qc == CPA_F64) != (vc == CPA_F64)):
        return None
    cdef cnp.npy_intp *qd = cnp.PyArray_DIMS(qa)
    cdef cnp.npy_intp *kd = cnp.PyArray_DIMS(ka)
    cdef cnp.npy_intp *vd = cnp.PyArray_DIMS(va)
    cdef int64_t batch = qd[0], h = qd[1], d = qd[2], hkv = kd[2]
    cdef int64_t dk = kd[3] * (2 if kc == CPA_I4 else 1), dv = vd[3] * (2 if vc == CPA_I4 else 1)
    cdef int64_t num_pages = kd[0], page_size = kd[1], width = cnp.PyArray_DIMS(bt)[1]
    if (vd[0] != num_pages or vd[1] != page_size or vd[2] != hkv or dk != d
            or h % hkv or cnp.PyArray_DIMS(bt)[0] != batch or cnp.PyArray_DIMS(sl)[0] != batch
            or width < 1):
        return None
    ks = _plain_scale(k_scale, kc, kd, dk)
    vs = _plain_scale(v_scale, vc, vd, dv)
    if ks is _NOT_PLAIN or vs is _NOT_PLAIN:
        return None
    cdef const int32_t *lens = <const int32_t *>cnp.PyArray_DATA(sl)
    cdef const int32_t *table = <const int32_t *>cnp.PyArray_DATA(bt)
    cdef int64_t b, j, n
    for b in range(batch):
        n = lens[b]
        if n < 0 or n > width * page_size:
            return None
        for j in range((n + page_size - 1) // page_size):
            if table[b * width + j] < 0 or table[b * width + j] >= num_pages:
                return None

    out = np.empty((batch, h, dv), dtype=q.dtype)
    lse = np.empty((h, batch), dtype=np.float64 if qc == CPA_F64 else np.float32) if return_lse else None
    cdef cnp.ndarray oa = out
    cdef int64_t *idx = <int64_t *>malloc(3 * batch * sizeof(int64_t))
    if idx == NULL:
        raise MemoryError("cpuattn: cannot allocate the sequence table")
    cdef cpa_fwd_args a
    memset(&a, 0, sizeof(a))
    q_axes, kv_axes, lse_axes = LAYOUTS["paged"]
    a.q = rows_of(qa, q_axes)
    a.out = rows_of(oa, q_axes)
    a.k = rows_of(ka, kv_axes)
    a.v = rows_of(va, kv_axes)
    a.lse = rows_of(lse, lse_axes)
    a.num_heads = <int32_t>h
    a.num_kv_heads = <int32_t>hkv
    a.head_dim_qk = <int32_t>d
    a.head_dim_v = <int32_t>dv
    a.q_dtype = qc
    a.k_dtype = kc
    a.v_dtype = vc
    a.k_scale = _scale_rows(ks)
    a.v_scale = _scale_rows(vs)
    a.scale = 1.0 / sqrt(<double>d) if scale is None else <double>scale
    a.softcap = <double>softcap
    a.mask.causal = causal
    a.mask.window_left = window[0]
    a.mask.window_right = window[1]
    a.num_seqs = batch
    for b in range(batch):
        idx[b] = b                               # q_start: one query per sequence
        idx[batch + b] = 1                       # q_len
        idx[2 * batch + b] = lens[b]             # k_len
    a.q_start, a.q_len, a.k_len = idx, idx + batch, idx + 2 * batch
    a.k_start = a.q_start                        # unread: paged
    a.block_table = table
    a.bt_stride = width
    a.page_size = page_size
    try:
        run(&a)
    finally:
        free(idx)
    return (out, lse) if return_lse else out


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
