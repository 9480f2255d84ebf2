# The engine's C interface (csrc/engine.h, forward.h, backward.h,
# platform.h, workers.h), declared once for every Cython module that drives it.
from libc.stdint cimport int32_t, int64_t, uintptr_t
from libc.stdlib cimport malloc
cimport numpy as cnp

cdef extern from "engine.h" nogil:
    enum cpa_dtype:
        CPA_F32
        CPA_F64
        CPA_F16
        CPA_BF16
        CPA_I8
        CPA_I4
        CPA_E4M3
        CPA_E5M2
        CPA_DTYPE_COUNT
    const char *cpa_dtype_name(int code)
    int cpa_dtype_bits(int code)
    ctypedef struct cpa_mask:
        int32_t causal
        int64_t window_left, window_right
    ctypedef struct cpa_rows:
        void *data
        int64_t seq, tok, head

cdef extern from "quant.h" nogil:
    int CPA_INT4_GROUP
    int64_t cpa_quant_row_bytes(int dtype, int64_t d)
    int64_t cpa_quant_scales_per_row(int dtype, int64_t d)
    void cpa_quantize_rows(int dtype, const float *x, int64_t xstride, int64_t n, int64_t d,
                           unsigned char *codes, int64_t code_stride, void *scales,
                           int64_t scale_stride)
    void cpa_fp8_encode(int dtype, const float *x, int64_t n, float scale, unsigned char *codes)
    void cpa_dequantize_rows(int dtype, const unsigned char *codes, int64_t code_stride,
                             const void *scales, int64_t scale_stride, int64_t n, int64_t d,
                             float *out, int64_t ostride)

cdef extern from "platform.h" nogil:
    int CPA_ISA_COUNT
    int cpa_isa_supported(int isa)
    int cpa_isa_best()
    const char *cpa_isa_name(int isa)
    int cpa_openmp_enabled()
    int cpa_omp_max_threads()

cdef extern from "workers.h" nogil:
    int CPA_SPIN_US
    int CPA_YIELD_US
    ctypedef void (*cpa_item_fn)(void *ctx, int64_t item, int tid) noexcept nogil
    void cpa_parallel_for(int nthreads, int64_t n_items, cpa_item_fn fn, void *ctx)
    int cpa_workers_count()
    char *cpa_thread_scratch(size_t bytes, void **owned)

cdef extern from "forward.h" nogil:
    ctypedef struct cpa_fwd_args:
        cpa_rows q, k, v, out, lse
        cpa_rows k_scale, v_scale
        int32_t num_heads, num_kv_heads, head_dim_qk, head_dim_v
        int32_t q_dtype, k_dtype, v_dtype
        double scale, softcap
        cpa_mask mask
        const double *sinks
        const double *alibi
        int64_t num_seqs
        const int64_t *q_start, *k_start, *q_len, *k_len
        const int32_t *block_table
        int64_t bt_stride, page_size
        const unsigned char *tree
        const int64_t *tree_start
    ctypedef struct cpa_fwd_item:
        int64_t seq, slot
        int32_t kvh, nkvh, qblock, nshare
        int64_t key_lo, key_hi
    ctypedef struct cpa_fwd_merge:
        int64_t seq, slot0
        int32_t kvh, nkvh, nsplit
    ctypedef void (*cpa_fwd_item_fn)(const cpa_fwd_args *, const cpa_fwd_item *, char *, char *) noexcept nogil
    int64_t cpa_fwd_plan(const cpa_fwd_args *a, cpa_fwd_item *items, cpa_fwd_merge *merges,
                         int64_t *n_merges, int64_t *n_slots)
    int cpa_fwd_uses_tiled(const cpa_fwd_args *a)
    int cpa_fwd_share(const cpa_fwd_args *a, cpa_fwd_item *items, int64_t n, int64_t *max_rows)
    size_t cpa_fwd_scratch_bytes(const cpa_fwd_args *a, int any_tiled, int64_t dec_rows)
    size_t cpa_fwd_slot_bytes(const cpa_fwd_args *a)
    cpa_fwd_item_fn cpa_fwd_kernel(const cpa_fwd_args *a, int isa)
    void cpa_fwd_merge_one(const cpa_fwd_args *a, const cpa_fwd_merge *m, const char *partials,
                           char *scratch)

