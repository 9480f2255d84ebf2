# Thread count, worker pool and SIMD path shared by every kernel module (cimported).
from libc.stdint cimport int64_t

from ._engine cimport cpa_item_fn

cdef int effective_threads() noexcept nogil
cdef int team_size(int64_t n_items, int64_t work) noexcept nogil
cdef void parallel_for(int nthreads, int64_t n_items, cpa_item_fn fn, void *ctx) noexcept nogil
cdef int current_isa() noexcept nogil
cdef char *thread_scratch(char **raw, size_t per_thread, int nt) except NULL
