# Stub of _forward.pyx (forward engine driver); tests/test_stubs.py keeps it in step.
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ._validate import Call

_Axes = tuple[int, int, int]

# (name, kernel code, bits per element) of every engine storage dtype
DTYPES: tuple[tuple[str, int, int], ...]
# (q and out, k and v, lse) (sequence, token, head) axes per call layout
LAYOUTS: dict[str, tuple[_Axes, _Axes, _Axes]]

def kernel_available(q_dtype: int, k_dtype: int, v_dtype: int) -> bool: ...
def forward(call: Call, out: NDArray[Any], lse: NDArray[np.floating[Any]] | None) -> None: ...
def check_chains(
    table: NDArray[np.int32] | NDArray[np.int64], lens: NDArray[np.int64], num_pages: int,
    page_size: int,
) -> tuple[int, int] | None: ...
