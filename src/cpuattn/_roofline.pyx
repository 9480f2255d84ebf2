"""Machine ceilings the benchmark compares the kernels against, measured in
the benchmark's own process with the same thread count.

- ``read_bandwidth``: a parallel streaming read (sum) of a float32 array much
  larger than the last-level cache: the ceiling of memory-bound paged decode.
- ``gemm_gflops``: numpy's fp32 matmul with BLAS limited to the same thread
  count (threadpoolctl): the ceiling of compute-bound prefill.
"""
import os
import statistics
import time

import numpy as np
from libc.stdint cimport int64_t
from cython.parallel cimport prange

from ._threads cimport effective_threads

cdef extern from *:
    """
    /* 32 independent accumulators: each lane is its own sum, so -O3 vectorises
       the loop without reassociating floats (no -ffast-math needed), and the
       adds stay far ahead of memory. */
    static double cpa_sum_f32(const float *p, long long n) {
        float acc[32] = {0};
        long long i = 0;
        for (; i + 32 <= n; i += 32)
            for (int j = 0; j < 32; j++) acc[j] += p[i + j];
        double s = 0.0;
        for (; i < n; i++) s += p[i];
        for (int j = 0; j < 32; j++) s += acc[j];
        return s;
    }
    static void cpa_fill_f32(float *p, long long n, float value) {
        for (long long i = 0; i < n; i++) p[i] = value;
    }
    """
    double cpa_sum_f32(const float *p, long long n) noexcept nogil
    void cpa_fill_f32(float *p, long long n, float value) noexcept nogil

# Floats per work chunk (256 KiB): many chunks per thread, each one a long
# sequential stream for the hardware prefetcher.
cdef enum:
    CHUNK = 65536

_buffer = None      # the big array, allocated and touched once per process


def last_level_cache_bytes():
    """Size of the largest CPU cache in bytes (Linux sysfs), or None."""
    best = None
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = os.listdir(base)
    except OSError:
        return None
    for e in entries:
        try:
            with open(os.path.join(base, e, "size")) as f:
                s = f.read().strip()
        except OSError:
            continue
        digits = s.rstrip("KMGkmg")
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[len(digits):].upper(), 1)
        try:
            size = int(digits) * mult
        except ValueError:
            continue
        best = size if best is None else max(best, size)
    return best


def default_read_bytes():
    """Array size for read_bandwidth: 4x the last-level cache or 1 GiB,
    whichever is smaller (1 GiB when the cache size is unknown)."""
    llc = last_level_cache_bytes()
    return min(4 * llc, 1 << 30) if llc else 1 << 30


cdef void _touch(float *p, int64_t n, int nt) noexcept nogil:
    """Write every page from the threads that will read it (first touch)."""
    cdef int64_t nchunks = (n + CHUNK - 1) // CHUNK
    cdef int64_t c, lo
    for c in prange(nchunks, num_threads=nt, schedule="static"):
        lo = c * CHUNK
        cpa_fill_f32(p + lo, min(CHUNK, n - lo), 1.0)


cdef double _read_pass(const float *p, int64_t n, double *partial, int nt) noexcept nogil:
    cdef int64_t nchunks = (n + CHUNK - 1) // CHUNK
    cdef int64_t c, lo
    cdef double total = 0.0
    for c in prange(nchunks, num_threads=nt, schedule="static"):
        lo = c * CHUNK
        partial[c] = cpa_sum_f32(p + lo, min(CHUNK, n - lo))
    for c in range(nchunks):
        total += partial[c]
    return total


def read_bandwidth(nbytes=None, repeats=5):
    """Streaming read bandwidth of main memory, in GB/s (1e9 bytes/s).

    Sums a float32 array of ``nbytes`` (default: :func:`default_read_bytes`)
    in an OpenMP loop with the GIL released, on ``cpuattn.get_num_threads()``
    threads. The array is allocated and written once per process (reused by
    later calls of the same size), then read ``repeats`` times after one
    warm-up pass.

    Returns a dict: ``median_gbps``, ``best_gbps``, ``times_s``, ``nbytes``,
    ``threads``.
    """
    global _buffer
    cdef int nt = effective_threads()
    if nbytes is None:
        nbytes = default_read_bytes()
    cdef int64_t n = max(int(nbytes) // 4, CHUNK)
    cdef float *q
    if _buffer is None or _buffer.size != n:
        _buffer = None
        _buffer = np.empty(n, dtype=np.float32)
        q = <float *><size_t>_buffer.ctypes.data
        with nogil:
            _touch(q, n, nt)
    cdef const float *p = <const float *><size_t>_buffer.ctypes.data
    partial_arr = np.zeros((n + CHUNK - 1) // CHUNK, dtype=np.float64)
    cdef double *partial = <double *><size_t>partial_arr.ctypes.data
    cdef double total
    times = []
    for i in range(int(repeats) + 1):
        t0 = time.perf_counter()
        with nogil:
            total = _read_pass(p, n, partial, nt)
        t = time.perf_counter() - t0
        if total != <double>n:   # every element is 1.0: the sum proves the read happened
            raise RuntimeError(f"read_bandwidth: bad checksum {total} != {n}")
        if i:
            times.append(t)
    nb = n * 4
    return {
        "median_gbps": nb / statistics.median(times) / 1e9,
        "best_gbps": nb / min(times) / 1e9,
        "times_s": times,
        "nbytes": nb,
        "threads": nt,
    }


def release():
    """Free the array kept by :func:`read_bandwidth`."""
    global _buffer
    _buffer = None


def gemm_gflops(n=2048, repeats=5, threads=None):
    """fp32 GEMM throughput of numpy's BLAS, in GFLOP/s (2 n^3 per product).

    ``threads`` (default ``cpuattn.get_num_threads()``) limits the BLAS
    threads through threadpoolctl; without threadpoolctl the BLAS default is
    used and ``threads_limited`` is False. One warm-up product, then
    ``repeats`` timed ones.

    Returns a dict: ``median_gflops``, ``best_gflops``, ``times_s``, ``n``,
    ``threads``, ``threads_limited``, ``blas`` (threadpoolctl's description of
    the BLAS library, or None).
    """
    import contextlib

    if threads is None:
        threads = effective_threads()
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    blas = None
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
        limits = threadpool_limits(limits=threads, user_api="blas")
        limited = True
        blas = [{k: d.get(k) for k in ("internal_api", "version", "architecture",
                                       "threading_layer", "filepath")}
                for d in threadpool_info() if d.get("user_api") == "blas"]
    except ImportError:
        limits = contextlib.nullcontext()
        limited = False
    times = []
    with limits:
        np.matmul(a, b, out=c)
        for _ in range(int(repeats)):
            t0 = time.perf_counter()
            np.matmul(a, b, out=c)
            times.append(time.perf_counter() - t0)
    flops = 2.0 * n ** 3
    return {
        "median_gflops": flops / statistics.median(times) / 1e9,
        "best_gflops": flops / min(times) / 1e9,
        "times_s": times,
        "n": n,
        "threads": threads,
        "threads_limited": limited,
        "blas": blas,
    }
