# Thread count and SIMD path shared by every kernel module (cimported).
from libc.stdint cimport int64_t

cdef int effective_threads() noexcept nogil
cdef int team_size(int64_t n_items, int64_t work) noexcept nogil
cdef int current_isa() noexcept nogil
