"""cpuattn: fast, safe attention kernels for CPU-only LLM inference and training.

Layouts are token-major (flash-attn style); see the README and each
function's docstring. Integrations (``cpuattn.torch``,
``cpuattn.integrations.hf``) are imported on demand only.
"""
from typing import Any

from . import _threads
from .backward import attention_backward, attention_varlen_backward, paged_attention_backward
from .dense import attention, attention_varlen
from .paged import gather_pages, paged_attention, write_kv
from ._plan import PagedPlan
from ._pool import PagePool
from .errors import CpuAttnError, DTypeError, PageError, PoolFullError, ShapeError
from .kvcache import KVCache
from .merge import merge_attention_states
from .quant import dequantize_kv, quantize_kv
from .reference import reference_attention
from . import layers  # numpy only; makes ``cpuattn.layers`` available after ``import cpuattn``

__version__ = "0.1.0"

get_num_threads = _threads.get_num_threads
set_num_threads = _threads.set_num_threads


def info() -> "dict[str, Any]":
    """Build and runtime facts: version, the C compiler that built the
    kernels, OpenMP (on/off) and its runtime (spec date, library file), SIMD
    path, threads and the worker pool the kernels run on."""
    build = _threads.build_info()
    return {
        "version": __version__,
        "compiler": build["compiler"],
        "openmp": _threads.openmp_enabled(),
        "openmp_version": build["openmp_version"],
        "openmp_library": build["openmp_library"],
        "simd": _threads.get_isa(),
        "simd_supported": _threads.supported_isas(),
        "num_threads": get_num_threads(),
        "usable_cpus": _threads.usable_cpus(),
        "thread_pool": _threads.pool_info(),
    }


__all__ = [
    "attention", "attention_varlen", "reference_attention", "paged_attention", "gather_pages",
    "PagePool", "PagedPlan", "write_kv", "attention_backward", "attention_varlen_backward", "paged_attention_backward",
    "KVCache", "layers", "quantize_kv", "dequantize_kv", "merge_attention_states",
    "CpuAttnError", "ShapeError", "DTypeError", "PageError", "PoolFullError",
    "get_num_threads", "set_num_threads", "info", "__version__",
]
