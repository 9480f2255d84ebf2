"""Argument checks shared by every public function.

All validation happens here, in Python, before any kernel runs: the kernels
trust what they get. Errors name the argument, what was expected and what
was received.
"""
import math
import numbers
from typing import NamedTuple

import numpy as np

from ._forward import DTYPES
from .errors import DTypeError, ShapeError

# the engine's storage dtypes (csrc/engine.h), by numpy name
DTYPE_NAMES = tuple(name for name, _, _ in DTYPES)
_CODES = {name: code for name, code, _ in DTYPES}
INDEX_MAX = 2**31 - 1


class Options(NamedTuple):
    """Checked options of a call, as the engine takes them."""
    scale: float
    window_left: int
    window_right: int
    softcap: float
    causal: bool


class Sequences(NamedTuple):
    """The sequences of a call (contiguous int64, one entry per sequence):
    sequence b's queries are rows q_start[b] .. q_start[b] + q_len[b] - 1 of
    q, its keys rows k_start[b] .. of k (unused for paged K/V)."""
    q_start: np.ndarray
    k_start: np.ndarray
    q_len: np.ndarray
    k_len: np.ndarray


def compute_dtype(dtype):
    """The dtype kernels compute and return lse in: float64 for float64
    storage, float32 for every other storage dtype."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def dtype_code(arr, name):
    """Kernel dtype tag of an array, or DTypeError."""
    code = _CODES.get(arr.dtype.name)   # by name: bfloat16 is a user dtype (ml_dtypes)
    if code is None:
        raise DTypeError(f"{name}: expected dtype {', '.join(DTYPE_NAMES[:-1])} or "
                         f"{DTYPE_NAMES[-1]}, got {arr.dtype}")
    return code


def as_array(x, name):
    """A numpy view of x (no copy where numpy.asarray can avoid one), with a
    contiguous last axis (copied once otherwise)."""
    if isinstance(x, np.ndarray):
        arr = x
    else:
        if type(x).__module__.startswith("torch"):
            if getattr(x, "device", None) is not None and x.device.type != "cpu":
                raise ShapeError(f"{name}: expected a CPU tensor, got one on {x.device}")
            if str(getattr(x, "dtype", "")) == "torch.bfloat16":
                raise DTypeError(f"{name}: numpy cannot view a torch.bfloat16 tensor; "
                                 "use cpuattn.torch.attention for torch tensors")
            if getattr(x, "requires_grad", False):
                x = x.detach()
        try:
            arr = np.asarray(x)
        except Exception as e:  # noqa: BLE001 - any conversion failure is a dtype problem
            raise DTypeError(f"{name}: expected an array of float32/float64/float16/bfloat16, "
                             f"got {type(x).__name__} ({e})") from None
    dtype_code(arr, name)
    if arr.ndim and arr.size:
        isz = arr.itemsize
        if (arr.shape[-1] > 1 and arr.strides[-1] != isz) or any(s % isz for s in arr.strides):
            arr = np.ascontiguousarray(arr)
    return arr


def estrides(arr):
    """Strides in elements."""
    return tuple(s // arr.itemsize for s in arr.strides)


def check_ndim(arr, name, ndim, layout):
    if arr.ndim != ndim:
        raise ShapeError(f"{name}: expected a {ndim}-D array {layout}, got shape {arr.shape}")


def check_heads(num_heads, num_kv_heads, qname="q", kname="k"):
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ShapeError(f"{qname}/{kname}: num_heads ({num_heads}) must be a positive multiple "
                         f"of num_kv_heads ({num_kv_heads})")


def check_options(scale, window, softcap, causal, head_dim):
    """Validated Options (scale, window_left, window_right, softcap, causal)."""
    if not isinstance(causal, (bool, np.bool_)):
        raise ShapeError(f"causal: expected a bool, got {causal!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    elif isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real) \
            or not math.isfinite(scale):
        raise ShapeError(f"scale: expected a finite real number or None, got {scale!r}")
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, numbers.Real) \
            or not math.isfinite(softcap) or softcap < 0:
        raise ShapeError(f"softcap: expected a finite number >= 0 (0 disables), got {softcap!r}")
    try:
        left, right = window
    except (TypeError, ValueError):
        raise ShapeError(f"window: expected a pair (left, right), got {window!r}") from None
    for side, w in (("left", left), ("right", right)):
        if isinstance(w, (bool, np.bool_)) or not isinstance(w, numbers.Integral) or w < -1:
            raise ShapeError(f"window: {side} must be an int >= -1 (-1 = unbounded), got {w!r}")
    # positions fit int32: a wider window is the same as an unbounded one
    left, right = (-1 if int(w) > INDEX_MAX else int(w) for w in (left, right))
    return Options(float(scale), left, right, float(softcap), bool(causal))


def check_index_array(x, name, ndim, length=None):
    """An integer array converted to contiguous int64 after its range is checked."""
    try:
        arr = np.asarray(x)
    except Exception:  # noqa: BLE001
        raise ShapeError(f"{name}: expected an integer array, got {type(x).__name__}") from None
    if arr.dtype.kind not in "iu":
        raise DTypeError(f"{name}: expected an integer dtype (int32), got {arr.dtype}")
    if arr.ndim != ndim:
        raise ShapeError(f"{name}: expected a {ndim}-D array, got shape {arr.shape}")
    if length is not None and arr.shape[0] != length:
        raise ShapeError(f"{name}: expected length {length}, got {arr.shape[0]}")
    if arr.size and (arr.min() < -INDEX_MAX or arr.max() > INDEX_MAX):
        raise ShapeError(f"{name}: values must fit in int32, got range "
                         f"[{arr.min()}, {arr.max()}]")
    return np.ascontiguousarray(arr, dtype=np.int64)


def check_cu_seqlens(x, name, total):
    """cu_seqlens: int (batch+1,), starts at 0, non-decreasing, ends at total."""
    cu = check_index_array(x, name, 1)
    if cu.shape[0] < 1:
        raise ShapeError(f"{name}: expected shape (batch + 1,), got {cu.shape}")
    if cu[0] != 0:
        raise ShapeError(f"{name}: must start at 0, got {cu[0]}")
    if cu.shape[0] > 1 and np.any(np.diff(cu) < 0):
        i = int(np.argmax(np.diff(cu) < 0))
        raise ShapeError(f"{name}: must be non-decreasing, got {cu[i]} then {cu[i + 1]} "
                         f"at index {i}")
    if cu[-1] != total:
        raise ShapeError(f"{name}: must end at the total number of rows ({total}), got {cu[-1]}")
    return cu


def check_out(out, shape, dtype, inputs, name="out"):
    """A caller-supplied output array: right shape/dtype, writable, contiguous
    last axis, no self-overlap, not overlapping the inputs it is computed from
    (writing in place over q itself is allowed)."""
    if not isinstance(out, np.ndarray):
        raise ShapeError(f"{name}: expected a numpy array, got {type(out).__name__}")
    if out.shape != tuple(shape):
        raise ShapeError(f"{name}: expected shape {tuple(shape)}, got {out.shape}")
    if out.dtype != dtype:
        raise DTypeError(f"{name}: expected dtype {dtype}, got {out.dtype}")
    if not out.flags.writeable:
        raise ShapeError(f"{name}: expected a writable array, got a read-only one")
    if out.size:
        isz = out.itemsize
        if (out.shape[-1] > 1 and out.strides[-1] != isz) or any(s % isz for s in out.strides):
            raise ShapeError(f"{name}: the last axis must be contiguous, got strides {out.strides}")
        if any(s == 0 and n > 1 for s, n in zip(out.strides, out.shape)):
            raise ShapeError(f"{name}: must not have zero (broadcast) strides, got {out.strides}")
        for nm, arr, inplace_ok in inputs:
            if np.may_share_memory(out, arr):
                same = (inplace_ok and out.ctypes.data == arr.ctypes.data
                        and out.strides == arr.strides and out.shape == arr.shape)
                if not same:
                    raise ShapeError(f"{name}: must not overlap {nm}")
    return out


def prepare_outputs(out, shape, q, inputs, return_lse, lse_shape):
    """The output array (allocated, or the caller's checked one) and the lse
    array (float32; float64 for float64 q) or None."""
    if out is None:
        out = np.empty(shape, dtype=q.dtype)
    else:
        check_out(out, shape, q.dtype, inputs)
    lse = None
    if return_lse:
        lse = np.empty(lse_shape, dtype=compute_dtype(q.dtype))
    return out, lse
