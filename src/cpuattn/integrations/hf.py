"""Hugging Face transformers backend: ``attn_implementation="cpuattn"``.

Usage::

    import cpuattn.integrations.hf as cpuattn_hf
    cpuattn_hf.register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="cpuattn")

:func:`register` installs :func:`attention_forward` in transformers'
``AttentionInterface`` *and* transformers' ``sdpa_mask`` in
``AttentionMaskInterface`` under the same name. Both are needed: a name with
no mask function gets no mask at all, which silently drops causal and padding
masking (transformers#45811).

Masks are honoured exactly or refused. ``attention_mask`` may be ``None``
(the plain causal case, interpreted like "sdpa" does), or a 4-D boolean or
additive ``(batch, 1 or heads, q_len, kv_len)`` mask. Every batch row must be
of the form "query i sees keys ``s <= j < e`` with ``j <= i + c``" (optionally
``j > i + c - sliding_window``): left or right padding, causal or not,
prefill or cached decode. It is run as per-sequence cpuattn calls on
zero-copy slices of the K/V tensors. Any other mask raises ShapeError rather
than giving a wrong answer.

Inference only: a backward pass through this function raises. Tensors must
be on the CPU; float32, float64, float16, and bfloat16 (which needs
``ml_dtypes``) are accepted.
"""
from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch

from ..dense import attention
from ..errors import CpuAttnError, DTypeError, ShapeError
from ..torch import _to_numpy, _to_torch
from .hf_paged import PagedCache, PagedKV, attention_forward as _paged_attention_forward

NAME = "cpuattn"


