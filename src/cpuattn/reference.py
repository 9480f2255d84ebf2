"""The float64 oracle: plain numpy attention, the definition the kernels are
tested against. O(seq_q x seq_k) memory: for tests, not for production."""
from __future__ import annotations

from typing import Literal, overload

import numpy as np

from . import _validate as V
from ._typing import ArrayLike, NDArray, Window

_F64 = NDArray[np.float64]


def visible_mask(seq_q: int, seq_k: int, causal: bool, window: Window) -> NDArray[np.bool_]:
    """Boolean (seq_q, seq_k): query i (at position i + seq_k - seq_q) sees key j."""
    left, right = window
    pos = np.arange(seq_q)[:, None] + (seq_k - seq_q)
    j = np.arange(seq_k)[None, :]
    mask = np.ones((seq_q, seq_k), dtype=bool)
    if causal:
        mask &= j <= pos
    if left >= 0:
        mask &= j >= pos - left
    if right >= 0:
        mask &= j <= pos + right
    return mask


def attend(q: ArrayLike, k: ArrayLike, v: ArrayLike, mask: NDArray[np.bool_], scale: float,
           softcap: float, sinks: ArrayLike | None = None,
           alibi_slopes: ArrayLike | None = None) -> tuple[_F64, _F64]:
    """One sequence in float64: q (Sq, H, D), k (Sk, Hkv, D), v (Sk, Hkv, Dv),
    mask (Sq, Sk), sinks and alibi_slopes (H,) or None. Returns out
    (Sq, H, Dv) and lse (H, Sq)."""
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    sq, h, _ = q.shape
    sk, hkv, dv = v.shape
    group = h // hkv
    kh = np.repeat(k, group, axis=1)            # (Sk, H, D)
    vh = np.repeat(v, group, axis=1)            # (Sk, H, Dv)
    with np.errstate(all="ignore"):
        s = np.einsum("qhd,khd->hqk", q, kh) * scale
        if softcap > 0:
            s = softcap * np.tanh(s / softcap)
        if alibi_slopes is not None:            # after the cap: - slope * |p - j|
            dist = np.abs(np.arange(sq)[:, None] + (sk - sq) - np.arange(sk)[None, :])
            s = s - np.asarray(alibi_slopes, np.float64)[:, None, None] * dist[None]
        s = np.where(mask[None], s, -np.inf)
        m = s.max(axis=-1, keepdims=True) if sk else np.full((h, sq, 1), -np.inf)
        m_safe = np.where(np.isneginf(m), 0.0, m)
        p = np.exp(s - m_safe)
        l = p.sum(axis=-1, keepdims=True)
        # hidden keys must not reach the result even when their values are
        # NaN/inf (0 * NaN = NaN): add non-finite value rows only where seen
        bad = np.asarray(~np.isfinite(vh).all(axis=-1))     # (Sk, H)
        out = np.einsum("hqk,khd->qhd", p, np.where(bad[..., None], 0.0, vh))
        for j, hh in zip(*np.nonzero(bad)):
            seen = mask[:, j]
            out[seen, hh, :] += p[hh, seen, j, None] * vh[j, hh][None, :]
        lsum = l[..., 0].transpose(1, 0)        # (Sq, H)
        out = np.where(lsum[..., None] > 0, out / np.where(lsum > 0, lsum, 1.0)[..., None], 0.0)
        out = np.where(np.isnan(lsum)[..., None], np.nan, out)
        lse = np.where(l[..., 0] > 0, m[..., 0] + np.log(np.where(l[..., 0] > 0, l[..., 0], 1.0)),
                       -np.inf)
        lse = np.where(np.isnan(l[..., 0]), np.nan, lse)
        if sinks is not None:                   # the sink joins the denominator
            sink = np.asarray(sinks, np.float64)[:, None]
            total = np.logaddexp(lse, sink)
            total = np.where(np.isnan(sink) | np.isnan(lse), np.nan, total)
            share = np.where(np.isneginf(total), 0.0, np.exp(lse - total))   # both -inf: 0
            out = out * share.transpose(1, 0)[..., None]
            out = np.where(np.isnan(total).transpose(1, 0)[..., None], np.nan, out)
            lse = total
    return out, lse


@overload
def reference_attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, causal: bool = ...,
                        scale: float | None = ..., window: Window = ..., softcap: float = ...,
                        sinks: ArrayLike | None = ..., alibi_slopes: ArrayLike | None = ...,
                        return_lse: Literal[False] = ...) -> _F64: ...
@overload
def reference_attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, causal: bool = ...,
                        scale: float | None = ..., window: Window = ..., softcap: float = ...,
                        sinks: ArrayLike | None = ..., alibi_slopes: ArrayLike | None = ...,
                        return_lse: Literal[True]) -> tuple[_F64, _F64]: ...
@overload
def reference_attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, causal: bool = ...,
                        scale: float | None = ..., window: Window = ..., softcap: float = ...,
                        sinks: ArrayLike | None = ..., alibi_slopes: ArrayLike | None = ...,
                        return_lse: bool = ...) -> _F64 | tuple[_F64, _F64]: ...
def reference_attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, *, causal: bool = False,
                        scale: float | None = None, window: Window = (-1, -1),
                        softcap: float = 0.0, sinks: ArrayLike | None = None,
                        alibi_slopes: ArrayLike | None = None, return_lse: bool = False
                        ) -> _F64 | tuple[_F64, _F64]:
    """Attention in plain numpy, float64 inside: the documented oracle.

    Same layouts and semantics as :func:`cpuattn.attention`: q
    ``(batch, seq_q, num_heads, head_dim)``, k ``(batch, seq_k, num_kv_heads,
    head_dim)``, v ``(batch, seq_k, num_kv_heads, head_dim_v)``; bottom-right
    causal alignment; rows that see no key are 0 with lse ``-inf`` (their
    sink with ``sinks``). ``sinks`` and ``alibi_slopes`` ``(num_heads,)``:
    as :func:`cpuattn.attention`.

    Returns ``out`` as float64 ``(batch, seq_q, num_heads, head_dim_v)``, and
    with ``return_lse=True`` also lse float64 ``(batch, num_heads, seq_q)``.
    """
    q, k, v = (np.asarray(x) for x in (q, k, v))
    for name, a in (("q", q), ("k", k), ("v", v)):
        V.check_ndim(a, name, 4, "(batch, seq, heads, head_dim)")
    scale, left, right, softcap, causal = V.check_options(scale, window, softcap, causal,
                                                          q.shape[-1])
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    V.check_heads(h, k.shape[2])
    mask = visible_mask(sq, sk, causal, (left, right))
    sinks, alibi_slopes = (None if x is None else V.head_vector(x, name, h)
                           for x, name in ((sinks, "sinks"), (alibi_slopes, "alibi_slopes")))
    out = np.zeros((b, sq, h, v.shape[-1]))
    lse = np.full((b, h, sq), -np.inf if sinks is None else 0.0)
    if sinks is not None:
        lse[:] = sinks[None, :, None]
    for i in range(b):
        out[i], lse[i] = attend(q[i], k[i], v[i], mask, scale, softcap, sinks, alibi_slopes)
    return (out, lse) if return_lse else out
