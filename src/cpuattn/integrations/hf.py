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
prefill or cached decode. The whole padded batch runs in one engine call
per layer over the K/V tensors in place (each row's query and key range
given to the engine; no copy, no per-row calls); rows that see a whole
padded range (right padding) take a second, non-causal call. Any other mask
raises ShapeError rather than giving a wrong answer. A mask's plan is made
once and reused by every layer that gets the same mask tensor.

``output_attentions=True`` logs a warning once and returns no weights, as
"sdpa" does.

Inference only: a backward pass through this function raises. Tensors must
be on the CPU; float32, float64, float16, and bfloat16 (which needs
``ml_dtypes``) are accepted.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from transformers.utils import logging as _hf_logging

from ..dense import _attention_ranges, attention
from ..errors import CpuAttnError, DTypeError, ShapeError
from ..torch import _to_numpy, _to_torch
from .hf_paged import PagedCache, PagedKV, attention_forward as _paged_attention_forward

NAME = "cpuattn"
# under transformers' logger, so that its verbosity settings apply as to "sdpa"'s warnings
_logger = _hf_logging.get_logger("transformers.integrations.cpuattn")


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


class _Memo:
    """Values derived from tensors (a mask's plan, a sinks vector in float64),
    reused while the same unmodified tensor comes back: every layer of a
    forward pass gets the same mask, every step the same sinks parameter.
    A tensor that tracks no version (inference mode) is never reused."""

    def __init__(self, size: int):
        self._size = size
        self._entries: dict[int, tuple] = {}   # id -> (weakref, _version, key, value)

    def get(self, t: torch.Tensor, key: Any, make: Callable[[], Any]) -> Any:
        try:
            version = t._version
        except RuntimeError:        # inference-mode tensors track no version
            return make()
        hit = self._entries.get(id(t))
        if hit is not None and hit[0]() is t and hit[1] == version and hit[2] == key:
            return hit[3]
        value = make()
        if len(self._entries) >= self._size:
            self._entries.clear()
        self._entries[id(t)] = (weakref.ref(t), version, key, value)
        return value


_plans = _Memo(8)       # a model may alternate masks (full and sliding layers)
_sinks = _Memo(256)     # one sinks parameter per layer


class _Plan(NamedTuple):
    """How a padded batch runs: one or two engine calls, each
    ``(causal, seqs)`` with seqs the int64 ``(4, batch)`` ranges of
    :func:`cpuattn.dense._attention_ranges`; ``zeros``: some query rows see
    no key and must come out 0."""
    calls: tuple
    zeros: bool


def _mask_plan(allowed, window_left):
    """Per-row ``(s, e, c)`` with allowed[b, i, j] == (s <= j < e) & (j <= i + c)
    [& (j >= i + c - window_left)], or ShapeError if the mask is not of that form.
    In numpy: on these small arrays a tenth of the cost of the same torch ops."""
    a = allowed.numpy()                                                  # (B, q, kv) bool
    _, q_len, kv_len = a.shape
    j = np.arange(kv_len)
    i = np.arange(q_len)[:, None]
    nonempty = a.any(-1)                                                 # (B, q)
    lo = np.where(nonempty, a.argmax(-1), kv_len)
    hi = np.where(nonempty, kv_len - 1 - a[..., ::-1].argmax(-1), -1)
    s = lo.min(-1)                                                       # (B,)
    e = hi.max(-1) + 1
    # c: from a row whose last key is its causal limit (hi < e - 1) or whose
    # first key is its window's (lo > s); if no row shows it, every non-empty
    # row sees all of [s, e): the smallest such c, or under a window with
    # empty rows after the last non-empty one (emptied by the window) the largest
    big = 2 * (kv_len + q_len) + 2
    rows = i[:, 0]
    shown = np.where(nonempty & (hi < e[:, None] - 1), hi - rows, big)
    first = nonempty.argmax(-1)                                          # first non-empty row
    unshown = hi[np.arange(len(first)), first] - first
    if window_left is not None:
        shown = np.minimum(shown, np.where(nonempty & (lo > s[:, None]),
                                           lo - rows + window_left, big))
        last = q_len - 1 - nonempty[:, ::-1].argmax(-1)
        unshown = np.where(last < q_len - 1, s + window_left - last, unshown)
    shown = shown.min(-1)
    c = np.where(shown < big, shown, unshown)
    s3, e3, c3 = s[:, None, None], e[:, None, None], c[:, None, None]
    expect = (j >= s3) & (j < e3) & (j <= i + c3)
    if window_left is not None:
        expect &= j >= i + c3 - window_left
    if not np.array_equal(expect, a):
        raise ShapeError("attention_mask: cpuattn supports causal/bidirectional masks with "
                         "left or right padding (and sliding windows); this mask is not of "
                         "that form")
    return s, e, c