def register(name: str = NAME) -> str:
    """Register cpuattn with transformers under ``name`` (default ``"cpuattn"``).

    Installs :func:`attention_forward` as the attention function and
    ``transformers.masking_utils.sdpa_mask`` as the mask function (masks
    are built as for ``"sdpa"``). Idempotent. Returns ``name``.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


class _NoBackward(torch.autograd.Function):
    """Passes the output through; a backward pass raises instead of silently
    returning no gradient for q, k and v."""

    @staticmethod
    def forward(ctx, out, *inputs):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, *grads):
        raise CpuAttnError("cpuattn's transformers attention is inference-only: no backward; "
                           "use attn_implementation='sdpa' or 'eager' for training")


def _bool_mask(mask, batch, q_len, kv_len):
    """(batch, q_len, kv_len) bool 'may attend' from a 4-D HF mask."""
    if mask.ndim != 4:
        raise ShapeError(f"attention_mask: expected a 4-D mask (batch, heads, q_len, kv_len), "
                         f"got shape {tuple(mask.shape)}")
    if mask.shape[-1] < kv_len:
        raise ShapeError(f"attention_mask: expected at least {kv_len} keys, "
                         f"got shape {tuple(mask.shape)}")
    mask = mask[..., :kv_len]
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        allowed = mask == 0
        hidden = torch.isneginf(mask) | (mask <= torch.finfo(mask.dtype).min / 2)
        if not bool((allowed | hidden).all()):
            raise ShapeError("attention_mask: an additive mask with values other than 0 and "
                             "-inf/finfo.min (an attention bias) is not supported by cpuattn")
    else:
        raise DTypeError(f"attention_mask: expected a bool or float mask, got {mask.dtype}")
    if allowed.shape[1] > 1 and not bool((allowed == allowed[:, :1]).all()):
        raise ShapeError("attention_mask: per-head masks are not supported by cpuattn")
    try:
        return allowed[:, 0].expand(batch, q_len, kv_len)
    except RuntimeError:
        raise ShapeError(f"attention_mask: shape {tuple(mask.shape)} does not broadcast to "
                         f"(batch, 1, q_len, kv_len) = ({batch}, 1, {q_len}, {kv_len})") from None


_last_plan = [None]     # (weakref to the mask, its _version, key, plan)


def _cached_plan(mask, batch, q_len, kv_len, window_left):
    """:func:`_mask_plan` of a mask, reused while the same unmodified tensor
    comes back (every layer of a forward pass gets the same mask)."""
    key = (batch, q_len, kv_len, window_left)
    try:
        version = mask._version
    except RuntimeError:        # inference-mode tensors track no version: no reuse
        version = None
    last = _last_plan[0]
    if version is not None and last is not None and last[0]() is mask \
            and last[1] == version and last[2] == key:
        return last[3]
    plan = _mask_plan(_bool_mask(mask, batch, q_len, kv_len), window_left)
    if version is not None:
        _last_plan[0] = (weakref.ref(mask), version, key, plan)
    return plan


def _mask_plan(allowed, window_left):
    """Per-row ``(s, e, c)`` with allowed[b, i, j] == (s <= j < e) & (j <= i + c)
    [& (j >= i + c - window_left)], or ShapeError if the mask is not of that form."""
    _, q_len, kv_len = allowed.shape
    j = torch.arange(kv_len)
    i = torch.arange(q_len)
    nonempty = allowed.any(-1)                                           # (B, q)
    lo = torch.where(allowed, j, kv_len).amin(-1)
    hi = torch.where(allowed, j, -1).amax(-1)
    s = torch.where(nonempty, lo, kv_len).amin(-1)                       # (B,)
    e = hi.amax(-1) + 1
    first = nonempty.to(torch.int8).argmax(-1)                           # first non-empty row
    c = hi.gather(1, first[:, None])[:, 0] - first
    expect = (j >= s[:, None, None]) & (j < e[:, None, None]) & \
             (j <= i[:, None] + c[:, None, None])
    if window_left is not None:
        expect &= j >= i[:, None] + c[:, None, None] - window_left
    if not torch.equal(expect, allowed):
        raise ShapeError("attention_mask: cpuattn supports causal/bidirectional masks with "
                         "left or right padding (and sliding windows); this mask is not of "
                         "that form")
    return s.tolist(), e.tolist(), c.tolist()


# Keywords transformers passes to every attention function that change nothing
# here: bookkeeping for other layers, or facts the mask already encodes.
_NO_EFFECT = frozenset({
    "output_attentions",        # attention weights are never returned (as "sdpa")
    "output_hidden_states", "output_router_logits", "use_cache", "cache_position",
    "num_items_in_batch", "deterministic",     # cpuattn is always deterministic
    "position_ids",             # packed sequences reach us through the mask
})
# Packed-sequence offsets: the mask built by sdpa_mask encodes them; without a
# mask they would be the only record of the packing, which cpuattn cannot honour.
_PACKING = frozenset({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"})


def _refuse_unhonoured(kwargs, attention_mask):
    """Raise CpuAttnError for a keyword with a value that this backend does
    not honour (T5's ``position_bias``, sparse ``indices``, ...): dropping
    one silently gives wrong logits."""
    for name, value in kwargs.items():
        if value is None or value is False or name in _NO_EFFECT:
            continue
        if name in _PACKING and attention_mask is not None:
            continue
        raise CpuAttnError(
            f"{name}: the cpuattn transformers backend does not support this keyword "
            f"(got {type(value).__name__}); refusing rather than ignoring it, which would "
            f"give wrong results. Use attn_implementation='sdpa' or 'eager' for this model")


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, softcap: float | None = None,
                      sliding_window: int | None = None, **kwargs: Any
                      ) -> tuple[torch.Tensor, None]:
    """transformers attention function backed by cpuattn.

    Args:
        module: the calling attention module (``is_causal`` is read from it).
        query: ``(batch, num_heads, q_len, head_dim)`` CPU tensor.
        key, value: ``(batch, num_kv_heads, kv_len, head_dim)``, the full
            cached K/V; ``num_heads % num_kv_heads == 0`` (GQA/MQA natively,
            no ``repeat_kv``).
        attention_mask: ``None`` or a 4-D bool / additive float mask built by
            ``sdpa_mask`` (see the module docstring for the supported forms).
        dropout: must be 0 (cpuattn has no attention dropout).
        scaling: score scale, default ``1 / sqrt(head_dim)``.
        is_causal: overrides ``module.is_causal``; used only when
            ``attention_mask`` is None (as in "sdpa").
        softcap: Gemma-2 style logit softcap, or None.
        sliding_window: the layer's window size, or None.

    Returns:
        ``(attn_output, None)``: ``attn_output (batch, q_len, num_heads,
        head_dim)`` in query's dtype. Query rows that see no key (padding)
        are 0.

    Raises ShapeError for a mask cpuattn cannot express, DTypeError for
    dtypes, and CpuAttnError for dropout or any keyword it does not honour
    (``position_bias``, a paged ``cache``, sparse ``indices``, ...): an
    unknown keyword with a value is refused, never dropped. Attention sinks
    (gpt-oss's ``s_aux``, or ``sinks``: one logit per query head) are
    honoured.
    """
    if isinstance(key, PagedKV):    # K/V kept in a PagedCache's pool: attend over its pages
        return _paged_attention_forward(module, query, key, value, attention_mask, dropout,
                                        scaling, is_causal, softcap, sliding_window, **kwargs)
    if dropout:
        raise CpuAttnError(f"dropout: cpuattn has no attention dropout, got {dropout}")
    # gpt-oss passes its per-head attention sinks as s_aux
    sinks = kwargs.pop("s_aux", None)
    if sinks is None:
        sinks = kwargs.pop("sinks", None)
    _refuse_unhonoured(kwargs, attention_mask)
    b, h, q_len, d = query.shape
    kv_len = key.shape[2]
    qn = _to_numpy(query, "query").transpose(0, 2, 1, 3)     # (B, S, H, D), no copy
    kn = _to_numpy(key, "key").transpose(0, 2, 1, 3)
    vn = _to_numpy(value, "value").transpose(0, 2, 1, 3)
    opts: dict[str, Any] = {"scale": scaling, "softcap": float(softcap or 0.0)}
    if sinks is not None:
        opts["sinks"] = sinks.detach().to(torch.float64).numpy() if isinstance(
            sinks, torch.Tensor) else sinks
    left = None if sliding_window is None else int(sliding_window) - 1
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(causal) and q_len > 1
        if causal and kv_len > q_len:
            # as "sdpa": only an empty static cache prefill gets here; its keys
            # past q_len are unwritten and upper-left causal = first q_len keys
            kn, vn = kn[:, :q_len], vn[:, :q_len]
        out = attention(qn, kn, vn, causal=causal,
                        window=(left if left is not None else -1, -1), **opts)
    else:
        starts, ends, offs = _cached_plan(attention_mask, b, q_len, kv_len, left)
        if all(s == 0 and e == kv_len and c == kv_len - q_len
               for s, e, c in zip(starts, ends, offs)):
            # a plain bottom-right causal mask: one batched call
            out = attention(qn, kn, vn, causal=True,
                            window=(left if left is not None else -1, -1), **opts)
        else:
            out = np.zeros((b, q_len, h, vn.shape[-1]), dtype=qn.dtype)
            for i, (s, e, c) in enumerate(zip(starts, ends, offs)):
                _run_row(qn, kn, vn, out, i, s, e, c, q_len, left, opts)
    result = _to_torch(out)
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                    or value.requires_grad):
        result = _NoBackward.apply(result, query, key, value)
    return result, None


def _run_row(qn, kn, vn, out, b, s, e, c, q_len, left, opts):
    """Batch row b: rows [0, r0) see nothing (stay 0); rows [r0, f0) see keys
    [s, i + c] (bottom-right causal over the slice [s, f0 + c)); rows
    [f0, q_len) see all of [s, e)."""
    if e <= s:
        return
    f0 = min(max(e - c, 0), q_len)
    r0 = min(max(s - c, 0), f0)
    if r0 < f0:
        attention(qn[b:b + 1, r0:f0], kn[b:b + 1, s:f0 + c], vn[b:b + 1, s:f0 + c],
                  causal=True, window=(left if left is not None else -1, -1),
                  out=out[b:b + 1, r0:f0], **opts)
    if f0 < q_len:
        if left is not None:
            raise ShapeError("attention_mask: rows that see a whole padded range under a "
                             "sliding window are not supported by cpuattn")
        attention(qn[b:b + 1, f0:], kn[b:b + 1, s:e], vn[b:b + 1, s:e], causal=False,
                  out=out[b:b + 1, f0:], **opts)


__all__ = ["register", "attention_forward", "NAME"]
