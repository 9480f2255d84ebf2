"""PyTorch adapter: cpuattn attention on torch CPU tensors, autograd-aware.

Import it explicitly (``import cpuattn.torch``); ``import cpuattn`` never
imports torch. Tensors cross into numpy without a copy where numpy can view
them (float32, float64, float16; bfloat16 is reinterpreted through int16 as
``ml_dtypes.bfloat16``); a tensor whose last axis is not contiguous is copied
once. The backward pass is :func:`cpuattn.attention_backward`.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from . import backward as _backward
from . import dense as _dense
from ._typing import Array, Window
from .errors import DTypeError, ShapeError

_NUMPY_VIEWABLE = (torch.float32, torch.float64, torch.float16)


def _to_numpy(t: torch.Tensor, name: str) -> Array:
    """Zero-copy numpy view of a CPU tensor (bfloat16 as ml_dtypes.bfloat16)."""
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ShapeError(f"{name}: expected a CPU tensor, got one on {t.device}")
    t = t.detach()
    if t.dtype == torch.bfloat16:
        try:
            import ml_dtypes
        except ImportError:
            raise DTypeError(f"{name}: bfloat16 needs the ml_dtypes package") from None
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype not in _NUMPY_VIEWABLE:
        raise DTypeError(f"{name}: expected dtype float32, float64, float16 or bfloat16, "
                         f"got {t.dtype}")
    return t.numpy()


def _to_torch(a: Array) -> torch.Tensor:
    """Zero-copy tensor over a numpy array (ml_dtypes.bfloat16 as torch.bfloat16)."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _head_vector(x: torch.Tensor | None, name: str) -> Array | None:
    """sinks / alibi_slopes as float64 numpy (any float tensor or array)."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ShapeError(f"{name}: expected a CPU tensor, got one on {x.device}")
        x = x.detach()
        if not x.dtype.is_floating_point:
            raise DTypeError(f"{name}: expected a float tensor, got {x.dtype}")
        return x.to(torch.float64).numpy()
    return np.asarray(x)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, causal, scale, window, softcap, alibi_slopes):
        opts = dict(causal=causal, scale=scale, window=window, softcap=softcap,
                    sinks=_head_vector(sinks, "sinks"),
                    alibi_slopes=_head_vector(alibi_slopes, "alibi_slopes"))
        arrays = [_to_numpy(t, n) for t, n in ((q, "q"), (k, "k"), (v, "v"))]
        out, lse = _dense.attention(*arrays, return_lse=True, **opts)
        out_t = _to_torch(out)
        ctx.save_for_backward(q, k, v, out_t)
        ctx.lse = lse
        ctx.opts = opts
        ctx.sinks_dtype = None if sinks is None else sinks.dtype
        return out_t

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out = ctx.saved_tensors
        grads = _backward.attention_backward(
            _to_numpy(dout, "dout"), _to_numpy(q, "q"), _to_numpy(k, "k"), _to_numpy(v, "v"),
            _to_numpy(out, "out"), ctx.lse, **ctx.opts)
        dsinks = None
        if ctx.sinks_dtype is not None:
            dsinks = torch.from_numpy(grads[3]).to(ctx.sinks_dtype)
        return (_to_torch(grads[0]), _to_torch(grads[1]), _to_torch(grads[2]), dsinks,
                None, None, None, None, None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None, window: Window = (-1, -1),
              softcap: float = 0.0, sinks: torch.Tensor | None = None,
              alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`cpuattn.attention` on torch CPU tensors, differentiable.

    Args:
        q: ``(batch, seq_q, num_heads, head_dim)`` (cpuattn's token-major
            layout; a ``(B, H, S, D)`` tensor passed as ``x.transpose(1, 2)``
            costs no copy).
        k: ``(batch, seq_k, num_kv_heads, head_dim)``.
        v: ``(batch, seq_k, num_kv_heads, head_dim_v)``. q, k, v share one
            dtype: torch.float32, float64, float16 or bfloat16 (bfloat16 needs
            the ``ml_dtypes`` package).
        causal, scale, window, softcap: as :func:`cpuattn.attention`
            (bottom-right aligned causal mask).
        sinks: optional float tensor ``(num_heads,)``: per-head sink logits,
            differentiable (their gradient comes back in the sinks' dtype).
        alibi_slopes: optional float ``(num_heads,)`` ALiBi slopes (no gradient).

    Returns:
        ``(batch, seq_q, num_heads, head_dim_v)`` tensor in q's dtype. When an
        input requires grad, backward runs :func:`cpuattn.attention_backward`
        (dk/dv summed over each KV group); double backward is not supported.

    Raises ShapeError (e.g. a non-CPU tensor) / DTypeError as the numpy API.
    """
    return _Attention.apply(q, k, v, sinks, causal, scale, window, softcap, alibi_slopes)


__all__ = ["attention"]
