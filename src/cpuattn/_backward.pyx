"""Parallel driver of the backward engine (csrc/backward.c).

Takes arrays the facade has already validated and converted to one compute
dtype (float32 or float64): nothing here checks shapes or indices. Two
passes on the worker pool (csrc/workers.h) with the GIL released, the q pass
(dQ and Di) then the kv pass (dK, dV); each item writes its own gradient rows, so no atomics are needed
and results do not depend on the thread count.
"""
from libc.stdint cimport int32_t, int64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset
cimport numpy as cnp

from ._engine cimport (
    cpa_bwd_args, cpa_bwd_item, cpa_bwd_item_fn, cpa_bwd_plan, cpa_bwd_scratch_bytes,
    cpa_bwd_kernel, CPA_BWD_KV, CPA_BWD_Q, rows_of, set_call)
from ._forward import LAYOUTS
from ._threads cimport current_isa, parallel_for, team_size, thread_scratch

cnp.import_array()


def backward(call, cnp.ndarray out, cnp.ndarray dout, cnp.ndarray lse, cnp.ndarray di,
             cnp.ndarray dq, cnp.ndarray dk, cnp.ndarray dv):
    """Gradients of a checked call (``_validate.Call``, layout "dense" or
    "packed") whose arrays and out, dout, lse share one compute dtype
    (float32 or float64); see backward.h.

    di: scratch shaped like lse (receives rowsum(dout * out)). Writes dq, dk
    and dv (shaped like call.q, call.k, call.v) in full.
    """
    layout = LAYOUTS[call.layout]
    q_axes, kv_axes, lse_axes = layout
    cdef cpa_bwd_args a
    memset(&a, 0, sizeof(a))
    set_call(&a, call, layout, out, lse)
    a.dout = rows_of(dout, q_axes)
    a.dq = rows_of(dq, q_axes)
    a.dk = rows_of(dk, kv_axes)
    a.dv = rows_of(dv, kv_axes)
    a.di = rows_of(di, lse_axes)
    a.f64 = call.q.dtype.itemsize == 8
    if call.alibi is not None:
        a.alibi = <const double *>cnp.PyArray_DATA(<cnp.ndarray>call.alibi)
    seqs = call.seqs
    cdef int64_t work = int((seqs.q_len * seqs.k_len).sum()) * a.num_heads * (
        a.head_dim_qk + a.head_dim_v)
    run(&a, work)


ctypedef struct bwd_pass:
    const cpa_bwd_args *a
    cpa_bwd_item_fn kernel
    const cpa_bwd_item *items
    char *scratch           # per_thread bytes for each thread id
    size_t per_thread


cdef void _run_item(void *ctx, int64_t i, int tid) noexcept nogil:
    cdef bwd_pass *p = <bwd_pass *>ctx
    p.kernel(p.a, &p.items[i], p.scratch + tid * p.per_thread)


cdef void run(cpa_bwd_args *a, int64_t work) except *:
    cdef cpa_bwd_item_fn kv_kernel = cpa_bwd_kernel(a, CPA_BWD_KV, current_isa())
    cdef cpa_bwd_item_fn q_kernel = cpa_bwd_kernel(a, CPA_BWD_Q, current_isa())
    if kv_kernel == NULL or q_kernel == NULL:
        raise RuntimeError("cpuattn internal error: no backward kernel for this dtype")
    cdef int64_t n_kv = cpa_bwd_plan(a, CPA_BWD_KV, NULL)
    cdef int64_t n_q = cpa_bwd_plan(a, CPA_BWD_Q, NULL)
    cdef cpa_bwd_item *kv_items = <cpa_bwd_item *>malloc((n_kv + 1) * sizeof(cpa_bwd_item))
    cdef cpa_bwd_item *q_items = <cpa_bwd_item *>malloc((n_q + 1) * sizeof(cpa_bwd_item))
    cdef char *scratch_raw = NULL
    cdef int nt
    cdef bwd_pass q_pass, kv_pass
    cdef size_t per_thread = (cpa_bwd_scratch_bytes(a) + 63) // 64 * 64
    try:
        if kv_items == NULL or q_items == NULL:
            raise MemoryError("cpuattn: cannot allocate the work list")
        cpa_bwd_plan(a, CPA_BWD_KV, kv_items)
        cpa_bwd_plan(a, CPA_BWD_Q, q_items)
        nt = team_size(n_kv if n_kv > n_q else n_q, work)
        q_pass.a = a
        q_pass.scratch = thread_scratch(&scratch_raw, per_thread, nt)
        q_pass.per_thread = per_thread
        kv_pass = q_pass
        q_pass.kernel, q_pass.items = q_kernel, q_items
        kv_pass.kernel, kv_pass.items = kv_kernel, kv_items
        with nogil:
            # the q pass first: it also stores Di for the kv pass
            parallel_for(nt, n_q, _run_item, &q_pass)
            parallel_for(nt, n_kv, _run_item, &kv_pass)
    finally:
        free(kv_items)
        free(q_items)
        free(scratch_raw)
