# Stub of _quant.pyx (row quantisation); tests/test_stubs.py keeps it in step.
from typing import Any

import numpy as np
from numpy.typing import DTypeLike, NDArray

def quantize_rows(
    x: NDArray[np.float32], code: int, codes_dtype: DTypeLike,
) -> tuple[NDArray[Any], NDArray[np.float32] | NDArray[np.float16]]: ...
def dequantize_rows(
    codes: NDArray[Any], scales: NDArray[np.float32] | NDArray[np.float16], code: int, d: int,
    per_tensor: bool,
) -> NDArray[np.float32]: ...
def encode_fp8(x: NDArray[np.float32], code: int, scale: float) -> NDArray[np.uint8]: ...
