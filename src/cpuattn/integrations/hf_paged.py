"""A transformers ``Cache`` that keeps K/V in one multi-layer cpuattn PagePool.

Usage::

    from cpuattn.integrations import hf
    hf.register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="cpuattn")
    cache = hf.PagedCache(model.config, max_tokens=8192, kv_dtype="int8")
    model.generate(ids, attention_mask=mask, past_key_values=cache)

How it fits transformers' attention modules, which call
``cache.update(k, v, layer_idx)`` and pass what it returns to the attention
function: ``update`` only holds the new K/V and returns a stand-in tensor
(:class:`PagedKV`, as both K and V) naming the cache and the layer. The
"cpuattn" attention function recognises it and calls
:func:`attention_forward` here, which
reads the padding of the new tokens off the mask, stores the real ones with
``pool.reserve`` (once per forward pass) and ``pool.write`` (per layer,
quantising), and runs ``plan.run`` over the pages: no dequantised copy of
the cache is made (a prompt's prefill attends over its exact K/V). Any other use of a stand-in (``"sdpa"``, ``"eager"``,
a model that touches K/V between ``update`` and attention) raises
:class:`~cpuattn.CpuAttnError` instead of computing over the wrong keys.

Each batch row is one pool sequence holding only its real tokens: padding
columns of the mask are never stored, so a row's pool positions are its
real tokens in order. The cache's length (``get_seq_length``) counts mask
columns, padding included, as ``DynamicCache`` does. Every mask is checked
to say exactly "causal over the row's real tokens" (within the layer's
sliding window, counted in real tokens); anything else raises ShapeError.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from .._pool import PagePool
from ..dense import attention_varlen
from ..errors import CpuAttnError, PoolFullError, ShapeError
from ..torch import _to_numpy, _to_torch

# Layer types (transformers' config.layer_types) whose K/V the pool can hold
# and whose masks the paged kernel expresses: causal, optionally windowed.
_LAYER_TYPES = ("full_attention", "sliding_attention")


class PagedKV(torch.Tensor):
    """What :meth:`PagedCache.update` returns in place of K and V: an empty
    tensor naming the cache and layer whose K/V live in the pool.

    Only cpuattn's transformers attention function reads it. Every torch
    operation on it raises CpuAttnError, so an attention implementation
    that cannot read the pool ("sdpa", "eager", ...) fails loudly.
    """

    cache: PagedCache
    layer: int

    @staticmethod
    def make(cache: PagedCache, layer: int) -> PagedKV:
        kv = torch.Tensor._make_subclass(PagedKV, torch.empty(0))
        kv.cache, kv.layer = cache, layer
        return kv

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise CpuAttnError(
            "PagedCache: its K/V live in a cpuattn page pool and only the 'cpuattn' attention "
            f"function reads them, but {getattr(func, '__name__', func)!s} got them; build the "
            "model with attn_implementation='cpuattn' (after cpuattn.integrations.hf.register()) "
            "and use a model whose attention passes the cache's K/V straight to it")

    def __repr__(self, *, tensor_contents: Any = None) -> Any:  # type: ignore[override]
        return f"PagedKV(layer={self.layer})"


class _LayerView(CacheLayerMixin):
    """``cache.layers[i]``: the per-layer facts transformers reads (sliding or
    not, lengths); the K/V themselves are in the cache's pool and only
    :meth:`PagedCache.update` stores them."""

    is_compileable = False
    is_croppable = True
    supports_early_init = False     # nothing to allocate per layer

    def __init__(self, cache: PagedCache, sliding_window: int | None):
        # no super().__init__: there are no per-layer keys / values tensors
        self._cache = cache
        self.is_sliding = sliding_window is not None
        self.sliding_window = sliding_window

    @property
    def is_initialized(self) -> bool:
        return bool(self._cache._seqs)

    def get_seq_length(self) -> int:
        return self._cache.get_seq_length()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise CpuAttnError("PagedCache: layers are updated through the cache "
                           "(cache.update(k, v, layer_idx)), not one by one")

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._cache.get_mask_sizes(query_length, 0)


class _Step:
    """State of one forward pass through the layers: the new K/V awaiting
    their attention call, and (after layer 0's attention) the rows placed in
    the pool, their slots and the plan every layer runs."""

    def __init__(self, q_len: int):
        self.q_len = q_len
        self.next_layer = 0
        self.pending: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self.shape: tuple[int, ...] = ()           # of layer 0's K/V; every layer's
        self.real_new = torch.zeros((0, 0), dtype=torch.bool)   # (B, q_len) once placed
        self.everything = True      # real_new.all(): no padding among the new tokens
        self.placed = False         # pool sequences touched: _abort must undo
        self.created = False        # the pool sequences were made by this step
        self.lengths: list[int] = []   # pool lengths before the step
        self.slots = np.zeros(0, np.int64)
        self.cu = np.zeros(1, np.int32)     # cu_seqlens of the real new tokens
        self.fresh = False          # no row holds a token yet: a prompt's prefill
        self.plan: Any = None
        self.checked: list[tuple[Any, int | None]] = []   # masks already verified


def _int_arg(x: Any, name: str, minimum: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < minimum:
        raise ShapeError(f"{name}: expected an int >= {minimum}, got {x!r}")
    return int(x)


def _dtype_name(x: Any) -> Any:
    """torch dtypes by name (torch.bfloat16 -> "bfloat16"); others unchanged."""
    return str(x).removeprefix("torch.") if isinstance(x, torch.dtype) else x


class PagedCache(Cache):
    """A transformers ``Cache`` whose layers keep K/V in one multi-layer
    :class:`cpuattn.PagePool`, read in place by the "cpuattn" attention
    function (paged attention over the pages, low-bit ones included).

    Args:
        config: the model's config (``model.config``); its decoder text
            config gives the layers, kv heads, head_dim and sliding windows,
            and its ``_attn_implementation`` is checked at each use.
        max_tokens: capacity summed over all sequences of the batch; the
            pool holds at least that many tokens, partial last pages
            included (``ceil(max_tokens / page_size) + batch - 1`` pages).
            Padding tokens of a batch are not stored and do not count.
        kv_dtype: page storage of K and V: ``"float32"``, ``"float16"``,
            ``"bfloat16"``, ``"int8"``, ``"int4"``, ``"float8_e4m3fn"``,
            ``"float8_e5m2"`` (or the numpy / torch dtype).
        page_size: tokens per page.
        batch_size: the number of sequences (batch rows, beams included)
            the pool is sized for. ``None``: the pool is made at the first
            forward pass, for its batch; ``pool`` is None until then.
        k_dtype, v_dtype: storage of K / V apart (default ``kv_dtype``).

    Attributes:
        pool: the :class:`cpuattn.PagePool` (``num_layers`` = the model's).
        nbytes: bytes of the pages the cache's sequences use, all layers,
            scales included (shared pages once); 0 before the first use.

    Behaviour:
        * float32 pages give the tokens of ``DynamicCache``; low-bit pages
          differ only by the storage's rounding. A prompt's prefill (a
          forward pass over an empty cache) attends over its exact K/V while
          storing them, as vLLM and ``QuantizedCache`` do; later passes read
          the pages.
        * ``get_seq_length`` counts mask columns (padding included), as
          ``DynamicCache``; the pool holds each row's real tokens only.
        * A full pool raises :class:`~cpuattn.PoolFullError` from the first
          layer's attention with the cache unchanged; any error inside a
          forward pass rolls the pass back.
        * ``crop``, ``reorder_cache`` (beam search), ``batch_repeat_interleave``,
          ``batch_select_indices`` and ``reset`` work; reordering forks pool
          sequences (shared pages, copy-on-write), never copies K/V.

    Raises at construction ShapeError / DTypeError for bad arguments (an
    unknown ``kv_dtype``, int4 with an odd head_dim). Raises CpuAttnError at
    the first forward pass (and each later one) for what it cannot serve:
    an attention implementation other than cpuattn's; an encoder-decoder
    model; layer types other than full and sliding attention (chunked,
    linear/hybrid, KV-sharing, indexed); K/V whose shape disagrees with the
    config or whose K and V head dims differ; layers updated out of order;
    K/V touched between ``update`` and attention; a non-causal module;
    dropout; or an attention keyword it does not honour. A mask that is not
    "causal over real tokens" raises ShapeError.
    """

    def __init__(self, config: Any, *, max_tokens: int, kv_dtype: Any = "int8",
                 page_size: int = 16, batch_size: int | None = None,
                 k_dtype: Any = None, v_dtype: Any = None):
        self.config = config.get_text_config(decoder=True)
        cfg = self.config
        self.max_tokens = _int_arg(max_tokens, "max_tokens")
        self.page_size = _int_arg(page_size, "page_size")
        self._batch_size = None if batch_size is None else _int_arg(batch_size, "batch_size")
        self.num_layers = int(cfg.num_hidden_layers)
        self.num_kv_heads = int(getattr(cfg, "num_key_value_heads", None)
                                or cfg.num_attention_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None)
                            or cfg.hidden_size // cfg.num_attention_heads)
        kv_dtype = _dtype_name(kv_dtype)
        self.k_dtype = kv_dtype if k_dtype is None else _dtype_name(k_dtype)
        self.v_dtype = kv_dtype if v_dtype is None else _dtype_name(v_dtype)
        # a one-page pool checks the dtypes (and int4's even head_dim) now
        PagePool(1, self.page_size, self.num_kv_heads, self.head_dim,
                 k_dtype=self.k_dtype, v_dtype=self.v_dtype)
        self._unservable = self._config_problem()
        windows = self._windows() if self._unservable is None else [None] * self.num_layers
        super().__init__(layers=[_LayerView(self, w) for w in windows])
        self.pool: PagePool | None = None
        self._seqs: list[int] = []              # pool sequence of each batch row
        self._real = torch.zeros((0, 0), dtype=torch.bool)  # (B, length): a stored token
        self._length = 0                        # mask columns, padding included
        self._step: _Step | None = None
        if self._batch_size is not None:
            self._make_pool(self._batch_size)

    # ---- what transformers asks ------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far per row, padding included (mask columns)."""
        return self._length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        """``(kv_length, kv_offset)``: masks span every column, sliding
        layers too (the window is checked and applied by the kernel)."""
        return self._length + query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        """Sequences held (batch rows), else the ``batch_size`` argument, else -1."""
        if self._seqs:
            return len(self._seqs)
        return -1 if self._batch_size is None else self._batch_size

    @property
    def nbytes(self) -> int:
        """Bytes of the pages the cache's sequences use (K, V and scales,
        all layers; a page shared by forks counted once)."""
        if not self._seqs:
            return 0
        pool = self._pool()
        used = np.unique(np.concatenate([pool.pages(s) for s in self._seqs]))
        return int(used.size) * (pool.nbytes // pool.num_pages)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args: Any, **kwargs: Any) -> tuple[PagedKV, PagedKV]:
        """Hold layer ``layer_idx``'s new K/V ``(batch, num_kv_heads, q_len,
        head_dim)`` for its attention call; return the :class:`PagedKV`
        stand-in (as both K and V) that the "cpuattn" attention function
        resolves.

        Layer 0 starts a forward pass (rolling back one that never
        finished); later layers must come in order, each after the
        previous layer's attention. Raises CpuAttnError otherwise, or for a
        model / attention implementation the cache cannot serve.
        """
        step = self._step
        if layer_idx == 0:
            self._abort()
            self._check_servable(key_states, value_states)
            step = self._step = _Step(key_states.shape[2])
            step.shape = tuple(key_states.shape)
        elif step is None or step.pending is not None or layer_idx != step.next_layer \
                or tuple(key_states.shape) != step.shape:
            expected = None if step is None else step.next_layer
            self._abort()
            raise CpuAttnError(
                f"PagedCache: update of layer {layer_idx} came out of order (expected layer "
                f"{expected}, each after the previous layer's cpuattn attention call, with "
                "K/V of the same shape); this model's layers cannot share one paged pool")
        step.pending = (layer_idx, key_states, value_states)
        kv = PagedKV.make(self, layer_idx)
        return kv, kv

    # ---- cache surgery between forward passes --------------------------------

    def reset(self) -> None:
        """Drop every sequence (the pool stays, all pages free)."""
        self._abort()
        self._drop_sequences()
        self._length = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` columns (a negative int, as
        ``DynamicCache.crop``; 0 does nothing)."""
        self._abort()
        n = int(tokens_to_remove)
        if n > 0 or -n > self._length:
            raise ShapeError(f"tokens_to_remove: expected an int in [-{self._length}, 0], "
                             f"got {tokens_to_remove!r}")
        if n == 0 or not self._seqs:
            return
        keep = self._length + n
        pool = self._pool()
        for s, row in zip(self._seqs, self._real):
            pool.truncate(s, int(row[:keep].sum()))
        self._real = self._real[:, :keep]
        self._length = keep

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Row i becomes old row ``beam_idx[i]`` (beam search): forks, no copies."""
        self._reindex(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each row repeated ``repeats`` times in place."""
        self._reindex(torch.arange(len(self._seqs)).repeat_interleave(int(repeats)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices``."""
        self._reindex(indices)

    def _reindex(self, indices: Any) -> None:
        self._abort()
        if not self._seqs:
            return
        idx = torch.as_tensor(indices).reshape(-1).cpu()
        rows = idx.tolist()
        if any(not -len(self._seqs) <= i < len(self._seqs) for i in rows):
            raise ShapeError(f"indices: expected rows in [0, {len(self._seqs)}), got {rows}")
        real = self._real[idx]
        new = [self._pool().fork(self._seqs[i]) for i in rows]
        self._drop_sequences()
        self._seqs, self._real = new, real

    # ---- internals ---------------------------------------------------------------

    def _config_problem(self) -> str | None:
        """Why this config cannot be served, or None."""
        cfg = self.config
        if getattr(cfg, "is_encoder_decoder", False):
            return "encoder-decoder models are not supported"
        types, _ = get_layer_types_and_kwargs(cfg)
        bad = sorted(set(types) - set(_LAYER_TYPES))
        if bad or len(types) != self.num_layers:
            return (f"layer types {bad or types} are not supported (only "
                    f"{', '.join(_LAYER_TYPES)})")
        return None

    def _windows(self) -> list[int | None]:
        types, kwargs = get_layer_types_and_kwargs(self.config)
        return [kw.get("sliding_window") if t == "sliding_attention" else None
                for t, kw in zip(types, kwargs)]

    def _check_servable(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """CpuAttnError for what this cache cannot serve, at every layer-0 update."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        from . import hf
        impl = getattr(self.config, "_attn_implementation", None)
        if ALL_ATTENTION_FUNCTIONS.get(impl) is not hf.attention_forward:
            raise CpuAttnError(
                f"attn_implementation: PagedCache needs the 'cpuattn' attention function "
                f"(cpuattn.integrations.hf.register(), then attn_implementation='cpuattn'), "
                f"got {impl!r}, which would read K/V the cache does not keep")
        if self._unservable is not None:
            raise CpuAttnError(f"config: PagedCache cannot serve {type(self.config).__name__}: "
                               f"{self._unservable}")
        want = (self.num_kv_heads, self.head_dim)
        if k.ndim != 4 or (k.shape[1], k.shape[3]) != want or v.shape != k.shape:
            raise CpuAttnError(
                f"key_states/value_states: PagedCache expected (batch, {want[0]}, q_len, "
                f"{want[1]}) for both (from the config), got {tuple(k.shape)} and "
                f"{tuple(v.shape)}")
        if self._seqs and k.shape[0] != len(self._seqs):
            raise ShapeError(f"key_states: the cache holds {len(self._seqs)} sequences, "
                             f"got a batch of {k.shape[0]}")

    def _make_pool(self, batch: int) -> PagePool:
        # every sequence may end in a partial page: ceil(max/P) + batch - 1
        pages = -(-self.max_tokens // self.page_size) + batch - 1
        self.pool = PagePool(pages, self.page_size, self.num_kv_heads, self.head_dim,
                             k_dtype=self.k_dtype, v_dtype=self.v_dtype,
                             num_layers=self.num_layers)
        return self.pool

    def _pool(self) -> PagePool:
        """The pool, which exists whenever sequences do."""
        if self.pool is None:
            raise CpuAttnError("PagedCache: no pool yet (made at the first forward pass)")
        return self.pool

    def _drop_sequences(self) -> None:
        for s in self._seqs:
            self._pool().free_sequence(s)
        self._seqs, self._real = [], torch.zeros((0, self._length), dtype=torch.bool)

    def _abort(self) -> None:
        """Roll back a forward pass that did not reach its last layer."""
        step, self._step = self._step, None
        if step is None or not step.placed:
            return
        if step.plan is not None:
            step.plan.close()
        if step.created:
            self._drop_sequences()
        else:
            for s, n in zip(self._seqs, step.lengths):
                self._pool().truncate(s, n)

    def _place(self, step: _Step, real_new: torch.Tensor) -> None:
        """Reserve the real new tokens of every row (all-or-nothing) and plan."""
        batch = real_new.shape[0]
        pool = self._make_pool(batch) if self.pool is None else self.pool
        created = not self._seqs
        if created and self._batch_size not in (None, batch):
            raise ShapeError(f"batch_size: the cache was made for {self._batch_size} "
                             f"sequences, got a batch of {batch}")
        counts = real_new.sum(1).tolist()
        lengths = [0] * batch if created else [pool.seq_len(s) for s in self._seqs]
        P = pool.page_size
        need = sum(-(-(n0 + n) // P) - -(-n0 // P) for n0, n in zip(lengths, counts))
        need += self._tail_copies(lengths, counts)
        if need > pool.num_free_pages:
            raise PoolFullError(
                f"max_tokens: the pool ({pool.num_pages} pages of {P} tokens for "
                f"max_tokens={self.max_tokens}) has {pool.num_free_pages} free pages, "
                f"{need} are needed for {sum(counts)} more tokens")
        step.placed, step.created, step.lengths = True, created, lengths
        if created:
            self._seqs = [pool.create_sequence() for _ in range(batch)]
            self._real = torch.zeros((batch, self._length), dtype=torch.bool)
        # counted above, a reserve cannot fail; were it to, _abort truncates back
        step.slots = np.concatenate([pool.reserve(s, n) for s, n in zip(self._seqs, counts)])
        step.real_new, step.everything = real_new, bool(real_new.all())
        step.cu = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        step.fresh = not any(lengths)
        step.plan = pool.plan(self._seqs, cu_seqlens_q=step.cu)

    def _tail_copies(self, lengths: list[int], counts: list[int]) -> int:
        """Pages the reserves will copy: a partial last page that h rows
        share (forks, beams; nothing else holds pages between passes) is
        copied by each of the r rows that grow while another holder is left."""
        if not self._seqs:
            return 0
        P = self._pool().page_size
        tails: dict[int, list[int]] = {}      # last page -> [rows holding it, rows growing]
        for s, n0, n in zip(self._seqs, lengths, counts):
            if n0 % P:
                held = tails.setdefault(int(self._pool().pages(s)[-1]), [0, 0])
                held[0] += 1
                held[1] += n > 0
        return sum(r - (r == h) for h, r in tails.values() if r)

    def _commit(self, step: _Step) -> None:
        step.plan.close()
        self._real = torch.cat([self._real, step.real_new], dim=1)
        self._length += step.q_len
        self._step = None


def _real_new(allowed: torch.Tensor | None, batch: int, q_len: int, past: int) -> torch.Tensor:
    """(batch, q_len) bool: which new tokens are real. A real token sees
    itself; a padding token is hidden from every query, itself included."""
    if allowed is None:
        return torch.ones((batch, q_len), dtype=torch.bool)
    i = torch.arange(q_len)
    return allowed[:, i, past + i]


def _check_mask(allowed: torch.Tensor | None, real: torch.Tensor, q_len: int,
                left: int | None) -> None:
    """ShapeError unless every real query row of ``allowed`` (B, q_len, K)
    sees exactly the real keys up to itself, within ``left`` real tokens
    before it: what paged attention over the row's stored tokens computes.
    ``real`` (B, K) marks the real columns (new ones included)."""
    if allowed is None:
        if not bool(real.all()):
            raise ShapeError("attention_mask: None, but the cache holds padding tokens of an "
                             "earlier call; pass the attention_mask covering every column")
        return
    kv_len = real.shape[1]
    past = kv_len - q_len
    pos = real.cumsum(-1) - 1                                   # pool position of a column
    j = torch.arange(kv_len)
    col_q = past + torch.arange(q_len)
    expect = real[:, None, :] & (j[None, None, :] <= col_q[None, :, None])
    if left is not None:
        expect &= pos[:, None, :] >= pos[:, col_q, None] - left
    rows = real[:, past:]                                       # real query rows
    if not torch.equal(allowed[rows], expect[rows]):
        raise ShapeError(
            "attention_mask: PagedCache stores each row's real tokens and runs causal "
            "attention over them (and the layer's sliding window); this mask is not of that "
            "form (padding inside a window, a bidirectional or block mask, or keys hidden "
            "from some queries only)")


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: PagedKV,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, softcap: float | None = None,
                      sliding_window: int | None = None, **kwargs: Any
                      ) -> tuple[torch.Tensor, None]:
    """The "cpuattn" attention function's path for K/V of a :class:`PagedCache`
    (``cpuattn.integrations.hf.attention_forward`` sends it here).

    Args:
        module: the attention module (``is_causal`` must not be False).
        query: ``(batch, num_heads, q_len, head_dim)`` CPU tensor, float32,
            float16 or bfloat16; ``num_heads % num_kv_heads == 0``.
        key, value: the :class:`PagedKV` stand-in of one layer (the same object).
        attention_mask: None or the 4-D mask transformers built (bool or
            additive), over ``get_seq_length() + q_len`` columns.
        scaling, softcap, sliding_window: as the module passes them.
        kwargs: gpt-oss's ``s_aux`` (or ``sinks``) are honoured; keywords
            with no effect are ignored; any other keyword with a value
            raises CpuAttnError.

    Returns:
        ``(attn_output (batch, q_len, num_heads, head_dim), None)`` in
        query's dtype; padding query rows are 0.

    On the first layer of a forward pass the real new tokens are reserved
    in the pool (PoolFullError if they do not fit, nothing changed); each
    layer then writes its K/V (quantising) and runs paged attention over
    the pages (a prompt's prefill, over an empty cache: varlen attention
    over its exact K/V). Any error rolls the whole forward pass back.
    """
    cache = key.cache
    try:
        return _attend(cache, module, query, key, value, attention_mask, dropout, scaling,
                       is_causal, softcap, sliding_window, kwargs)
    except BaseException:
        cache._abort()
        raise


def _attend(cache: PagedCache, module: torch.nn.Module, query: torch.Tensor, key: PagedKV,
            value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float,
            scaling: float | None, is_causal: bool | None, softcap: float | None,
            sliding_window: int | None, kwargs: dict[str, Any]) -> tuple[torch.Tensor, None]:
    from . import hf
    step, layer = cache._step, key.layer
    if value is not key or step is None or step.pending is None or step.pending[0] != layer:
        raise CpuAttnError(f"key/value: not the K/V that PagedCache.update returned for layer "
                           f"{layer} in this forward pass")
    if dropout:
        raise CpuAttnError(f"dropout: cpuattn has no attention dropout, got {dropout}")
    if is_causal is False or not getattr(module, "is_causal", True):
        raise CpuAttnError("is_causal: PagedCache serves causal (decoder) attention only, "
                           "got a non-causal attention module")
    sinks = kwargs.pop("s_aux", None)
    if sinks is None:
        sinks = kwargs.pop("sinks", None)
    hf._refuse_unhonoured(kwargs, attention_mask)
    _, k_new, v_new = step.pending
    b, hkv, q_len, d = k_new.shape
    if query.ndim != 4 or query.shape[0] != b or query.shape[2] != q_len \
            or query.shape[3] != d or query.shape[1] % hkv:
        raise ShapeError(f"query: expected ({b}, a multiple of {hkv}, {q_len}, {d}), "
                         f"got {tuple(query.shape)}")
    left = None if sliding_window is None else int(sliding_window) - 1
    # every layer of a type gets the same mask: read and check it once a step
    if not step.placed or not any(m is attention_mask and w == left for m, w in step.checked):
        past = cache._length
        allowed = None if attention_mask is None else hf._bool_mask(attention_mask, b, q_len,
                                                                     past + q_len)
        real_new = step.real_new if step.placed else _real_new(allowed, b, q_len, past)
        real = torch.cat([cache._real, real_new], 1) if cache._seqs else real_new
        _check_mask(allowed, real, q_len, left)
        step.checked.append((attention_mask, left))
        if not step.placed:
            cache._place(step, real_new)
    real_new, everything = step.real_new, step.everything
    k = k_new.transpose(1, 2)                                   # (B, q, Hkv, D)
    v = v_new.transpose(1, 2)
    q = query.transpose(1, 2)
    if everything:
        k, v, q = (x.reshape(b * q_len, *x.shape[2:]) for x in (k, v, q))
    else:
        k, v, q = k[real_new], v[real_new], q[real_new]
    kn, vn, qn = _to_numpy(k, "key"), _to_numpy(v, "value"), _to_numpy(q, "query")
    cache._pool().write(layer, step.slots, kn, vn)
    opts: dict[str, Any] = dict(causal=True, scale=scaling, softcap=float(softcap or 0.0),
                                window=(-1 if left is None else left, -1))
    if sinks is not None:
        opts["sinks"] = sinks.detach().float().numpy() if isinstance(sinks, torch.Tensor) \
            else sinks
    if step.fresh:
        # a prompt's prefill attends over its exact K/V, as vLLM and
        # transformers' QuantizedCache do: low-bit pages then err only where
        # later passes read them (6-8x smaller logit error, RESULTS.md)
        out = attention_varlen(qn, kn, vn, step.cu, step.cu, **opts)
    else:
        out = step.plan.run(qn, layer=layer, **opts)
    out = _to_torch(out)
    if everything:
        result = out.reshape(b, q_len, *out.shape[1:])
    else:
        result = out.new_zeros((b, q_len, *out.shape[1:]))
        result[real_new] = out
    step.pending = None
    step.next_layer += 1
    if step.next_layer == cache.num_layers:
        cache._commit(step)
    if torch.is_grad_enabled() and query.requires_grad:
        result = hf._NoBackward.apply(result, query)
    return result, None


__all__ = ["PagedCache", "PagedKV", "attention_forward"]
