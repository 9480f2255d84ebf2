"""PyTorch adapter: cpuattn attention on torch CPU tensors, autograd-aware and
compilable.

Import it explicitly (``import cpuattn.torch``); ``import cpuattn`` never
imports torch. Tensors cross into numpy without a copy where numpy can view
them (float32, float64, float16; bfloat16 is reinterpreted through int16 as
``ml_dtypes.bfloat16``); a tensor whose last axis is not contiguous is copied
once. The results come back as tensors over the kernels' own output arrays
(no copy either).

The work runs in ``torch.library`` custom operators, so ``torch.compile(...,
fullgraph=True)`` traces through :func:`attention` and
:func:`paged_attention` (fake implementations give the output shapes):

- ``torch.ops.cpuattn.attention(q, k, v, sinks, alibi_slopes, causal, scale,
  window_left, window_right, softcap) -> (out, lse)``, differentiable
  through ``torch.ops.cpuattn.attention_backward`` (:func:`cpuattn.attention_backward`);
- ``torch.ops.cpuattn.paged_attention(q, k_pages, v_pages, block_table,
  seq_lens, cu_seqlens_q, k_scale, v_scale, sinks, alibi_slopes, tree_mask,
  causal, scale, window_left, window_right, softcap) -> (out, lse)``,
  forward only.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import _validate as V
from . import backward as _backward
from . import dense as _dense
from . import paged as _paged
from ._typing import Array, Window
from .errors import CpuAttnError, DTypeError, ShapeError

_NUMPY_VIEWABLE = (torch.float32, torch.float64, torch.float16)
# fp8 pages cross as uint8 bytes, reinterpreted as these ml_dtypes names
_FLOAT8 = {torch.float8_e4m3fn: "float8_e4m3fn", torch.float8_e5m2: "float8_e5m2"}
Tensor = torch.Tensor


def _check_cpu_tensor(t: Tensor, name: str) -> Tensor:
    if not isinstance(t, torch.Tensor):
        raise DTypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ShapeError(f"{name}: expected a CPU tensor, got one on {t.device}")
    return t.detach()


def _ml_dtype(name: str, what: str) -> Any:
    try:
        import ml_dtypes
    except ImportError:
        raise DTypeError(f"{what}: {name} needs the ml_dtypes package") from None
    return getattr(ml_dtypes, name)


def _to_numpy(t: torch.Tensor, name: str) -> Array:
    """Zero-copy numpy view of a CPU tensor (bfloat16 as ml_dtypes.bfloat16)."""
    t = _check_cpu_tensor(t, name)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_ml_dtype("bfloat16", name))
    if t.dtype not in _NUMPY_VIEWABLE:
        raise DTypeError(f"{name}: expected dtype float32, float64, float16 or bfloat16, "
                         f"got {t.dtype}")
    return t.numpy()


def _to_torch(a: Array) -> torch.Tensor:
    """Zero-copy tensor over a numpy array (ml_dtypes.bfloat16 as torch.bfloat16)."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _plain_numpy(t: Tensor, name: str) -> Array:
    """Zero-copy numpy view of an index, mask or scale tensor; cpuattn checks
    its dtype and values."""
    t = _check_cpu_tensor(t, name)
    if t.dtype == torch.bfloat16 or t.dtype in _FLOAT8 or t.is_complex():
        raise DTypeError(f"{name}: expected an integer, bool or float32/float16 tensor, "
                         f"got {t.dtype}")
    return t.numpy()


def _pages_to_numpy(t: Tensor, name: str) -> Array:
    """Zero-copy numpy view of KV pages: the float dtypes as :func:`_to_numpy`,
    int8 and uint8 (int4 pairs) as they are, fp8 as the ml_dtypes fp8 dtypes."""
    if isinstance(t, torch.Tensor) and t.dtype in _FLOAT8:
        t = _check_cpu_tensor(t, name)
        return t.view(torch.uint8).numpy().view(_ml_dtype(_FLOAT8[t.dtype], name))
    if isinstance(t, torch.Tensor) and t.dtype in (torch.int8, torch.uint8):
        return _plain_numpy(t, name)
    return _to_numpy(t, name)


def _head_vector(x: Tensor | None, name: str) -> Array | None:
    """sinks / alibi_slopes as float64 numpy (any float tensor)."""
    if x is None:
        return None
    x = _check_cpu_tensor(x, name)
    if not x.dtype.is_floating_point:
        raise DTypeError(f"{name}: expected a float tensor, got {x.dtype}")
    return x.to(torch.float64).numpy()


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _options(causal: bool, scale: float | None, window: Window, softcap: float
             ) -> tuple[bool, float | None, int, int, float]:
    """The options as the ops' schema takes them (window as two ints), checked
    by cpuattn's own rules so that eager calls raise its errors. Under
    torch.compile the numbers may be symbolic (``dynamic=True``), which
    Python checks cannot read: they go to the op as they are, and the op's
    real call checks them by the same rules when it runs."""
    if torch.compiler.is_compiling():
        left, right = window
        return causal, scale, left, right, softcap
    opts = V.check_options(scale, window, softcap, causal, 1)
    return (opts.causal, None if scale is None else opts.scale, opts.window_left,
            opts.window_right, opts.softcap)