cdef extern from "backward.h" nogil:
    ctypedef struct cpa_bwd_args:
        cpa_rows q, k, v, out, dout, lse, dq, dk, dv, di
        int32_t num_heads, num_kv_heads, head_dim_qk, head_dim_v
        int32_t f64
        double scale, softcap
        const double *alibi
        cpa_mask mask
        int64_t num_seqs
        const int64_t *q_start, *k_start, *q_len, *k_len
    ctypedef struct cpa_bwd_item:
        int64_t seq
        int32_t kvh, block
    int CPA_BWD_KV, CPA_BWD_Q
    ctypedef void (*cpa_bwd_item_fn)(const cpa_bwd_args *, const cpa_bwd_item *, char *) noexcept nogil
    int64_t cpa_bwd_plan(const cpa_bwd_args *a, int pass_, cpa_bwd_item *items)
    size_t cpa_bwd_scratch_bytes(const cpa_bwd_args *a)
    cpa_bwd_item_fn cpa_bwd_kernel(const cpa_bwd_args *a, int pass_, int isa)



cdef inline const int64_t *i64(cnp.ndarray a) noexcept:
    """Data of a contiguous int64 array."""
    return <const int64_t *>cnp.PyArray_DATA(a)


cdef inline cpa_rows rows_of(object x, tuple axes):
    """The cpa_rows of array x (None: no array) whose (sequence, token, head)
    axes are `axes`, -1 for an axis it does not have."""
    cdef cpa_rows r
    r.data = NULL
    r.seq = r.tok = r.head = 0
    if x is None:
        return r
    cdef cnp.ndarray a = x
    cdef int64_t isz = cnp.PyArray_ITEMSIZE(a)
    cdef int i, ax
    r.data = cnp.PyArray_DATA(a)
    for i in range(3):
        ax = axes[i]
        if ax >= 0:
            if i == 0:
                r.seq = cnp.PyArray_STRIDES(a)[ax] // isz
            elif i == 1:
                r.tok = cnp.PyArray_STRIDES(a)[ax] // isz
            else:
                r.head = cnp.PyArray_STRIDES(a)[ax] // isz
    return r


cdef inline void set_mask(cpa_mask *m, opts):
    """From the facade's Options (see _validate.check_options)."""
    m.causal = opts.causal
    m.window_left = opts.window_left
    m.window_right = opts.window_right


ctypedef fused engine_args:
    cpa_fwd_args
    cpa_bwd_args


cdef inline void set_call(engine_args *a, call, tuple layout, out, lse):
    """What the forward and backward engines take alike from a checked Call
    (_validate.Call): the rows of q, k, v, out and lse by the layout's axes
    (_forward.LAYOUTS), head counts and dims, options and sequences. The
    caller keeps call, out and lse alive while the engine runs."""
    q_axes, kv_axes, lse_axes = layout
    a.q = rows_of(call.q, q_axes)
    a.out = rows_of(out, q_axes)
    a.k = rows_of(call.k, kv_axes)
    a.v = rows_of(call.v, kv_axes)
    a.lse = rows_of(lse, lse_axes)
    a.num_heads = call.heads
    a.num_kv_heads = call.kv_heads
    a.head_dim_qk = call.head_dim
    a.head_dim_v = call.head_dim_v
    opts = call.opts
    a.scale = opts.scale
    a.softcap = opts.softcap
    set_mask(&a.mask, opts)
    seqs = call.seqs
    a.num_seqs = seqs.q_len.shape[0]
    a.q_start = i64(seqs.q_start)
    a.k_start = i64(seqs.k_start)
    a.q_len = i64(seqs.q_len)
    a.k_len = i64(seqs.k_len)
