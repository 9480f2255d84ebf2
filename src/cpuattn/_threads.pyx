"""Threads and SIMD path: the one place that knows about threads and the CPU.

The thread count a call uses is ``min(cap, omp_get_max_threads())`` of the
calling thread: ``cap`` is process-wide (set_num_threads), while OpenMP's own
limit is per calling thread, so ``threadpoolctl.threadpool_limits`` and
``OMP_NUM_THREADS`` keep working, also from Python worker threads. OpenMP is
only read for that limit: the kernels run on cpuattn's own worker pool
(csrc/workers.h), one per process, shared by every kernel module through
:func:`parallel_for`. A forked child gets a fresh pool on its first call.
"""
import math
import numbers
import os
import warnings

from .errors import ShapeError

from ._engine cimport (CPA_ISA_COUNT, CPA_SPIN_US, CPA_YIELD_US, cpa_isa_best, cpa_isa_name,
                       cpa_isa_supported, cpa_omp_max_threads, cpa_openmp_enabled,
                       cpa_parallel_for, cpa_thread_scratch, cpa_workers_count)

cdef extern from "portable.h":
    const char *CPA_COMPILER
    int CPA_OPENMP_VERSION
    const char *cpa_openmp_library()

cdef int _cap = 1
cdef int _isa = 0


cdef int effective_threads() noexcept nogil:
    """Threads for a kernel call starting now."""
    cdef int omp = cpa_omp_max_threads()
    return _cap if _cap < omp else omp


cdef void parallel_for(int nthreads, int64_t n_items, cpa_item_fn fn, void *ctx) noexcept nogil:
    """cpa_parallel_for (csrc/workers.h): workers.c is linked into this module
    only, so every kernel module that calls this shares one pool of threads."""
    cpa_parallel_for(nthreads, n_items, fn, ctx)


cdef char *thread_scratch(char **raw, size_t per_thread, int nt) except NULL:
    """per_thread bytes (a multiple of 64) for each of nt threads, 64-byte
    aligned: the calling thread's kept scratch (csrc/workers.h), so a small
    call maps no fresh memory; *raw receives what to free() (NULL if kept).
    Valid until this thread's next call."""
    cdef char *p = cpa_thread_scratch(per_thread * nt, <void **>raw)
    if p == NULL:
        raise MemoryError("cpuattn: cannot allocate kernel scratch")
    return p


# Below this many (query row x key x head_dim) multiply-adds a call stays on
# the calling thread: waking sleeping workers costs microseconds.
cdef int64_t SERIAL_WORK = 1 << 17


cdef int team_size(int64_t n_items, int64_t work) noexcept nogil:
    """Threads for a kernel call of n_items work items and about `work`
    multiply-adds: effective_threads(), no more than there are items, and one
    when the work is too small to pay for waking a team."""
    cdef int nt = effective_threads()
    if nt > n_items:
        nt = <int>n_items
    if work < SERIAL_WORK or nt < 1:
        nt = 1
    return nt


def pool_info():
    """The worker pool the kernels run on: what cpuattn.info() reports."""
    return {"kind": "cpuattn workers", "spin_us": CPA_SPIN_US, "yield_us": CPA_YIELD_US,
            "workers": cpa_workers_count()}


cdef int current_isa() noexcept nogil:
    return _isa


def _cgroup_cpu_limit():
    """CPUs allowed by a cgroup CPU quota (v2 cpu.max or v1 cfs), or None."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        if quota > 0 and period > 0:
            return max(1, math.ceil(quota / period))
    except (OSError, ValueError):
        pass
    return None


def usable_cpus():
    """CPUs this process may really use: its affinity mask and any cgroup quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        n = min(n, limit)
    return max(1, n)


def get_num_threads():
    """Threads a kernel call from this Python thread uses now:
    ``min(set_num_threads cap, omp_get_max_threads())``."""
    return effective_threads()


def set_num_threads(n):
    """Set the process-wide cap on kernel threads (an int >= 1)."""
    global _cap
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ShapeError(f"set_num_threads: n must be an int >= 1, got {n!r}")
    _cap = min(int(n), 1 << 30)   # a cap above any core count means no cap


def openmp_enabled():
    return bool(cpa_openmp_enabled())


def build_info():
    """The C compiler that built the engine, and the OpenMP runtime it reads
    its thread limit from: the spec date (``_OPENMP``, 0 without OpenMP) and
    the library file (None when unknown or without OpenMP)."""
    lib = cpa_openmp_library().decode(errors="replace")
    return {"compiler": CPA_COMPILER.decode(errors="replace").strip(),
            "openmp_version": CPA_OPENMP_VERSION, "openmp_library": lib or None}


def isa_names():
    """Every SIMD path this build has, in order of preference (slowest first)."""
    return [cpa_isa_name(i).decode() for i in range(CPA_ISA_COUNT)]


def best_isa():
    """Name of the fastest SIMD path this CPU and OS support."""
    return cpa_isa_name(cpa_isa_best()).decode()


def supported_isas():
    """SIMD paths this machine can run, slowest first (each path's own
    feature test: the list need not be a prefix of isa_names())."""
    return [cpa_isa_name(i).decode() for i in range(CPA_ISA_COUNT) if cpa_isa_supported(i)]


def get_isa():
    """Name of the SIMD path the kernels use."""
    return cpa_isa_name(_isa).decode()


def set_isa(name):
    """Force a SIMD path (testing/benchmarking); must be supported here."""
    global _isa
    names = supported_isas()
    if name not in names:
        raise ShapeError(f"isa: expected one of {names} on this CPU, got {name!r}")
    _isa = isa_names().index(name)


def _init():
    global _cap, _isa
    _cap = usable_cpus()
    _isa = cpa_isa_best()
    forced = os.environ.get("CPUATTN_ISA", "").strip().lower()
    if forced:
        if forced in supported_isas():
            _isa = isa_names().index(forced)
        else:
            warnings.warn(f"CPUATTN_ISA={forced!r} is not supported on this CPU "
                          f"(supported: {supported_isas()}); using {get_isa()!r}",
                          RuntimeWarning, stacklevel=2)


_init()