def _direct(*tensors: Tensor | None) -> bool:
    """Whether an eager call may run an op's implementation itself: nothing
    needs a gradient, the tensors are plain (no fake or functional tensor
    subclass) and no torch function or dispatch mode (a tracer,
    FlopCounterMode) must see the op. It skips the dispatcher's Python
    layers, which cost more than the kernel of a small decode call (fastest
    of 9 rounds, B1 H8:2 ctx128 D64: 46 us a call direct, 74 us through the
    dispatcher); the bytes are the same, as it is the same function."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None \
            or torch._C._is_torch_function_mode_enabled():
        return False
    grad = torch.is_grad_enabled()
    return all(t is None or (type(t) is torch.Tensor and not (grad and t.requires_grad))
               for t in tensors)


def _require_tensors(**named: Tensor) -> None:
    """The op schema takes tensors only: anything else raises DTypeError here
    (naming the argument) instead of the dispatcher's RuntimeError."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def _as_head_tensor(x: Any, name: str) -> Tensor | None:
    """A per-head vector given as a tensor, or as any array-like (a numpy
    array, a list), as a tensor for the op's schema."""
    if x is None or isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError):
        raise DTypeError(f"{name}: expected a float tensor (num_heads,), "
                         f"got {type(x).__name__}") from None


def _check_fake_dense(q: Tensor, k: Tensor, v: Tensor) -> None:
    """The shape rules a fake (meta) call can check: clear errors at trace
    time. The real call checks everything (values included) again."""
    for t, name in ((q, "q"), (k, "k"), (v, "v")):
        if t.dim() != 4:
            raise ShapeError(f"{name}: expected 4 dims (batch, seq, heads, head_dim), "
                             f"got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise DTypeError(f"k, v: expected q's dtype {q.dtype}, got {k.dtype} and {v.dtype}")


# ---- dense attention: forward and backward ops ----

def _attention_impl(q: Tensor, k: Tensor, v: Tensor, sinks: Optional[Tensor],
                    alibi_slopes: Optional[Tensor], causal: bool, scale: Optional[float],
                    window_left: int, window_right: int, softcap: float
                    ) -> tuple[Tensor, Tensor]:
    out, lse = _dense.attention(
        _to_numpy(q, "q"), _to_numpy(k, "k"), _to_numpy(v, "v"), causal=causal, scale=scale,
        window=(window_left, window_right), softcap=softcap,
        sinks=_head_vector(sinks, "sinks"), alibi_slopes=_head_vector(alibi_slopes, "alibi_slopes"),
        return_lse=True)
    return _to_torch(out), torch.from_numpy(lse)


_attention_op = torch.library.custom_op("cpuattn::attention", _attention_impl, mutates_args=(),
                                        device_types="cpu")


@_attention_op.register_fake
def _attention_fake(q, k, v, sinks, alibi_slopes, causal, scale, window_left, window_right,
                    softcap):
    _check_fake_dense(q, k, v)
    b, sq, h, _ = q.shape
    return (q.new_empty((b, sq, h, v.shape[3])),
            q.new_empty((b, h, sq), dtype=_lse_dtype(q.dtype)))


@torch.library.custom_op("cpuattn::attention_backward", mutates_args=(), device_types="cpu")
def _attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                           lse: Tensor, sinks: Optional[Tensor], alibi_slopes: Optional[Tensor],
                           causal: bool, scale: Optional[float], window_left: int,
                           window_right: int, softcap: float
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dsinks); dsinks is empty (0,) without sinks (a schema
    cannot return None), float32 (float64 for float64 q) with them."""
    grads = _backward.attention_backward(
        _to_numpy(dout, "dout"), _to_numpy(q, "q"), _to_numpy(k, "k"), _to_numpy(v, "v"),
        _to_numpy(out, "out"), _plain_numpy(lse, "lse"), causal=causal, scale=scale,
        window=(window_left, window_right), softcap=softcap,
        sinks=_head_vector(sinks, "sinks"), alibi_slopes=_head_vector(alibi_slopes, "alibi_slopes"))
    dq, dk, dv, *dsinks = grads
    return (_to_torch(dq), _to_torch(dk), _to_torch(dv),
            torch.from_numpy(dsinks[0]) if dsinks else torch.empty(0, dtype=_lse_dtype(q.dtype)))


@_attention_backward_op.register_fake
def _attention_backward_fake(dout, q, k, v, out, lse, sinks, alibi_slopes, causal, scale,
                             window_left, window_right, softcap):
    _check_fake_dense(q, k, v)
    nsinks = 0 if sinks is None else q.shape[2]
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            q.new_empty((nsinks,), dtype=_lse_dtype(q.dtype)))


def _attention_setup_context(ctx, inputs, output):
    q, k, v, sinks, alibi_slopes, *opts = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, sinks, alibi_slopes)
    ctx.opts = opts
    # the engine's backward takes no lse gradient: lse comes out as a constant
    # (requires_grad False, as flash-attn's softmax_lse) rather than with a
    # gradient path that would drop its share
    ctx.mark_non_differentiable(lse)


def _attention_backward(ctx, dout, _dlse):
    q, k, v, out, lse, sinks, alibi_slopes = ctx.saved_tensors
    if ctx.needs_input_grad[4]:
        raise CpuAttnError("alibi_slopes: cpuattn has no gradient for the ALiBi slopes; "
                           "pass them without requires_grad")
    dq, dk, dv, dsinks = torch.ops.cpuattn.attention_backward.default(
        dout, q, k, v, out, lse, sinks, alibi_slopes, *ctx.opts)
    dsinks = None if sinks is None else dsinks.to(sinks.dtype)
    return (dq, dk, dv, dsinks) + (None,) * 6


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None, window: Window = (-1, -1),
              softcap: float = 0.0, sinks: torch.Tensor | None = None,
              alibi_slopes: torch.Tensor | None = None, return_lse: bool = False
              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`cpuattn.attention` on torch CPU tensors, differentiable and
    traceable by ``torch.compile(fullgraph=True)``.

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
        alibi_slopes: optional float ``(num_heads,)`` ALiBi slopes (no
            gradient: slopes that require grad raise CpuAttnError in backward).
        return_lse: also return ``lse`` ``(batch, num_heads, seq_q)``,
            float32 (float64 for float64 input). No gradient flows through
            it (it is marked non-differentiable, as flash-attn's).

    Returns:
        ``out`` ``(batch, seq_q, num_heads, head_dim_v)`` in q's dtype, or
        ``(out, lse)``. When an input requires grad, backward runs
        :func:`cpuattn.attention_backward` (dk/dv summed over each KV group);
        double backward is not supported.

    Raises ShapeError (e.g. a non-CPU tensor) / DTypeError as the numpy API.
    """
    _require_tensors(q=q, k=k, v=v)
    causal, scale, left, right, softcap = _options(causal, scale, window, softcap)
    sinks, alibi_slopes = _as_head_tensor(sinks, "sinks"), _as_head_tensor(alibi_slopes,
                                                                          "alibi_slopes")
    op = _attention_impl if _direct(q, k, v, sinks, alibi_slopes) else \
        torch.ops.cpuattn.attention.default
    out, lse = op(q, k, v, sinks, alibi_slopes, causal, scale, left, right, softcap)
    return (out, lse) if return_lse else out