def _ranges(s, e, c, q_len, window_left):
    """The engine calls of rows ``(s, e, c)`` (int64 arrays over the batch).

    Query row i of batch row b sees keys ``[s, min(e, i + c + 1))`` (and
    ``>= i + c - window_left``): rows below ``r0 = s - c`` see nothing; rows
    ``[r0, f0)``, ``f0 = e - c``, form one causal sequence over keys ``[s,
    f0 + c)``; rows ``[f0, q_len)`` (right padding, or a bidirectional mask)
    all see ``[s, e)``: one non-causal sequence. A batch row that has only
    one of the two parts joins either call (one query row is the same under
    both masks), so left padding, prefill or decode, and bidirectional
    masks take one call; only a batch that needs both parts in some row
    (right-padded prefill) takes two."""
    live = e > s
    f0 = np.where(live, np.clip(e - c, 0, q_len), q_len)
    r0 = np.where(live, np.clip(s - c, 0, f0), q_len)
    n_full = q_len - f0
    if window_left is not None:
        if (n_full > 1).any():
            raise ShapeError("attention_mask: rows that see a whole padded range under a "
                             "sliding window are not supported by cpuattn")
        # one such row (the last) still sees the window: keys from i + c - left
        s_full = np.maximum(s, q_len - 1 + c - window_left)
    else:
        # a single causal row that sees all of [s, e) joins the full rows
        f0 = np.where((f0 - r0 == 1) & (f0 + c == e), r0, f0)
        n_full = q_len - f0
        s_full = s
    n_causal = f0 - r0
    causal = (r0, s, n_causal, np.where(n_causal > 0, f0 + c - s, 0))
    full = (f0, s_full, n_full, np.where(n_full > 0, e - s_full, 0))
    both = (n_causal > 0) & (n_full > 0)
    if both.any() or ((n_causal > 1).any() and (n_full > 1).any()):
        calls = ((True, _seqs(*causal)), (False, _seqs(*full)))
    else:   # each row has one part (or none): one call, causal unless a full part needs not
        one = [np.where(n_causal > 0, a, b) for a, b in zip(causal, full)]
        calls = ((not (n_full > 1).any(), _seqs(*one)),)
    # the window may leave a last full row nothing (i + c - left >= e)
    zeros = bool((r0 > 0).any() or (~live).any() or ((n_full > 0) & (s_full >= e)).any())
    return _Plan(calls, zeros)


def _seqs(q_start, k_start, q_len, k_len):
    """The engine's (4, batch) ranges; a row with no queries or keys gets
    empty ranges at 0 (its rows, if any, come out 0)."""
    k_len = np.maximum(k_len, 0)
    q_start = np.where(q_len > 0, q_start, 0)
    k_start = np.where(k_len > 0, k_start, 0)
    seqs = np.stack([q_start, k_start, q_len, k_len]).astype(np.int64)
    seqs.flags.writeable = False          # the engine reads it while the GIL is released
    return seqs


def _plan_of(mask, batch, q_len, kv_len, window_left):
    """The :class:`_Plan` of a transformers mask (cached per mask tensor)."""
    def make():
        s, e, c = _mask_plan(_bool_mask(mask, batch, q_len, kv_len), window_left)
        return _ranges(s, e, c, q_len, window_left)
    return _plans.get(mask, (batch, q_len, kv_len, window_left), make)


