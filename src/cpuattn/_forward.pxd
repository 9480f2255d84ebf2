# What _plan (PagedPlan) calls of the forward driver: a call's work list,
# planned once and run as often as wanted, and the dtype codes of arrays.
from libc.stdint cimport int64_t
cimport numpy as cnp

from ._engine cimport cpa_fwd_args, cpa_fwd_item, cpa_fwd_merge, cpa_rows

ctypedef struct fwd_work:
    cpa_fwd_item *items
    cpa_fwd_merge *merges
    int64_t n_items, n_merges, n_slots
    int64_t work            # multiply-adds, for the team size
    int max_split           # most splits of one merge
    int tiled               # any item runs the tiled kernel
    int64_t dec_rows        # most query rows of one decode item (cpa_fwd_share)

cdef int plan_work(const cpa_fwd_args *a, fwd_work *w) except -1
cdef void free_work(fwd_work *w) noexcept
cdef int run_work(const cpa_fwd_args *a, const fwd_work *w) except -1
cdef int run(const cpa_fwd_args *a) except -1
cdef int float_code(cnp.ndarray x)
cdef int page_code(cnp.ndarray x)
cdef cpa_rows scale_rows(object scale)
cdef const double *doubles(object x)
