"""Exact merge of partial attention results by their lse (FlashInfer's
``merge_state``): attention over a union of disjoint key sets from the
attention over each set, for runners that split keys (shared-prefix caches,
cascades, KV on several NUMA nodes or machines)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _validate as V
from ._typing import Array, ArrayLike, FloatArray
from .errors import DTypeError, ShapeError

State = tuple[ArrayLike, ArrayLike]


def merge_attention_states(out_a: ArrayLike | Sequence[State], lse_a: ArrayLike | None = None,
                           out_b: ArrayLike | None = None, lse_b: ArrayLike | None = None, *,
                           out: Array | None = None) -> tuple[Array, FloatArray]:
    """Merge partial attention over disjoint key sets.

    ``merge_attention_states(out_a, lse_a, out_b, lse_b, *, out=None)`` or
    ``merge_attention_states([(out_1, lse_1), (out_2, lse_2), ...], out=None)``.

    Args:
        out_a, out_b: ``(tokens, num_heads, head_dim_v)``, the outputs of the
            partial calls (one float dtype: float32, float64, float16 or
            bfloat16), as the packed / paged functions return them.
        lse_a, lse_b: ``(num_heads, tokens)``, their lse: float32 (float64
            for float64 outputs), ``-inf`` for a row that saw no key.
        out: optional output ``(tokens, num_heads, head_dim_v)`` in the
            outputs' dtype, written in place (it may be one of the inputs).

    Returns:
        ``(out, lse)``: ``lse = logaddexp(lse_a, lse_b)``, ``out = exp(lse_a
        - lse) out_a + exp(lse_b - lse) out_b``, computed in float32 (float64
        for float64); a row whose two lse are ``-inf`` gives 0 and ``-inf``,
        a NaN propagates. The list form merges left to right (one state: a
        copy). Elementwise, so deterministic and independent of threads.

    Raises:
        ShapeError / DTypeError: mismatched shapes or dtypes, naming the
            argument.
    Examples:
        Attention over 32 keys, as two calls over 16 keys each and a merge:

        >>> rng = np.random.default_rng(0)
        >>> pages = rng.standard_normal((2, 16, 1, 64), dtype=np.float32)
        >>> q = rng.standard_normal((1, 2, 64), dtype=np.float32)
        >>> lens = np.array([16], np.int32)
        >>> a = cpuattn.paged_attention(q, pages, pages, np.array([[0]]), lens, return_lse=True)
        >>> b = cpuattn.paged_attention(q, pages, pages, np.array([[1]]), lens, return_lse=True)
        >>> out, lse = cpuattn.merge_attention_states(*a, *b)
        >>> whole = cpuattn.paged_attention(q, pages, pages, np.array([[0, 1]]),
        ...                                 np.array([32], np.int32))
        >>> bool(np.allclose(out, whole, atol=1e-6))
        True
    """
    if isinstance(out_a, (list, tuple)) and lse_a is None and out_b is None and lse_b is None:
        states = [_state(s, i) for i, s in enumerate(out_a)]
        if not states:
            raise ShapeError("states: expected at least one (out, lse) pair, got none")
        acc_o, acc_l = states[0]
        for i, (o, l) in enumerate(states[1:], 1):
            _match(acc_o, acc_l, o, l, f"states[{i}]")
            acc_o, acc_l = _merge(acc_o, acc_l, o, l, out if i == len(states) - 1 else None)
        if len(states) == 1:
            acc_o, acc_l = _merge(acc_o, acc_l, None, None, out)
        return acc_o, acc_l
    if lse_a is None or out_b is None or lse_b is None:
        raise ShapeError("merge_attention_states: expected (out_a, lse_a, out_b, lse_b) or one "
                         "list of (out, lse) pairs")
    oa, la = _state((out_a, lse_a), None)
    ob, lb = _state((out_b, lse_b), None, "_b")
    _match(oa, la, ob, lb, "out_b")
    return _merge(oa, la, ob, lb, out)


def _state(state: Any, i: int | None, suffix: str = "_a") -> tuple[Array, Array]:
    """A checked (out, lse) pair: out (tokens, H, Dv) float, lse (H, tokens)
    in its compute dtype."""
    on, ln = ("out" + suffix, "lse" + suffix) if i is None else (f"states[{i}][0]",
                                                                f"states[{i}][1]")
    try:
        o, lse = state
    except (TypeError, ValueError):
        raise ShapeError(f"states[{i}]: expected an (out, lse) pair, got "
                         f"{type(state).__name__}") from None
    o, lse = V.as_array(o, on), V.as_array(lse, ln)
    V.check_ndim(o, on, 3, "(tokens, num_heads, head_dim_v)")
    want = V.compute_dtype(o.dtype)
    if lse.dtype != want:
        raise DTypeError(f"{ln}: expected dtype {want} for {o.dtype} outputs, got {lse.dtype}")
    if lse.shape != (o.shape[1], o.shape[0]):
        raise ShapeError(f"{ln}: expected shape {(o.shape[1], o.shape[0])} (num_heads, tokens) "
                         f"for {on} of shape {o.shape}, got {lse.shape}")
    return o, lse


def _match(oa, la, ob, lb, name):
    if ob.shape != oa.shape:
        raise ShapeError(f"{name}: expected shape {oa.shape} (as the first state), got {ob.shape}")
    if ob.dtype != oa.dtype:
        raise DTypeError(f"{name}: expected dtype {oa.dtype} (as the first state), "
                           f"got {ob.dtype}")


def _merge(oa, la, ob, lb, out):
    """One exact merge (ob None: a copy of oa), into out when given."""
    ct = V.compute_dtype(oa.dtype)
    with np.errstate(all="ignore"):
        if ob is None:
            lse = la.copy()
            merged = oa.astype(ct)
        else:
            lse = np.logaddexp(la, lb)
            empty = np.isneginf(lse)
            wa = np.where(empty, 0, np.exp(la - lse)).astype(ct).T[..., None]
            wb = np.where(empty, 0, np.exp(lb - lse)).astype(ct).T[..., None]
            merged = wa * oa.astype(ct, copy=False) + wb * ob.astype(ct, copy=False)
    if out is None:
        return merged.astype(oa.dtype, copy=False), lse
    inputs = [("out_a", oa, True)] + ([] if ob is None else [("out_b", ob, True)])
    V.check_out(out, oa.shape, oa.dtype, inputs)
    out[...] = merged
    return out, lse