# ---- paged attention: forward op ----

def _paged_attention_impl(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor,
                        seq_lens: Tensor, cu_seqlens_q: Optional[Tensor],
                        k_scale: Optional[Tensor], v_scale: Optional[Tensor],
                        sinks: Optional[Tensor], alibi_slopes: Optional[Tensor],
                        tree_mask: Optional[Tensor], causal: bool, scale: Optional[float],
                        window_left: int, window_right: int, softcap: float
                        ) -> tuple[Tensor, Tensor]:
    optional = {name: None if t is None else _plain_numpy(t, name)
                for name, t in (("cu_seqlens_q", cu_seqlens_q), ("tree_mask", tree_mask))}
    out, lse = _paged.paged_attention(
        _to_numpy(q, "q"), _pages_to_numpy(k_pages, "k_pages"),
        _pages_to_numpy(v_pages, "v_pages"), _plain_numpy(block_table, "block_table"),
        _plain_numpy(seq_lens, "seq_lens"), causal=causal, scale=scale,
        window=(window_left, window_right), softcap=softcap,
        k_scale=_scale_arg(k_scale, "k_scale"), v_scale=_scale_arg(v_scale, "v_scale"),
        sinks=_head_vector(sinks, "sinks"), alibi_slopes=_head_vector(alibi_slopes, "alibi_slopes"),
        return_lse=True, **optional)
    return _to_torch(out), torch.from_numpy(lse)


_paged_attention_op = torch.library.custom_op("cpuattn::paged_attention", _paged_attention_impl,
                                              mutates_args=(), device_types="cpu")


def _scale_arg(t: Tensor | None, name: str) -> Array | float | None:
    """A page scale tensor as cpuattn takes it: a 0-d tensor is the per-tensor
    float of fp8 pages (vLLM's k_scale), anything else the scale array."""
    if t is None:
        return None
    if isinstance(t, torch.Tensor) and t.dim() == 0:
        return float(_check_cpu_tensor(t, name))
    return _plain_numpy(t, name)


