# Thread count and SIMD path shared by every kernel module (cimported).
cdef int effective_threads() noexcept nogil
cdef int current_isa() noexcept nogil
