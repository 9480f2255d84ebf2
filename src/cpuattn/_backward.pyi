# Stub of _backward.pyx (backward engine driver); tests/test_stubs.py keeps it in step.
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ._forward import LAYOUTS as LAYOUTS
from ._validate import Call

_F = NDArray[np.floating[Any]]   # float32 or float64, the compute dtype

def backward(call: Call, out: _F, dout: _F, lse: _F, di: _F, dq: _F, dk: _F, dv: _F) -> None: ...