@_paged_attention_op.register_fake
def _paged_attention_fake(q, k_pages, v_pages, block_table, seq_lens, cu_seqlens_q, k_scale,
                          v_scale, sinks, alibi_slopes, tree_mask, causal, scale, window_left,
                          window_right, softcap):
    if q.dim() != 3:
        raise ShapeError(f"q: expected 3 dims (tokens, num_heads, head_dim), "
                         f"got shape {tuple(q.shape)}")
    if v_pages.dim() != 4:
        raise ShapeError(f"v_pages: expected 4 dims (num_pages, page_size, num_kv_heads, "
                         f"head_dim), got shape {tuple(v_pages.shape)}")
    # int4 pages hold two elements per byte
    dv = v_pages.shape[3] * (2 if v_pages.dtype == torch.uint8 else 1)
    tokens, h, _ = q.shape
    return (q.new_empty((tokens, h, dv)), q.new_empty((h, tokens), dtype=_lse_dtype(q.dtype)))


def _as_scale_tensor(x: Any, name: str) -> Tensor | None:
    """A page scale as the op takes it: a Python float becomes a 0-d tensor."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return torch.tensor(float(x), dtype=torch.float64)
    if x is None or isinstance(x, torch.Tensor):
        return x
    raise DTypeError(f"{name}: expected a tensor, a float (fp8 pages) or None, "
                     f"got {type(x).__name__}")


def paged_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor, *,
                    cu_seqlens_q: torch.Tensor | None = None, causal: bool = True,
                    scale: float | None = None, window: Window = (-1, -1),
                    softcap: float = 0.0, return_lse: bool = False,
                    k_scale: torch.Tensor | float | None = None,
                    v_scale: torch.Tensor | float | None = None,
                    sinks: torch.Tensor | None = None,
                    alibi_slopes: torch.Tensor | None = None,
                    tree_mask: torch.Tensor | None = None
                    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`cpuattn.paged_attention` on torch CPU tensors, traceable by
    ``torch.compile(fullgraph=True)``; forward only (a query that requires
    grad gets an error from autograd at backward, never a wrong gradient).

    Args:
        q: ``(batch, num_heads, head_dim)`` (decode) or, with
            ``cu_seqlens_q``, ``(total_q, num_heads, head_dim)``; float32,
            float64, float16 or bfloat16.
        k_pages, v_pages: ``(num_pages, page_size, num_kv_heads, head_dim)``
            float tensors, or low-bit pages: torch.int8 (int8),
            torch.uint8 (int4 pairs, last axis ``head_dim // 2``),
            torch.float8_e4m3fn / float8_e5m2. Viewed, never copied.
        block_table: int ``(batch, max_pages_per_seq)``; seq_lens: int
            ``(batch,)``; cu_seqlens_q: optional int ``(batch + 1,)``;
            tree_mask: optional bool: as :func:`cpuattn.paged_attention`.
        causal, scale, window, softcap, sinks, alibi_slopes: as
            :func:`cpuattn.paged_attention` (``causal`` defaults to True).
        k_scale, v_scale: the low-bit pages' scale tensors (int8/fp8
            float32 ``(num_pages, page_size, num_kv_heads)``, int4 float16
            ``(..., ceil(head_dim / 32))``), or for fp8 pages one float (a
            Python float or a 0-d tensor) for the whole tensor.
        return_lse: also return lse ``(num_heads, total_q)`` float32
            (float64 for float64 q).

    Returns:
        ``out`` ``(total_q, num_heads, head_dim_v)`` in q's dtype, or ``(out,
        lse)``. There is no ``out=``: the op allocates its result (a custom
        op may not return its input).

    Raises ShapeError / DTypeError / PageError as the numpy API.
    """
    _require_tensors(q=q, k_pages=k_pages, v_pages=v_pages, block_table=block_table,
                     seq_lens=seq_lens)
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("tree_mask", tree_mask)):
        if t is not None:
            _require_tensors(**{name: t})
    causal, scale, left, right, softcap = _options(causal, scale, window, softcap)
    args = (q, k_pages, v_pages, block_table, seq_lens, cu_seqlens_q,
            _as_scale_tensor(k_scale, "k_scale"), _as_scale_tensor(v_scale, "v_scale"),
            _as_head_tensor(sinks, "sinks"), _as_head_tensor(alibi_slopes, "alibi_slopes"),
            tree_mask)
    op = _paged_attention_impl if _direct(*args) else torch.ops.cpuattn.paged_attention.default
    out, lse = op(*args, causal, scale, left, right, softcap)
    return (out, lse) if return_lse else out


__all__ = ["attention", "paged_attention"]
