# Stub of _roofline.pyx (machine ceilings); tests/test_stubs.py keeps it in step.
from typing import Any, TypedDict

class _ReadBandwidth(TypedDict):
    median_gbps: float
    best_gbps: float
    times_s: list[float]
    nbytes: int
    threads: int
    reader: str
    readers_median_gbps: dict[str, float]

class _GemmGflops(TypedDict):
    median_gflops: float
    best_gflops: float
    times_s: list[float]
    n: int
    threads: int
    threads_limited: bool
    blas: list[dict[str, Any]] | None

def last_level_cache_bytes() -> int | None: ...
def default_read_bytes() -> int: ...
def read_bandwidth(nbytes: int | None = None, repeats: int = 5) -> _ReadBandwidth: ...
def release() -> None: ...
def gemm_gflops(n: int = 2048, repeats: int = 5, threads: int | None = None) -> _GemmGflops: ...
