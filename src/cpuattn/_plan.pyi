# Stub of _plan.pyx (PagedPlan); tests/test_stubs.py keeps it in step.
from typing import Any, Final, Literal, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._typing import Window

_Out = NDArray[Any]
_Lse = NDArray[np.floating[Any]]
_Scale = ArrayLike | float | None

def dense_attention(q: object, k: object, v: object, causal: object, scale: object,
                    window: object, softcap: object, sinks: object, alibi: object,
                    return_lse: object, out: object, seqs: object = ...
                    ) -> _Out | tuple[_Out, _Lse] | None: ...

class PagedPlan:
    def __init__(self, block_table: ArrayLike, seq_lens: ArrayLike, *, page_size: int,
                 num_pages: int, cu_seqlens_q: ArrayLike | None = None,
                 tree_mask: ArrayLike | None = None) -> None: ...
    batch_size: Final[int]
    num_queries: Final[int]
    page_size: Final[int]
    num_pages: Final[int]
    block_table: Final[NDArray[np.int32]]
    seq_lens: Final[NDArray[np.int32]]
    cu_seqlens_q: Final[NDArray[np.int32] | None]
    @overload
    def run(self, q: ArrayLike, k_pages: ArrayLike, v_pages: ArrayLike, *, causal: bool = True,
            scale: float | None = None, window: Window = (-1, -1), softcap: float = 0.0,
            sinks: ArrayLike | None = None, alibi_slopes: ArrayLike | None = None,
            k_scale: _Scale = None, v_scale: _Scale = None, return_lse: Literal[False] = False,
            out: _Out | None = None) -> _Out: ...
    @overload
    def run(self, q: ArrayLike, k_pages: ArrayLike, v_pages: ArrayLike, *, causal: bool = True,
            scale: float | None = None, window: Window = (-1, -1), softcap: float = 0.0,
            sinks: ArrayLike | None = None, alibi_slopes: ArrayLike | None = None,
            k_scale: _Scale = None, v_scale: _Scale = None, return_lse: Literal[True],
            out: _Out | None = None) -> tuple[_Out, _Lse]: ...
    @overload
    def run(self, q: ArrayLike, k_pages: ArrayLike, v_pages: ArrayLike, *, causal: bool = True,
            scale: float | None = None, window: Window = (-1, -1), softcap: float = 0.0,
            sinks: ArrayLike | None = None, alibi_slopes: ArrayLike | None = None,
            k_scale: _Scale = None, v_scale: _Scale = None, return_lse: bool = False,
            out: _Out | None = None) -> _Out | tuple[_Out, _Lse]: ...

class PoolPlan(PagedPlan):
    def __init__(self, pool: Any, ids: NDArray[np.int64], cu_seqlens_q: ArrayLike | None = None,
                 tree_mask: ArrayLike | None = None) -> None: ...
    @overload  # type: ignore[override]
    def run(self, q: ArrayLike, *, layer: int = 0, causal: bool = True,
            scale: float | None = None, window: Window = (-1, -1), softcap: float = 0.0,
            sinks: ArrayLike | None = None, alibi_slopes: ArrayLike | None = None,
            return_lse: Literal[False] = False, out: _Out | None = None) -> _Out: ...
    @overload
    def run(self, q: ArrayLike, *, layer: int = 0, causal: bool = True,
            scale: float | None = None, window: Window = (-1, -1), softcap: float = 0.0,
            sinks: ArrayLike | None = None, alibi_slopes: ArrayLike | None = None,
            return_lse: Literal[True], out: _Out | None = None) -> tuple[_Out, _Lse]: ...
    @overload
    def run(self, q: ArrayLike, *, layer: int = 0, causal: bool = True,
            scale: float | None = None, window: Window = (-1, -1), softcap: float = 0.0,
            sinks: ArrayLike | None = None, alibi_slopes: ArrayLike | None = None,
            return_lse: bool = False, out: _Out | None = None) -> _Out | tuple[_Out, _Lse]: ...
    def close(self) -> None: ...
    def __enter__(self) -> PoolPlan: ...
    def __exit__(self, *exc: object) -> Literal[False]: ...
    closed: Final[bool]
    pool: Final[Any]
