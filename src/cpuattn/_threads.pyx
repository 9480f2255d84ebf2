"""Threads and SIMD path: the one place that knows about OpenMP and the CPU.

The thread count a call uses is ``min(cap, omp_get_max_threads())`` of the
calling thread: ``cap`` is process-wide (set_num_threads), while OpenMP's own
limit is per calling thread, so ``threadpoolctl.threadpool_limits`` and
``OMP_NUM_THREADS`` keep working, also from Python worker threads.

Fork safety: GNU libgomp's worker threads do not survive ``fork()``, and a
child that starts a parallel region with the team its parent left behind
waits forever for threads that no longer exist. So once a kernel has asked
for more than one thread, a child forked from this process (``os.fork``,
``multiprocessing`` with the fork start method) runs every kernel serially,
on its calling thread; results are bitwise the same (they never depend on
the thread count). A child forked before any kernel ran keeps its threads.
"""
import math
import numbers
import os
import warnings

from .errors import ShapeError

from ._engine cimport (CPA_ISA_COUNT, cpa_isa_best, cpa_isa_name, cpa_isa_supported,
                       cpa_omp_max_threads, cpa_openmp_enabled)

cdef int _cap = 1
cdef int _isa = 0
cdef int _team_used = 0      # a kernel may have started an OpenMP team here
cdef int _fork_serial = 0    # forked after that: no usable team, run serially


cdef inline int _threads_now() noexcept nogil:
    if _fork_serial:
        return 1
    cdef int omp = cpa_omp_max_threads()
    return _cap if _cap < omp else omp


cdef int effective_threads() noexcept nogil:
    """Threads for a kernel call starting now (marks the team as used)."""
    global _team_used
    cdef int n = _threads_now()
    if n > 1:
        _team_used = 1
    return n


# Below this many (query row x key x head_dim) multiply-adds a call stays on
# the calling thread: waking an OpenMP team costs microseconds.
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


def _after_fork_in_child():
    global _fork_serial
    if _team_used:
        _fork_serial = 1


def forked_serial():
    """True in a process forked after a kernel used OpenMP threads: every
    kernel call then runs on the calling thread only (see the module doc)."""
    return bool(_fork_serial)


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
    ``min(set_num_threads cap, omp_get_max_threads())``, or 1 in a child
    forked after the kernels used threads (see :func:`forked_serial`)."""
    return _threads_now()


def set_num_threads(n):
    """Set the process-wide cap on kernel threads (an int >= 1)."""
    global _cap
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ShapeError(f"set_num_threads: n must be an int >= 1, got {n!r}")
    _cap = min(int(n), 1 << 30)   # a cap above any core count means no cap


def openmp_enabled():
    return bool(cpa_openmp_enabled())


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
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
