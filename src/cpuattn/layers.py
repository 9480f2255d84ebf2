"""Llama-style building blocks on top of the cpuattn kernels (numpy only).

:class:`GQAttention` is one grouped-query attention layer: Q/K/V/O
projections, optional RoPE, a KV cache (dense :class:`cpuattn.KVCache`, a
:class:`cpuattn.PagePool` with a list of sequence ids, or a plan of a
multi-layer pool's step) so that decoding one token at a time gives the same
output as one full pass.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from . import _validate as V
from ._plan import PoolPlan
from ._typing import Array, ArrayLike, DTypeLike, SeqId
from .dense import attention
from .errors import DTypeError, ShapeError
from .kvcache import KVCache, _dtype, _positive_int

if TYPE_CHECKING:
    from ._pool import PagePool


def rope(x: Array, positions: ArrayLike, theta: float) -> Array:
    """Llama rotary embedding (rotate-half convention) at absolute positions.

    Args:
        x: ``(batch, seq, heads, head_dim)`` float32/float64, head_dim even.
        positions: integer ``(batch, seq)``.
        theta: RoPE base (``rope_theta``), > 0.

    Returns:
        Rotated array, same shape and dtype: with ``x = [x1, x2]`` (halves of
        the last axis) and angle ``pos * theta ** (-2i / head_dim)``, the
        result is ``[x1 cos - x2 sin, x2 cos + x1 sin]``.
    """
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (np.arange(half, dtype=np.float64) * 2.0 / x.shape[-1])
    ang = np.asarray(positions, dtype=np.float64)[..., None] * inv_freq   # (B, S, half)
    cos = np.cos(ang).astype(x.dtype)[:, :, None, :]
    sin = np.sin(ang).astype(x.dtype)[:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _is_paged(cache):
    return (isinstance(cache, (tuple, list)) and len(cache) == 2
            and hasattr(cache[0], "attention") and hasattr(cache[0], "append"))


class GQAttention:
    """Grouped-query attention layer (MHA when num_kv_heads == num_heads, MQA at 1).

    Args:
        d_model: model width.
        num_heads: query heads ``H``.
        num_kv_heads: key/value heads ``Hkv``; ``H % Hkv == 0``.
        head_dim: ``D``; default ``d_model // num_heads`` (then d_model must
            be divisible by num_heads).
        causal: bottom-right causal attention over the cache (default True).
        rope_theta: RoPE base; ``None`` disables RoPE. Needs an even head_dim.
        dtype: float32 (default), float64, float16 or bfloat16: weights,
            Q/K/V and cache storage. Projections compute in float64 for
            float64, float32 otherwise.
        seed: seed of the random initial weights (normal, std 1/sqrt(fan_in)).

    Weights (settable: shape checked, converted to ``dtype``):
        ``wq (d_model, H*D)``, ``wk``/``wv (d_model, Hkv*D)``, ``wo (H*D, d_model)``;
        ``y = x @ w``.

    Raises ShapeError for an inconsistent configuration, DTypeError for an
    unsupported dtype.
    """

    d_model: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    rope_theta: float | None
    dtype: np.dtype[Any]

    def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, *,
                 head_dim: int | None = None, causal: bool = True,
                 rope_theta: float | None = None, dtype: DTypeLike = "float32",
                 seed: int | None = 0) -> None:
        self.d_model = _positive_int(d_model, "d_model")
        self.num_heads = _positive_int(num_heads, "num_heads")
        self.num_kv_heads = _positive_int(num_kv_heads, "num_kv_heads")
        if self.num_heads % self.num_kv_heads:
            raise ShapeError(f"num_heads: expected a multiple of num_kv_heads "
                             f"({self.num_kv_heads}), got {self.num_heads}")
        if head_dim is None:
            if self.d_model % self.num_heads:
                raise ShapeError(f"d_model: expected a multiple of num_heads ({self.num_heads}) "
                                 f"when head_dim is None, got {self.d_model}; pass head_dim")
            head_dim = self.d_model // self.num_heads
        self.head_dim = _positive_int(head_dim, "head_dim")
        if not isinstance(causal, (bool, np.bool_)):
            raise ShapeError(f"causal: expected a bool, got {causal!r}")
        self.causal = bool(causal)
        if rope_theta is not None:
            if isinstance(rope_theta, (bool, np.bool_)) or not isinstance(rope_theta, numbers.Real) \
                    or not rope_theta > 0 or not np.isfinite(rope_theta):
                raise ShapeError(f"rope_theta: expected a finite number > 0 or None, "
                                 f"got {rope_theta!r}")
            if self.head_dim % 2:
                raise ShapeError(f"head_dim: RoPE needs an even head_dim, got {self.head_dim}")
            rope_theta = float(rope_theta)
        self.rope_theta = rope_theta
        self.dtype = _dtype(dtype)
        self._cdt = V.compute_dtype(self.dtype)
        rng = np.random.default_rng(seed)
        try:
            self._w = {name: (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(self.dtype)
                       for name, shape in self._weight_shapes().items()}
        except ValueError:   # numpy: no array can have this many elements
            raise ShapeError(f"d_model/num_heads/head_dim: weight shapes "
                             f"{list(self._weight_shapes().values())} are too large") from None

    def _weight_shapes(self):
        hd, kd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"wq": (self.d_model, hd), "wk": (self.d_model, kd),
                "wv": (self.d_model, kd), "wo": (hd, self.d_model)}

    def _set(self, name, value):
        arr = np.asarray(value)
        if arr.dtype.kind != "f" and arr.dtype.name != "bfloat16":
            raise DTypeError(f"{name}: expected a floating-point array, got {arr.dtype}")
        shape = self._weight_shapes()[name]
        if arr.shape != shape:
            raise ShapeError(f"{name}: expected shape {shape}, got {arr.shape}")
        self._w[name] = np.array(arr, dtype=self.dtype)      # own copy

    wq = property(lambda self: self._w["wq"], lambda self, a: self._set("wq", a),
                  doc="Query projection ``(d_model, num_heads * head_dim)``.")
    wk = property(lambda self: self._w["wk"], lambda self, a: self._set("wk", a),
                  doc="Key projection ``(d_model, num_kv_heads * head_dim)``.")
    wv = property(lambda self: self._w["wv"], lambda self, a: self._set("wv", a),
                  doc="Value projection ``(d_model, num_kv_heads * head_dim)``.")
    wo = property(lambda self: self._w["wo"], lambda self, a: self._set("wo", a),
                  doc="Output projection ``(num_heads * head_dim, d_model)``.")

    def new_cache(self, batch: int, capacity: int = 16) -> KVCache:
        """An empty :class:`KVCache` matching this layer for ``batch`` sequences."""
        return KVCache(batch, self.num_kv_heads, self.head_dim, dtype=self.dtype,
                       capacity=capacity)

    def __repr__(self) -> str:
        return (f"GQAttention(d_model={self.d_model}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"causal={self.causal}, rope_theta={self.rope_theta}, dtype={self.dtype.name})")

    def _proj(self, x, name):
        w = self._w[name]
        return x @ (w if w.dtype == self._cdt else w.astype(self._cdt))

    @overload
    def __call__(self, x: ArrayLike, cache: KVCache | None = ..., *,
                 lengths: ArrayLike | None = ..., slots: ArrayLike | None = ...,
                 layer: int = ...) -> tuple[Array, KVCache]: ...
    @overload
    def __call__(self, x: ArrayLike, cache: tuple[PagePool, Sequence[SeqId]], *,
                 lengths: ArrayLike | None = ..., slots: ArrayLike | None = ...,
                 layer: int = ...) -> tuple[Array, tuple[PagePool, Sequence[SeqId]]]: ...
    @overload
    def __call__(self, x: ArrayLike, cache: PoolPlan, *, lengths: ArrayLike | None = ...,
                 slots: ArrayLike | None = ..., layer: int = ...) -> tuple[Array, PoolPlan]: ...
    def __call__(self, x: ArrayLike, cache: Any = None, *, lengths: ArrayLike | None = None,
                 slots: ArrayLike | None = None, layer: int = 0) -> tuple[Array, Any]:
        """Run the layer on new tokens, appending their K/V to the cache.

        Args:
            x: ``(batch, seq, d_model)`` float array, the new tokens of each
                sequence (right-padded when ``lengths`` is given).
            cache: ``None`` (a new :class:`KVCache` is made), a
                :class:`KVCache` for ``batch`` sequences, or a pair
                ``(pool, seq_ids)`` of a :class:`cpuattn.PagePool` and
                ``batch`` sequence ids, or a plan ``pool.plan(seq_ids, ...)``
                of a serving step (see below).
            lengths: optional int ``(batch,)``: sequence ``b`` has
                ``lengths[b] <= seq`` real tokens, the rest of its rows are
                padding (not cached; their output rows are 0).
            slots, layer: with a plan only: the slots ``pool.reserve`` gave
                the new tokens, concatenated in batch order (int
                ``(sum(lengths),)``), and this layer's index in the pool.

        With a plan the runner owns the step: it reserved ``lengths[b]``
        tokens of every sequence, planned them (a decode plan when every
        sequence has one new token, else with ``cu_seqlens_q``), and calls
        each layer with the same plan and slots; the layer writes its K/V
        into the slots (``pool.write``) and runs the plan over its layer.
        Positions (RoPE) are ``seq_lens - lengths`` onwards.

        Returns:
            ``(y, cache)``: ``y (batch, seq, d_model)`` in the layer dtype and
            the cache (the same object, or the new one). Token ``i`` of
            sequence ``b`` sits at absolute position ``cache_len[b] + i``
            (RoPE) and attends, bottom-right causally, to the whole cache.

        Raises ShapeError / DTypeError on bad input, PoolFullError when the
        pool cannot hold the new tokens (the pool is left unchanged).
        """
        x = V.as_array(x, "x")
        V.check_ndim(x, "x", 3, "(batch, seq, d_model)")
        if x.shape[2] != self.d_model:
            raise ShapeError(f"x: expected last axis d_model={self.d_model}, got shape {x.shape}")
        bsz, seq = x.shape[:2]
        if lengths is None:
            counts = np.full(bsz, seq, dtype=np.int64)
        else:
            counts = V.check_index_array(lengths, "lengths", 1, bsz)
            if counts.size and (counts.min() < 0 or counts.max() > seq):
                raise ShapeError(f"lengths: expected values in [0, {seq}], got range "
                                 f"[{counts.min()}, {counts.max()}]")
        if isinstance(cache, PoolPlan):
            return self._planned(x, cache, counts, slots, layer), cache
        if slots is not None or layer != 0:
            raise ShapeError(f"{'slots' if slots is not None else 'layer'}: only taken with a "
                             f"plan as the cache (a pool's layers have their own plan runs)")
        paged = _is_paged(cache)
        if paged:
            pool, seqs = cache
            if len(seqs) != bsz:
                raise ShapeError(f"cache: expected {bsz} sequence ids (the batch of x), "
                                 f"got {len(seqs)}")
            start = np.array([pool.seq_len(s) for s in seqs], dtype=np.int64)
        else:
            if cache is None:
                cache = self.new_cache(bsz, capacity=max(16, seq))
            self._check_cache(cache, bsz)
            start = cache.seq_lens.copy()

        q, k, v = self._qkv(x, start)
        if paged:
            o = self._paged(q, k, v, pool, seqs, start, counts)
        else:
            o = self._dense(q, k, v, cache, start, counts, lengths is None)
        return self._out(o), cache

    def _qkv(self, x, start):
        """q, k, v (batch, seq, heads, head_dim) in the layer dtype, RoPE at
        positions start[b] + i."""
        bsz, seq = x.shape[:2]
        h, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        xc = x.astype(self._cdt, copy=False)
        q = self._proj(xc, "wq").reshape(bsz, seq, h, d)
        k = self._proj(xc, "wk").reshape(bsz, seq, hkv, d)
        v = self._proj(xc, "wv").reshape(bsz, seq, hkv, d)
        if self.rope_theta is not None:
            pos = start[:, None] + np.arange(seq)
            q, k = rope(q, pos, self.rope_theta), rope(k, pos, self.rope_theta)
        return tuple(a.astype(self.dtype, copy=False) for a in (q, k, v))

    def _out(self, o):
        bsz, seq = o.shape[:2]
        y = self._proj(o.reshape(bsz, seq, -1).astype(self._cdt, copy=False), "wo")
        return y.astype(self.dtype, copy=False)

    def _planned(self, x, plan, counts, slots, layer):
        """The layer over a plan of reserved slots: write K/V, run the plan."""
        bsz = x.shape[0]
        lens = plan.seq_lens.astype(np.int64)
        cu = plan.cu_seqlens_q
        nq = np.ones(plan.batch_size, np.int64) if cu is None else np.diff(cu).astype(np.int64)
        if plan.batch_size != bsz or not np.array_equal(nq, counts):
            raise ShapeError(f"cache: the plan's queries per sequence {nq.tolist()} are not "
                             f"the new tokens of x (lengths {counts.tolist()})")
        if slots is None:
            raise ShapeError("slots: a plan needs the slots pool.reserve gave the new tokens")
        slots = V.check_slots(slots)
        if slots.shape[0] != int(counts.sum()):
            raise ShapeError(f"slots: expected {int(counts.sum())} slots (sum of lengths), "
                             f"got {slots.shape[0]}")
        q, k, v = self._qkv(x, lens - counts)
        rows = [b for b in range(bsz) if counts[b]]
        pack = (lambda a: np.concatenate([a[b, :counts[b]] for b in rows])) if rows else \
            (lambda a: a[:, :0].reshape((0,) + a.shape[2:]))
        plan.pool.write(layer, slots, pack(k), pack(v))
        op = plan.run(pack(q), layer=layer, causal=self.causal)
        o = np.zeros(q.shape, dtype=q.dtype)
        at = 0
        for b in rows:
            o[b, :counts[b]] = op[at:at + counts[b]]
            at += counts[b]
        return self._out(o)

    def _check_cache(self, cache, bsz):
        if not isinstance(cache, KVCache):
            raise ShapeError(f"cache: expected None, a KVCache or a (PagePool, seq_ids) pair, "
                             f"got {type(cache).__name__}")
        if (cache.batch, cache.num_kv_heads, cache.head_dim) != (bsz, self.num_kv_heads,
                                                                 self.head_dim):
            raise ShapeError(f"cache: expected (batch, num_kv_heads, head_dim) = "
                             f"({bsz}, {self.num_kv_heads}, {self.head_dim}), got "
                             f"({cache.batch}, {cache.num_kv_heads}, {cache.head_dim})")
        if cache.dtype != self.dtype:
            raise DTypeError(f"cache: expected dtype {self.dtype} (the layer's), got {cache.dtype}")

    def _dense(self, q, k, v, cache, start, counts, full):
        cache.append(k, v, None if full else counts)
        if full and np.all(start == start[0]):
            # equal lengths: one batched call, the cache view costs no copy
            return attention(q, cache.keys(), cache.values(), causal=self.causal)
        o = np.zeros(q.shape, dtype=q.dtype)
        for b in range(q.shape[0]):
            n = int(counts[b])
            if n:
                o[b:b + 1, :n] = attention(q[b:b + 1, :n], cache.keys(b)[None],
                                           cache.values(b)[None], causal=self.causal)
        return o

    def _paged(self, q, k, v, pool, seqs, start, counts):
        done = []
        try:
            for b, s in enumerate(seqs):
                if counts[b]:
                    pool.append(s, k[b, :counts[b]], v[b, :counts[b]])
                    done.append(b)
        except BaseException:
            for b in done:              # all-or-nothing over the batch
                pool.truncate(seqs[b], int(start[b]))
            raise
        cu = np.zeros(len(seqs) + 1, dtype=np.int32)
        np.cumsum(counts, out=cu[1:])
        qp = np.concatenate([q[b, :counts[b]] for b in range(len(seqs))])
        op = pool.attention(qp, list(seqs), cu_seqlens_q=cu, causal=self.causal)
        o = np.zeros(q.shape, dtype=q.dtype)
        for b in range(len(seqs)):
            o[b, :counts[b]] = op[cu[b]:cu[b + 1]]
        return o


__all__ = ["GQAttention", "rope"]
