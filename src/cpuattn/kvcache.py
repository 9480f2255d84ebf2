"""A growing dense KV cache for one attention layer.

Storage is ``(batch, capacity, num_kv_heads, head_dim)`` for keys and for
values, token-major like every cpuattn array, so ``cache.keys()`` can go to
:func:`cpuattn.attention` without a copy. Capacity doubles when an append does
not fit: n appends cost O(n) copies in all (amortised O(1) each) and
O(log n) reallocations.
"""
from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from . import _validate as V
from ._typing import Array, ArrayLike, DTypeLike, NDArray
from .errors import DTypeError, ShapeError


def _dtype(dtype):
    """numpy dtype of a name or dtype among float32/float64/float16/bfloat16."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        if str(dtype) != "bfloat16":
            raise DTypeError(f"dtype: expected float32, float64, float16 or bfloat16, "
                             f"got {dtype!r}") from None
        try:
            import ml_dtypes
        except ImportError:
            raise DTypeError("dtype: bfloat16 needs the ml_dtypes package "
                             "(pip install ml_dtypes)") from None
        dt = np.dtype(ml_dtypes.bfloat16)
    if dt.name not in ("float32", "float64", "float16", "bfloat16"):
        raise DTypeError(f"dtype: expected float32, float64, float16 or bfloat16, got {dt}")
    return dt


def _positive_int(x, name, minimum=1):
    """An int in [minimum, 2**31 - 1] (sizes and positions fit int32), or ShapeError."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral) \
            or not minimum <= x <= V.INDEX_MAX:
        raise ShapeError(f"{name}: expected an int in [{minimum}, {V.INDEX_MAX}], got {x!r}")
    return int(x)


def _zeros(shape, dtype, name):
    """np.zeros, with a shape too large for any array reported as a ShapeError
    (an array that is merely too large for this machine is a MemoryError)."""
    try:
        return np.zeros(shape, dtype=dtype)
    except ValueError:
        raise ShapeError(f"{name}: shape {shape} is too large for an array") from None


