# Stub of _pool.pyx (the C page pool); tests/test_stubs.py keeps it in step.
from collections.abc import Iterable
from typing import Any, Final, Literal, overload

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from ._plan import PoolPlan
from ._typing import SeqId, Window

_Seqs = Iterable[SeqId] | NDArray[np.integer[Any]]

class PagePool:
    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int,
                 dtype: DTypeLike = "float32", *, k_dtype: DTypeLike | None = None,
                 v_dtype: DTypeLike | None = None, num_layers: int = 1) -> None: ...
    num_pages: Final[int]
    page_size: Final[int]
    num_kv_heads: Final[int]
    head_dim: Final[int]
    dtype: Final[np.dtype[Any] | str]
    k_dtype: Final[str]
    v_dtype: Final[str]
    num_layers: Final[int]
    num_free_pages: Final[int]
    nbytes: Final[int]
    k_pages: Final[NDArray[Any]]
    v_pages: Final[NDArray[Any]]
    k_scales: Final[NDArray[Any] | None]
    v_scales: Final[NDArray[Any] | None]
    def create_sequence(self) -> int: ...
    def seq_len(self, seq: SeqId) -> int: ...
    def append(self, seq: SeqId, k: ArrayLike, v: ArrayLike) -> None: ...
    def reserve(self, seq: SeqId, n: int) -> NDArray[np.int64]: ...
    def write(self, layer: int, slots: ArrayLike, k: ArrayLike, v: ArrayLike) -> None: ...
    def fork(self, seq: SeqId) -> int: ...
    def truncate(self, seq: SeqId, length: int) -> None: ...
    def free_sequence(self, seq: SeqId) -> None: ...
    def pages(self, seq: SeqId) -> NDArray[np.int32]: ...
    def gather(self, seq: SeqId, *, layer: int = 0) -> tuple[NDArray[Any], NDArray[Any]]: ...
    def block_table(self, seqs: _Seqs) -> tuple[NDArray[np.int32], NDArray[np.int32]]: ...
    @overload
    def attention(self, q: ArrayLike, seqs: _Seqs, *, layer: int = 0,
                  cu_seqlens_q: ArrayLike | None = None,
                  causal: bool = True, scale: float | None = None, window: Window = (-1, -1),
                  softcap: float = 0.0, sinks: ArrayLike | None = None,
                  alibi_slopes: ArrayLike | None = None, tree_mask: ArrayLike | None = None,
                  return_lse: Literal[False] = False,
                  out: NDArray[Any] | None = None) -> NDArray[Any]: ...
    @overload
    def attention(self, q: ArrayLike, seqs: _Seqs, *, layer: int = 0,
                  cu_seqlens_q: ArrayLike | None = None,
                  causal: bool = True, scale: float | None = None, window: Window = (-1, -1),
                  softcap: float = 0.0, sinks: ArrayLike | None = None,
                  alibi_slopes: ArrayLike | None = None, tree_mask: ArrayLike | None = None,
                  return_lse: Literal[True],
                  out: NDArray[Any] | None = None) -> tuple[NDArray[Any], NDArray[np.floating[Any]]]: ...
    @overload
    def attention(self, q: ArrayLike, seqs: _Seqs, *, layer: int = 0,
                  cu_seqlens_q: ArrayLike | None = None,
                  causal: bool = True, scale: float | None = None, window: Window = (-1, -1),
                  softcap: float = 0.0, sinks: ArrayLike | None = None,
                  alibi_slopes: ArrayLike | None = None, tree_mask: ArrayLike | None = None,
                  return_lse: bool = False,
                  out: NDArray[Any] | None = None) -> NDArray[Any] | tuple[NDArray[Any], NDArray[np.floating[Any]]]: ...
    def plan(self, seqs: _Seqs, *, cu_seqlens_q: ArrayLike | None = None,
             tree_mask: ArrayLike | None = None) -> PoolPlan: ...
    def _refcounts(self) -> NDArray[np.int32]: ...
    def _check_invariants(self) -> None: ...
