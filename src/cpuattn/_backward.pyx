"""Parallel driver of the backward engine (csrc/backward.c).

Takes arrays the facade has already validated and converted to one compute
dtype (float32 or float64): nothing here checks shapes or indices. Two
dynamic OpenMP loops with the GIL released, the q pass (dQ and Di) then the
kv pass (dK, dV); each item writes its own gradient rows, so no atomics are needed
and results do not depend on the thread count.
"""
from libc.stdint cimport int32_t, int64_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset
from cython.parallel cimport prange, threadid
cimport numpy as cnp

from ._threads cimport current_isa, team_size

cnp.import_array()

cdef extern from "backward.h" nogil:
    ctypedef struct cpa_bwd_args:
        const void *q
        const void *k
        const void *v
        const void *out
        const void *dout
        const void *lse
        void *dq
        void *dk
        void *dv
        void *di
        int64_t q_s[3]
        int64_t k_s[3]
        int64_t v_s[3]
        int64_t o_s[3]
        int64_t do_s[3]
        int64_t lse_s[3]
        int64_t di_s[3]
        int64_t dq_s[3]
        int64_t dk_s[3]
        int64_t dv_s[3]
        int32_t num_heads, num_kv_heads, head_dim_qk, head_dim_v
        int32_t f64
        double scale, softcap
        int32_t causal
        int64_t window_left, window_right
        int64_t num_seqs
        const int64_t *q_start
        const int64_t *k_start
        const int64_t *q_len
        const int64_t *k_len
    ctypedef struct cpa_bwd_item:
        int64_t seq
        int32_t kvh, block
    int CPA_BWD_KV, CPA_BWD_Q
    ctypedef void (*cpa_bwd_item_fn)(const cpa_bwd_args *, const cpa_bwd_item *, char *) noexcept nogil
    int64_t cpa_bwd_plan(const cpa_bwd_args *a, int pass_, cpa_bwd_item *items)
    size_t cpa_bwd_scratch_bytes(const cpa_bwd_args *a)
    cpa_bwd_item_fn cpa_bwd_kernel(const cpa_bwd_args *a, int pass_, int isa)

cdef inline const int64_t *i64(cnp.ndarray a):
    return <const int64_t *>cnp.PyArray_DATA(a)


cdef void set3(int64_t *dst, tuple s):
    dst[0] = s[0]
    dst[1] = s[1]
    dst[2] = s[2]


def backward(cnp.ndarray dout, cnp.ndarray q, cnp.ndarray k, cnp.ndarray v,
             cnp.ndarray out, cnp.ndarray lse, cnp.ndarray di,
             cnp.ndarray dq, cnp.ndarray dk, cnp.ndarray dv,
             dict strides, tuple dims, double scale, double softcap, bint causal,
             int64_t window_left, int64_t window_right,
             cnp.ndarray q_start, cnp.ndarray k_start, cnp.ndarray q_len, cnp.ndarray k_len):
    """Gradients of attention over validated arrays (see backward.h).

    di: scratch shaped like lse (receives rowsum(dout * out)).
    strides: name -> (batch, token, head) element strides for "q", "k", "v",
        "out", "dout", "lse", "di", "dq", "dk", "dv".
    dims: (num_heads, num_kv_heads, head_dim_qk, head_dim_v).
    All arrays share one dtype, float32 or float64; index arrays are
    contiguous int64 of length num_seqs. Writes dq, dk and dv in full.
    """
    cdef cpa_bwd_args a
    memset(&a, 0, sizeof(a))
    a.q = cnp.PyArray_DATA(q)
    a.k = cnp.PyArray_DATA(k)
    a.v = cnp.PyArray_DATA(v)
    a.out = cnp.PyArray_DATA(out)
    a.dout = cnp.PyArray_DATA(dout)
    a.lse = cnp.PyArray_DATA(lse)
    a.dq = cnp.PyArray_DATA(dq)
    a.dk = cnp.PyArray_DATA(dk)
    a.dv = cnp.PyArray_DATA(dv)
    a.di = cnp.PyArray_DATA(di)
    set3(a.q_s, strides["q"])
    set3(a.k_s, strides["k"])
    set3(a.v_s, strides["v"])
    set3(a.o_s, strides["out"])
    set3(a.do_s, strides["dout"])
    set3(a.lse_s, strides["lse"])
    set3(a.di_s, strides["di"])
    set3(a.dq_s, strides["dq"])
    set3(a.dk_s, strides["dk"])
    set3(a.dv_s, strides["dv"])
    a.num_heads, a.num_kv_heads, a.head_dim_qk, a.head_dim_v = dims
    a.f64 = q.dtype.itemsize == 8
    a.scale = scale
    a.softcap = softcap
    a.causal = causal
    a.window_left = window_left
    a.window_right = window_right
    a.num_seqs = q_len.shape[0]
    a.q_start = i64(q_start)
    a.k_start = i64(k_start)
    a.q_len = i64(q_len)
    a.k_len = i64(k_len)
    cdef int64_t work = int((q_len * k_len).sum()) * a.num_heads * (a.head_dim_qk + a.head_dim_v)
    run(&a, work)


cdef void run(cpa_bwd_args *a, int64_t work) except *:
    cdef cpa_bwd_item_fn kv_kernel = cpa_bwd_kernel(a, CPA_BWD_KV, current_isa())
    cdef cpa_bwd_item_fn q_kernel = cpa_bwd_kernel(a, CPA_BWD_Q, current_isa())
    if kv_kernel == NULL or q_kernel == NULL:
        raise RuntimeError("cpuattn internal error: no backward kernel for this dtype")
    cdef int64_t n_kv = cpa_bwd_plan(a, CPA_BWD_KV, NULL)
    cdef int64_t n_q = cpa_bwd_plan(a, CPA_BWD_Q, NULL)
    cdef int64_t i
    cdef cpa_bwd_item *kv_items = <cpa_bwd_item *>malloc((n_kv + 1) * sizeof(cpa_bwd_item))
    cdef cpa_bwd_item *q_items = <cpa_bwd_item *>malloc((n_q + 1) * sizeof(cpa_bwd_item))
    cdef char *scratch_raw = NULL
    cdef char *scratch
    cdef int nt, tid
    cdef size_t per_thread = (cpa_bwd_scratch_bytes(a) + 63) // 64 * 64
    try:
        if kv_items == NULL or q_items == NULL:
            raise MemoryError("cpuattn: cannot allocate the work list")
        cpa_bwd_plan(a, CPA_BWD_KV, kv_items)
        cpa_bwd_plan(a, CPA_BWD_Q, q_items)
        nt = team_size(n_kv if n_kv > n_q else n_q, work)
        scratch_raw = <char *>malloc(per_thread * nt + 64)
        if scratch_raw == NULL:
            raise MemoryError("cpuattn: cannot allocate kernel scratch")
        scratch = <char *>((<uintptr_t>scratch_raw + 63) & ~(<uintptr_t>63))
        with nogil:
            # the q pass first: it also stores Di for the kv pass
            for i in prange(n_q, schedule="dynamic", num_threads=nt, use_threads_if=nt > 1):
                tid = threadid()
                q_kernel(a, &q_items[i], scratch + tid * per_thread)
            for i in prange(n_kv, schedule="dynamic", num_threads=nt, use_threads_if=nt > 1):
                tid = threadid()
                kv_kernel(a, &kv_items[i], scratch + tid * per_thread)
    finally:
        free(kv_items)
        free(q_items)
        free(scratch_raw)