class KVCache:
    """Dense per-layer KV cache with per-sequence lengths.

    Args:
        batch: number of sequences (slots).
        num_kv_heads, head_dim: per-token K/V shape ``(num_kv_heads, head_dim)``.
        dtype: storage dtype, float32 (default), float64, float16 or bfloat16.
        capacity: initial number of positions per sequence (grows by doubling).

    Attributes:
        seq_lens: int64 ``(batch,)``, the number of tokens each sequence holds
            (a read-only view; change it with :meth:`append`, :meth:`reset`).
        capacity: positions allocated per sequence.
        num_reallocations: how many times the storage grew.

    Sequences may hold different numbers of tokens; slots past a sequence's
    length contain stale data that :meth:`keys`/:meth:`values` never expose
    for that sequence alone. Raises ShapeError / DTypeError on bad arguments.
    """

    batch: int
    num_kv_heads: int
    head_dim: int
    dtype: np.dtype[Any]
    num_reallocations: int

    def __init__(self, batch: int, num_kv_heads: int, head_dim: int, *,
                 dtype: DTypeLike = "float32", capacity: int = 16) -> None:
        self.batch = _positive_int(batch, "batch")
        self.num_kv_heads = _positive_int(num_kv_heads, "num_kv_heads")
        self.head_dim = _positive_int(head_dim, "head_dim")
        self.dtype = _dtype(dtype)
        cap = _positive_int(capacity, "capacity")
        shape = (self.batch, cap, self.num_kv_heads, self.head_dim)
        self._k = _zeros(shape, self.dtype, "KVCache")
        self._v = _zeros(shape, self.dtype, "KVCache")
        self._lens = np.zeros(self.batch, dtype=np.int64)
        self.num_reallocations = 0

    @property
    def capacity(self) -> int:
        return self._k.shape[1]

    @property
    def seq_lens(self) -> NDArray[np.int64]:
        view = self._lens.view()
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        """The length of the longest sequence."""
        return int(self._lens.max())

    def __repr__(self) -> str:
        return (f"KVCache(batch={self.batch}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, dtype={self.dtype.name}, "
                f"seq_lens={self._lens.tolist()}, capacity={self.capacity})")

    def _grow(self, needed):
        cap = self.capacity
        while cap < needed:
            cap *= 2
        used = len(self)
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = np.zeros((self.batch, cap) + old.shape[2:], dtype=self.dtype)
            new[:, :used] = old[:, :used]
            setattr(self, name, new)
        self.num_reallocations += 1

    def append(self, k: ArrayLike, v: ArrayLike,
               lengths: ArrayLike | None = None) -> NDArray[np.int64]:
        """Append new tokens to every sequence.

        Args:
            k, v: ``(batch, n, num_kv_heads, head_dim)``, any float dtype
                (converted to the cache dtype).
            lengths: optional int ``(batch,)``: sequence ``b`` appends only its
                first ``lengths[b]`` rows (``0 <= lengths[b] <= n``); the rest
                are padding and are ignored. Default: all ``n`` rows.

        Returns:
            int64 ``(batch,)``: each sequence's length before the append (the
            absolute position of its first new token).

        Raises ShapeError (shapes, lengths out of range) or DTypeError. On
        error nothing changes.
        """
        k, v = V.as_array(k, "k"), V.as_array(v, "v")
        want = (self.batch, None, self.num_kv_heads, self.head_dim)
        layout = "(batch, n, num_kv_heads, head_dim)"
        for name, a in (("k", k), ("v", v)):
            V.check_ndim(a, name, 4, layout)
            if a.shape[0] != self.batch or a.shape[2:] != want[2:]:
                raise ShapeError(f"{name}: expected shape ({self.batch}, n, {self.num_kv_heads}, "
                                 f"{self.head_dim}), got {a.shape}")
        if v.shape[1] != k.shape[1]:
            raise ShapeError(f"v: expected n {k.shape[1]} (as k), got {v.shape[1]}")
        n = k.shape[1]
        if lengths is None:
            counts = np.full(self.batch, n, dtype=np.int64)
        else:
            counts = V.check_index_array(lengths, "lengths", 1, self.batch)
            if counts.size and (counts.min() < 0 or counts.max() > n):
                raise ShapeError(f"lengths: expected values in [0, {n}], got range "
                                 f"[{counts.min()}, {counts.max()}]")
        start = self._lens.copy()
        end = start + counts
        if end.size and end.max() > self.capacity:
            self._grow(int(end.max()))
        if lengths is None and np.all(start == start[0]):
            s = int(start[0])
            self._k[:, s:s + n] = k
            self._v[:, s:s + n] = v
        else:
            for b in range(self.batch):
                c, s = int(counts[b]), int(start[b])
                self._k[b, s:s + c] = k[b, :c]
                self._v[b, s:s + c] = v[b, :c]
        self._lens[:] = end
        return start

    def keys(self, seq: int | None = None) -> Array:
        """View (no copy) of the cached keys.

        ``keys()`` is ``(batch, len(self), num_kv_heads, head_dim)``: rows past
        a shorter sequence's length are stale and must be masked by the caller
        (or use ``keys(b)``). ``keys(b)`` is ``(seq_lens[b], num_kv_heads,
        head_dim)`` for sequence ``b``. An out-of-range ``seq`` raises ShapeError.
        """
        return self._view(self._k, seq)

    def values(self, seq: int | None = None) -> Array:
        """View (no copy) of the cached values; as :meth:`keys`."""
        return self._view(self._v, seq)

    def _view(self, arr, seq):
        if seq is None:
            return arr[:, :len(self)]
        b = self._seq_index(seq)
        return arr[b, :self._lens[b]]

    def _seq_index(self, seq):
        if isinstance(seq, (bool, np.bool_)) or not isinstance(seq, numbers.Integral) \
                or not 0 <= seq < self.batch:
            raise ShapeError(f"seq: expected a sequence index in [0, {self.batch}), got {seq!r}")
        return int(seq)

    def reset(self, seqs: int | ArrayLike | None = None) -> None:
        """Empty all sequences (``seqs=None``) or the listed sequence indices.

        Memory is kept for reuse; stale rows stay but are never exposed.
        """
        if seqs is None:
            self._lens[:] = 0
        else:
            idx = [self._seq_index(s) for s in np.atleast_1d(seqs).tolist()]
            self._lens[idx] = 0


__all__ = ["KVCache"]
