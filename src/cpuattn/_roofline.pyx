"""Machine ceilings the benchmark compares the kernels against, measured in
the benchmark's own process with the same thread count.

- ``read_bandwidth``: a parallel streaming read (sum) of a float32 array at
  least 4x the last-level cache: the ceiling of memory-bound paged decode.
  Two readers (one stream; four streams with software prefetch) run
  interleaved and the faster one is the ceiling.
- ``gemm_gflops``: numpy's fp32 matmul with BLAS limited to the same thread
  count (threadpoolctl): the ceiling of compute-bound prefill.
"""
import os
import statistics
import time

import numpy as np
from libc.stdint cimport int64_t

from ._threads cimport effective_threads, parallel_for

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
    /* The read the decode kernels are held to, made as fast as we can: four
       streams a quarter-chunk apart (more open DRAM pages, more lines in
       flight than one stream), each line prefetched into L1 4 KiB ahead (16
       KiB in flight, as the decode kernel does), 8 independent accumulators
       per stream. */
    static double cpa_sum4_f32(const float *p, long long n) {
        long long q = (n / 4) / 32 * 32;
        const float *s0 = p, *s1 = p + q, *s2 = p + 2 * q, *s3 = p + 3 * q;
        float a0[8] = {0}, a1[8] = {0}, a2[8] = {0}, a3[8] = {0};
        for (long long i = 0; i < q; i += 32) {
            __builtin_prefetch(s0 + i + 1024, 0, 3);
            __builtin_prefetch(s1 + i + 1024, 0, 3);
            __builtin_prefetch(s2 + i + 1024, 0, 3);
            __builtin_prefetch(s3 + i + 1024, 0, 3);
            __builtin_prefetch(s0 + i + 1040, 0, 3);
            __builtin_prefetch(s1 + i + 1040, 0, 3);
            __builtin_prefetch(s2 + i + 1040, 0, 3);
            __builtin_prefetch(s3 + i + 1040, 0, 3);
            for (int u = 0; u < 32; u += 8)
                for (int j = 0; j < 8; j++) {
                    a0[j] += s0[i + u + j]; a1[j] += s1[i + u + j];
                    a2[j] += s2[i + u + j]; a3[j] += s3[i + u + j];
                }
        }
        double s = 0.0;
        for (long long i = 4 * q; i < n; i++) s += p[i];
        for (int j = 0; j < 8; j++) s += (double)a0[j] + a1[j] + a2[j] + a3[j];
        return s;
    }
    static void cpa_fill_f32(float *p, long long n, float value) {
        for (long long i = 0; i < n; i++) p[i] = value;
    }
    """
    double cpa_sum_f32(const float *p, long long n) noexcept nogil
    double cpa_sum4_f32(const float *p, long long n) noexcept nogil
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
    """Array size for read_bandwidth: at least 4x the last-level cache and at
    least 256 MiB (1 GiB when the cache size is unknown)."""
    llc = last_level_cache_bytes()
    return max(4 * llc, 256 << 20) if llc else 1 << 30


# The array in CHUNK-float chunks, one pool item each: claimed one at a
# time, so a thread that starts late (waking, or without a core) reads less
# instead of leaving a whole 1/nt of the array to the end.
ctypedef struct chunks:
    float *p
    int64_t n, nchunks
    int streams
    double *partial


cdef void _touch_chunk(void *ctx, int64_t k, int tid) noexcept nogil:
    cdef chunks *c = <chunks *>ctx
    cdef int64_t lo = k * CHUNK
    cpa_fill_f32(c.p + lo, min(CHUNK, c.n - lo), 1.0)


cdef void _read_chunk(void *ctx, int64_t k, int tid) noexcept nogil:
    cdef chunks *c = <chunks *>ctx
    cdef int64_t lo = k * CHUNK
    if c.streams == 4:
        c.partial[k] = cpa_sum4_f32(c.p + lo, min(CHUNK, c.n - lo))
    else:
        c.partial[k] = cpa_sum_f32(c.p + lo, min(CHUNK, c.n - lo))


cdef chunks _chunks_of(float *p, int64_t n) noexcept nogil:
    cdef chunks c
    c.p, c.n = p, n
    c.nchunks = (n + CHUNK - 1) // CHUNK
    c.streams = 1
    c.partial = NULL
    return c


cdef void _touch(float *p, int64_t n, int nt) noexcept nogil:
    """Write every page from the threads that will read it (first touch)."""
    cdef chunks c = _chunks_of(p, n)
    parallel_for(nt, c.nchunks, _touch_chunk, &c)


cdef double _read_pass(const float *p, int64_t n, double *partial, int nt,
                       int streams) noexcept nogil:
    cdef chunks c = _chunks_of(<float *>p, n)
    c.streams, c.partial = streams, partial
    parallel_for(nt, c.nchunks, _read_chunk, &c)
    cdef double total = 0.0
    cdef int64_t k
    for k in range(c.nchunks):
        total += partial[k]
    return total


def _rates(unit, amount, times):
    """Median and best rate (amount per second) of timed runs, and the times."""
    return {f"median_{unit}": amount / statistics.median(times),
            f"best_{unit}": amount / min(times), "times_s": times}


def read_bandwidth(nbytes=None, repeats=5):
    """Streaming read bandwidth of main memory, in GB/s (1e9 bytes/s).

    Sums a float32 array of ``nbytes`` (default: :func:`default_read_bytes`)
    on the worker pool with the GIL released, on ``cpuattn.get_num_threads()``
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
    cdef int streams
    nb = n * 4
    readers = {}
    for streams in (1, 4):   # interleaved so drift hits both readers alike
        readers[streams] = []
    for i in range(int(repeats) + 1):
        for streams in (1, 4):
            t0 = time.perf_counter()
            with nogil:
                total = _read_pass(p, n, partial, nt, streams)
            t = time.perf_counter() - t0
            if total != <double>n:   # every element is 1.0: the sum proves the read happened
                raise RuntimeError(f"read_bandwidth: bad checksum {total} != {n}")
            if i:
                readers[streams].append(t)
    best = min(readers, key=lambda r: statistics.median(readers[r]))
    times = readers[best]
    return {
        **_rates("gbps", nb / 1e9, times),
        "nbytes": nb,
        "threads": nt,
        "reader": "4 streams + prefetch" if best == 4 else "1 stream",
        "readers_median_gbps": {("4 streams + prefetch" if r == 4 else "1 stream"):
                                nb / statistics.median(readers[r]) / 1e9 for r in readers},
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
        **_rates("gflops", flops / 1e9, times),
        "n": n,
        "threads": threads,
        "threads_limited": limited,
        "blas": blas,
    }
