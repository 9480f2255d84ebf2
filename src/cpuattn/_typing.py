"""Type aliases of the public signatures (for annotations and the stubs).

Inputs are anything ``numpy.asarray`` takes (``ArrayLike``: numpy arrays,
torch CPU tensors, buffer-protocol objects); results are numpy arrays in the
input's dtype, which may be ``ml_dtypes.bfloat16`` (not a ``numpy.floating``),
hence ``Array = NDArray[Any]``. lse is float32 or float64.
"""
from typing import Any, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

Array = NDArray[Any]
FloatArray = NDArray[np.floating[Any]]   # lse: float32 (float64 for float64 input)
Int32Array = NDArray[np.int32]
Window = Tuple[int, int]                 # (left, right), -1 = unbounded
SeqId = Union[int, np.integer[Any]]      # a PagePool sequence id

__all__ = ["Array", "ArrayLike", "DTypeLike", "FloatArray", "Int32Array", "NDArray", "SeqId",
           "Window"]