def _sinks_f64(sinks):
    """gpt-oss's sinks parameter as the float64 numpy vector the engine
    reads, converted once per parameter (and again after it changes)."""
    if not isinstance(sinks, torch.Tensor):
        return sinks
    return _sinks.get(sinks, None, lambda: sinks.detach().to(torch.float64).numpy())


# Keywords transformers passes to every attention function that change nothing
# here: bookkeeping for other layers, or facts the mask already encodes.
_NO_EFFECT = frozenset({
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
    one silently gives wrong logits. ``output_attentions=True`` warns as
    transformers' "sdpa" does: no weights are returned (None)."""
    for name, value in kwargs.items():
        if value is None or value is False or name in _NO_EFFECT:
            continue
        if name in _PACKING and attention_mask is not None:
            continue
        if name == "output_attentions":
            _logger.warning_once(
                "`cpuattn` attention does not support `output_attentions=True`: the "
                "attention weights are None. Please set your attention to `eager` if you "
                "want them.")
            continue
        raise CpuAttnError(
            f"{name}: the cpuattn transformers backend does not support this keyword "
            f"(got {type(value).__name__}); refusing rather than ignoring it, which would "
            f"give wrong results. Use attn_implementation='sdpa' or 'eager' for this model")


_VIEWABLE = frozenset({torch.float32, torch.float64, torch.float16})


def _view(t, name):
    """A ``(B, H, S, D)`` tensor as the ``(B, S, H, D)`` numpy view the
    engine reads, no copy. The common case (a plain CPU float tensor that
    needs no grad) skips :func:`cpuattn.torch._to_numpy`'s general checks,
    a third of this function's per-call cost in decode."""
    if type(t) is torch.Tensor and t.dtype in _VIEWABLE and t.is_cpu and not t.requires_grad:
        return t.numpy().transpose(0, 2, 1, 3)
    return _to_numpy(t, name).transpose(0, 2, 1, 3)


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
            cached K/V, read in place (any strides with a contiguous last
            axis); ``num_heads % num_kv_heads == 0`` (GQA/MQA natively, no
            ``repeat_kv``).
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
    honoured. ``output_attentions=True`` logs a warning once (as "sdpa")
    and the weights are None.
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
    if kwargs and not kwargs.keys() <= _NO_EFFECT:     # the usual ones need no loop
        _refuse_unhonoured(kwargs, attention_mask)
    b, h, q_len, d = query.shape
    kv_len = key.shape[2]
    qn, kn, vn = _view(query, "query"), _view(key, "key"), _view(value, "value")
    scale = None if scaling is None else float(scaling)
    softcap = float(softcap or 0.0)
    if sinks is not None:
        sinks = _sinks_f64(sinks)
    left = None if sliding_window is None else int(sliding_window) - 1
    window = (-1 if left is None else left, -1)
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(causal) and q_len > 1
        if causal and kv_len > q_len:
            # as "sdpa": only an empty static cache prefill gets here; its keys
            # past q_len are unwritten and upper-left causal = first q_len keys
            kn, vn = kn[:, :q_len], vn[:, :q_len]
        out = attention(qn, kn, vn, causal=causal, scale=scale, window=window, softcap=softcap,
                        sinks=sinks)
    else:
        # every batch row in one engine call over the cache in place (two
        # for rows that see a whole padded range)
        plan = _plan_of(attention_mask, b, q_len, kv_len, left)
        out = (np.zeros if plan.zeros else np.empty)((b, q_len, h, vn.shape[-1]), qn.dtype)
        for causal, seqs in plan.calls:
            _attention_ranges(qn, kn, vn, seqs, out, causal=causal, scale=scale,
                              window=window, softcap=softcap, sinks=sinks)
    result = _to_torch(out) if query.dtype == torch.bfloat16 else torch.from_numpy(out)
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                    or value.requires_grad):
        result = _NoBackward.apply(result, query, key, value)
    return result, None


__all__ = ["register", "attention_forward", "PagedCache", "NAME"]
