"""The C-level paged KV page pool (csrc/pool.c) as a Python class.

Python checks argument types and shapes and converts K/V rows to the pool
dtype; the C side owns all state and does every metadata change and copy
under its own mutex with the GIL released, returning status codes that are
turned into exceptions here. A failed call changes nothing.
"""
import importlib
import numbers
import os
import sys
import threading
import weakref

import numpy as np

from libc.stdint cimport int32_t, int64_t
cimport numpy as cnp

from . import _quant
from ._plan import PoolPlan
from . import _validate as V
from .errors import DTypeError, PageError, PoolFullError, ShapeError

cnp.import_array()

cdef extern from "pool.h" nogil:
    enum:
        CPA_PLANE_K
        CPA_PLANE_V
        CPA_PLANE_KS
        CPA_PLANE_VS
        CPA_PLANES
    ctypedef struct cpa_pool:
        char *plane[4]
    enum:
        CPA_POOL_OK
        CPA_POOL_EUNKNOWN
        CPA_POOL_EFREED
        CPA_POOL_EFULL
        CPA_POOL_ENOMEM
        CPA_POOL_ELEN
        CPA_POOL_ETOOLONG
        CPA_POOL_ERETRY
        CPA_POOL_ESLOT
        CPA_POOL_EFREESLOT
    cpa_pool *cpa_pool_new(int64_t num_pages, int64_t page_size, int64_t num_layers,
                           const int64_t *row_bytes)
    void cpa_pool_destroy(cpa_pool *p)
    int64_t cpa_pool_num_free(cpa_pool *p)
    int64_t cpa_pool_num_alive(cpa_pool *p)
    int cpa_pool_create_seq(cpa_pool *p, int64_t *seq_out)
    int cpa_pool_seq_len(cpa_pool *p, int64_t seq, int64_t *len_out)
    int cpa_pool_append(cpa_pool *p, int64_t seq, const char *const *rows, int64_t n,
                        int64_t *need_out)
    int cpa_pool_reserve(cpa_pool *p, int64_t seq, int64_t n, int64_t *slots, int64_t *need_out)
    int cpa_pool_write(cpa_pool *p, int64_t layer, const int64_t *slots, int64_t n,
                       const char *const *rows, int64_t *bad_out)
    int cpa_pool_fork(cpa_pool *p, int64_t seq, int64_t *seq_out)
    int cpa_pool_truncate(cpa_pool *p, int64_t seq, int64_t length, int64_t *len_out)
    int cpa_pool_free_seq(cpa_pool *p, int64_t seq)
    int cpa_pool_pages(cpa_pool *p, int64_t seq, int32_t *out, int64_t cap, int64_t *npages_out)
    int cpa_pool_gather(cpa_pool *p, int64_t seq, int64_t layer, char *const *out, int64_t cap,
                        int64_t *len_out)
    int cpa_pool_block_table(cpa_pool *p, const int64_t *seqs, int64_t n, int pin,
                             int32_t *table, int64_t width, int32_t *lens, int64_t *width_out,
                             int64_t *bad_out)
    void cpa_pool_unpin(cpa_pool *p, const int32_t *table, int64_t n, int64_t width,
                        const int32_t *lens)
    void cpa_pool_refcounts(cpa_pool *p, int32_t *out)
    int cpa_pool_check(cpa_pool *p, char *msg, size_t msg_len)
    void cpa_pool_fork_prepare(cpa_pool *p)
    void cpa_pool_fork_parent(cpa_pool *p)
    void cpa_pool_fork_child(cpa_pool *p)

ctypedef int (*seq_query)(cpa_pool *p, int64_t seq, int64_t *out) noexcept nogil

_INT64_MAX = 2**63 - 1


def _pool_dtype(dtype, name="dtype"):
    """The storage of K or V pages: (numpy dtype of the page array, KVFormat
    or None for float storage), or DTypeError."""
    # by name, or the numpy dtype of int8 / fp8 codes (uint8 stays a float error)
    key = dtype if isinstance(dtype, str) else np.dtype(dtype).name if V._is_dtype(dtype) else None
    if key in V.LOW_BIT_NAMES and (key != "int4" or isinstance(dtype, str)):
        fmt = V.kv_format(dtype, name)
        return fmt.codes_dtype, fmt
    return _float_dtype(dtype, name), None


def _float_dtype(dtype, name):
    if isinstance(dtype, str) and dtype == "bfloat16":
        try:
            # import_module honours a None entry in sys.modules (Cython's own
            # import does not), so "ml_dtypes missing" can be tested.
            ml_dtypes = importlib.import_module("ml_dtypes")
        except ImportError:
            raise DTypeError(f"{name}: bfloat16 pages need the ml_dtypes package "
                             "(pip install ml_dtypes)") from None
        return np.dtype(ml_dtypes.bfloat16)
    try:
        dt = None if dtype is None else np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in V.DTYPE_NAMES:
        raise DTypeError(f"{name}: expected float32, float64, float16, bfloat16, int8, int4, "
                         f"float8_e4m3fn or float8_e5m2, got {dtype!r}")
    return dt


def _positive_int(x, name):
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral) \
            or not 1 <= x <= V.INDEX_MAX:
        raise ShapeError(f"{name}: expected an int in [1, {V.INDEX_MAX}], got {x!r}")
    return int(x)


def _seq_id(seq, name="seq"):
    """A sequence id as a Python int, or PageError."""
    if isinstance(seq, (bool, np.bool_)) or not isinstance(seq, numbers.Integral):
        raise PageError(f"{name}: expected an int sequence id, got {seq!r}")
    seq = int(seq)
    if not 0 <= seq <= _INT64_MAX:
        raise PageError(f"{name}: unknown sequence id {seq}")
    return seq


cdef inline int _check(int rc, seq) except -1:
    """Raise the error of a pool status other than CPA_POOL_OK for sequence seq."""
    if rc != CPA_POOL_OK:
        raise _seq_error(rc, seq)
    return 0


def _seq_error(int rc, seq, name="seq"):
    if rc == CPA_POOL_EUNKNOWN:
        return PageError(f"{name}: unknown sequence id {seq} (never created by this pool)")
    if rc == CPA_POOL_EFREED:
        return PageError(f"{name}: sequence id {seq} was freed")
    if rc == CPA_POOL_ENOMEM:
        return MemoryError("PagePool: cannot allocate sequence metadata")
    return RuntimeError(f"cpuattn internal error: pool status {rc}")


cdef class PagePool:
    """A paged KV cache: page storage and page chains in C memory.

    ``PagePool(num_pages, page_size, num_kv_heads, head_dim, dtype="float32",
    *, k_dtype=None, v_dtype=None, num_layers=1)``

    K and V storage each have shape ``(num_pages, page_size, num_kv_heads,
    head_dim)`` in their storage dtype: float32, float64, float16, bfloat16
    (needs ``ml_dtypes``) or a low-bit KV format: ``"int8"``, ``"int4"``
    (``head_dim // 2`` bytes of nibble pairs, even ``head_dim``),
    ``"float8_e4m3fn"``, ``"float8_e5m2"`` (``ml_dtypes``). ``k_dtype`` and
    ``v_dtype`` default to ``dtype``. Low-bit storage keeps its scales beside
    the pages (``k_scales``, ``v_scales``: float32 per token and kv head;
    float16 per group of 32 elements for int4), and ``append`` quantises
    with exactly the bytes of :func:`cpuattn.quantize_kv`. Each plane is one
    64-byte aligned, zero-initialised allocation. Sequences are chains of
    pages; pages are reference counted, so ``fork`` shares them and a write
    into a shared partial last page copies it (and its scales) first
    (copy-on-write). Sequence ids are never reused: a freed or unknown id
    raises ``PageError``.

    With ``num_layers=L > 1`` the pool holds every layer of a model: one
    free list and one page chain per sequence for all layers, storage
    ``(L, num_pages, page_size, ...)``; ``append`` takes ``(L, n,
    num_kv_heads, head_dim)`` and ``attention``, ``gather``, ``write`` and
    ``plan(...).run`` take the layer.

    The serving order per step: ``slots = reserve(seq, n)`` for every
    sequence, ``plan = plan(seqs, ...)``, then per layer ``write(layer,
    slots, k, v)`` and ``plan.run(q, layer=layer)``; ``plan.close()``.

    Attributes:
        num_pages, page_size, num_kv_heads, head_dim, num_layers: the
            constructor's ints.
        dtype: the ``dtype`` argument: a numpy dtype, or the format name for
            low-bit storage.
        k_dtype, v_dtype: the storage of K and V by name (e.g. ``"float16"``,
            ``"int8"``, ``"int4"``).
        num_free_pages: pages on the free list now.
        nbytes: bytes of all storage: K, V and their scales, all layers.
        k_pages, v_pages: zero-copy writable numpy views of the storage, for
            the functional API (``cpuattn.paged_attention``); they keep the
            pool's memory alive. ``(num_layers, ...)`` when num_layers > 1.
        k_scales, v_scales: zero-copy views of the scales of low-bit
            storage, shaped as ``paged_attention``'s ``k_scale``; None for
            float storage.

    All methods may be called from several threads at once; each is atomic.
    An ``attention`` call pins the pages it reads, so a sequence freed or
    truncated meanwhile keeps its pages until the call returns.

    Raises:
        ShapeError: a size argument is not an int in ``[1, 2**31 - 1]``, an
            odd ``head_dim`` for int4, or the storage size overflows the
            address space.
        DTypeError: unsupported ``dtype`` (or bfloat16/fp8 without ml_dtypes).
        MemoryError: the storage cannot be allocated.
    """
    cdef cpa_pool *_p
    cdef readonly int64_t num_pages, page_size, num_kv_heads, head_dim, num_layers
    cdef readonly object dtype, k_dtype, v_dtype
    cdef object _page_dtype, _fmt          # per plane K, V: numpy dtype, KVFormat or None
    cdef int64_t _row_bytes[4]
    cdef object __weakref__

    def __cinit__(self, num_pages, page_size, num_kv_heads, head_dim, dtype="float32", *,
                  k_dtype=None, v_dtype=None, num_layers=1):
        dims = [_positive_int(x, name) for x, name in (
            (num_pages, "num_pages"), (page_size, "page_size"),
            (num_kv_heads, "num_kv_heads"), (head_dim, "head_dim"))]
        self.num_pages, self.page_size, self.num_kv_heads, self.head_dim = dims
        self.num_layers = _positive_int(num_layers, "num_layers")
        storage = [_pool_dtype(dtype, "dtype")]
        self.dtype = storage[0][1].name if storage[0][1] is not None else storage[0][0]
        storage = [storage[0] if x is None else _pool_dtype(x, name)
                   for x, name in ((k_dtype, "k_dtype"), (v_dtype, "v_dtype"))]
        self._page_dtype = [dt for dt, _ in storage]
        self._fmt = [fmt for _, fmt in storage]
        self.k_dtype, self.v_dtype = [fmt.name if fmt is not None else dt.name for dt, fmt in storage]
        cdef int i
        cdef int64_t rb[4]
        planes = [0, 0, 0, 0]   # row bytes of K, V, K scales, V scales (Python ints)
        for i in range(2):
            fmt = self._fmt[i]
            if fmt is not None and fmt.group and self.head_dim % 2:
                raise ShapeError(f"head_dim: int4 storage needs an even head_dim, got {self.head_dim}")
            planes[i] = self.num_kv_heads * self._row_shape(i)[1] * self._page_dtype[i].itemsize
            if fmt is not None:
                planes[2 + i] = self.num_kv_heads * int(np.prod(self._scale_row(i))) \
                    * fmt.scale_dtype.itemsize
        total = sum(planes) * self.num_pages * self.page_size * self.num_layers
        if total > sys.maxsize - 256:
            raise ShapeError(
                f"PagePool: {total} bytes of page storage (num_layers * num_pages * page_size "
                f"* row bytes, K, V and scales) exceeds the address space ({sys.maxsize})")
        for i in range(4):
            rb[i] = self._row_bytes[i] = planes[i]
        self._p = cpa_pool_new(self.num_pages, self.page_size, self.num_layers, rb)
        if self._p == NULL:
            raise MemoryError(f"PagePool: cannot allocate {total} bytes of page storage")
        _live_pools.add(self)

    def _row_shape(self, int i):
        """(num_kv_heads, elements of a head's row) of plane K (0) or V (1)."""
        fmt = self._fmt[i]
        return (self.num_kv_heads, self.head_dim // 2 if fmt is not None and fmt.group
                else self.head_dim)

    def _scale_row(self, int i):
        """Shape of a head's scales in plane K (0) or V (1): () or (groups,)."""
        fmt = self._fmt[i]
        return V.scale_shape(fmt, (), self.head_dim)

    def __dealloc__(self):
        cpa_pool_destroy(self._p)
        self._p = NULL

    cdef void _fork_hook(self, int stage) noexcept:
        if self._p == NULL:
            return
        if stage == 0:
            # with the GIL held: a thread inside a pool call never needs the
            # GIL to finish it, and holding it keeps new calls out
            cpa_pool_fork_prepare(self._p)
        elif stage == 1:
            cpa_pool_fork_parent(self._p)
        else:
            cpa_pool_fork_child(self._p)

    def __repr__(self):
        return (f"PagePool(num_pages={self.num_pages}, page_size={self.page_size}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"k_dtype='{self.k_dtype}', v_dtype='{self.v_dtype}', "
                f"num_layers={self.num_layers}, "
                f"free_pages={self.num_free_pages}, sequences={cpa_pool_num_alive(self._p)})")

    @property
    def num_free_pages(self):
        """Number of pages on the free list."""
        cdef int64_t n
        with nogil:
            n = cpa_pool_num_free(self._p)
        return n

    @property
    def nbytes(self):
        """Bytes of page storage: K, V and the scales of low-bit storage."""
        cdef int i
        return (sum(self._row_bytes[i] for i in range(4)) * self.num_pages * self.page_size
                * self.num_layers)

    cdef object _view(self, int plane, dtype, tuple row):
        """Zero-copy view of a plane as (num_pages, page_size) + row in dtype,
        with a leading layer axis when num_layers > 1."""
        cdef cnp.npy_intp n = (self._row_bytes[plane] * self.num_pages * self.page_size
                               * self.num_layers)
        cdef cnp.ndarray raw = cnp.PyArray_SimpleNewFromData(1, &n, cnp.NPY_UINT8,
                                                              self._p.plane[plane])
        cnp.set_array_base(raw, self)  # the view owns a reference to the pool
        lead = (self.num_layers,) if self.num_layers > 1 else ()
        return raw.view(dtype).reshape(lead + (self.num_pages, self.page_size) + row)

    def _layer(self, layer):
        """A layer index as an int in [0, num_layers), or ShapeError."""
        if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, numbers.Integral) \
                or not 0 <= layer < self.num_layers:
            raise ShapeError(f"layer: expected an int in [0, {self.num_layers}), got {layer!r}")
        return int(layer)

    def _layer_views(self, layer):
        """(k_pages, v_pages, k_scales, v_scales) of one layer: 4-D views
        (scales None for float storage)."""
        views = (self.k_pages, self.v_pages, self.k_scales, self.v_scales)
        if self.num_layers == 1:
            return views
        return tuple(None if x is None else x[layer] for x in views)

    @property
    def k_pages(self):
        """Zero-copy view of the K storage, ``(num_pages, page_size, num_kv_heads,
        head_dim)`` (``head_dim // 2`` uint8 for int4), ``(num_layers, ...)``
        when num_layers > 1."""
        return self._view(CPA_PLANE_K, self._page_dtype[0], self._row_shape(0))

    @property
    def v_pages(self):
        """Zero-copy view of the V storage, as ``k_pages``."""
        return self._view(CPA_PLANE_V, self._page_dtype[1], self._row_shape(1))

    @property
    def k_scales(self):
        """Zero-copy view of the K scales of low-bit storage, ``(num_pages,
        page_size, num_kv_heads)`` float32 (int4: ``(..., ceil(head_dim / 32))``
        float16); None for float storage."""
        return self._scales(0)

    @property
    def v_scales(self):
        """The V scales, as ``k_scales``."""
        return self._scales(1)

    def _scales(self, int i):
        fmt = self._fmt[i]
        if fmt is None:
            return None
        return self._view(CPA_PLANE_KS + i, fmt.scale_dtype,
                          (self.num_kv_heads,) + self._scale_row(i))

    def create_sequence(self):
        """A new empty sequence; returns its id (an int, never reused)."""
        cdef int64_t sid = 0
        cdef int rc
        with nogil:
            rc = cpa_pool_create_seq(self._p, &sid)
        if rc != CPA_POOL_OK:
            raise _seq_error(rc, None)
        return sid

    cdef int64_t _ask(self, seq_query f, seq) except? -1:
        """f(pool, seq id, &out) for sequence seq, checked: out."""
        cdef int64_t sid = _seq_id(seq), out = 0
        cdef int rc
        with nogil:
            rc = f(self._p, sid, &out)
        _check(rc, seq)
        return out

    def seq_len(self, seq):
        """Number of tokens in sequence ``seq``. PageError if unknown or freed."""
        return self._ask(cpa_pool_seq_len, seq)

    def _rows(self, x, name, int i, bint all_layers):
        """x as contiguous rows of plane K (0) or V (1) in its storage: the
        page dtype (numpy / ml_dtypes casts, round to nearest even), or
        low-bit codes and their scales (quantize_kv's bytes). x is (n,
        num_kv_heads, head_dim), or with all_layers and num_layers > 1
        (num_layers, n, num_kv_heads, head_dim). Returns (rows, scales or
        None, n)."""
        arr = V.as_array(x, name)
        lead = (self.num_layers,) if all_layers and self.num_layers > 1 else ()
        layout = "(" + "".join(f"{n}, " for n in lead) + f"n, {self.num_kv_heads}, {self.head_dim})"
        V.check_ndim(arr, name, 3 + len(lead), layout)
        shape = arr.shape[len(lead):]   # (n, num_kv_heads, head_dim)
        if arr.shape[:len(lead)] != lead or shape[1:] != (self.num_kv_heads, self.head_dim):
            raise ShapeError(f"{name}: expected shape {layout}, got {arr.shape}")
        n = shape[0]
        if n > V.INDEX_MAX:  # before the conversion copies it
            raise ShapeError(f"{name}: a sequence would exceed {V.INDEX_MAX} tokens "
                             f"with {n} rows")
        fmt = self._fmt[i]
        if fmt is None:
            return np.ascontiguousarray(arr, dtype=self._page_dtype[i]), None, n
        flat = np.ascontiguousarray(arr.reshape(-1, self.head_dim), dtype=np.float32)
        return _quant.quantize_rows(flat, fmt.code, fmt.codes_dtype) + (n,)

    cdef int _planes(self, k, v, bint all_layers, const char **rows, list keep) except -1:
        """Rows of k and v for the C pool: rows[plane] (NULL for an absent
        plane); keep receives the buffers. Returns n."""
        ka, ks, n = self._rows(k, "k", 0, all_layers)
        va, vs, nv = self._rows(v, "v", 1, all_layers)
        if nv != n:
            raise ShapeError(f"v: expected {n} rows (as k), got {nv}")
        keep[:] = [ka, va, ks, vs]
        cdef int i
        for i in range(4):
            rows[i] = NULL
            if keep[i] is not None:
                rows[i] = <const char *>cnp.PyArray_DATA(<cnp.ndarray>keep[i])
        return n

    cdef int _grown(self, int rc, seq, int64_t n, int64_t need, str what) except -1:
        """Raise the error of a failed append / reserve of n tokens."""
        if rc == CPA_POOL_EFULL:
            raise PoolFullError(
                f"{what}: sequence {seq} needs {need} free pages for {n} tokens "
                f"(page_size {self.page_size}), the pool has {self.num_free_pages} "
                f"of {self.num_pages} free")
        if rc == CPA_POOL_ETOOLONG:
            raise ShapeError(f"{'k' if what == 'append' else 'n'}: sequence {seq} would exceed "
                             f"{V.INDEX_MAX} tokens with {n} more")
        return _check(rc, seq)

    def append(self, seq, k, v):
        """Append tokens to sequence ``seq``.

        Args:
            seq: sequence id.
            k, v: ``(n, num_kv_heads, head_dim)`` (``(num_layers, n,
                num_kv_heads, head_dim)`` when num_layers > 1), float32,
                float64, float16 or bfloat16 (any strides); converted to the
                storage dtype with round-to-nearest-even, or quantised
                (low-bit storage) with exactly the bytes of
                :func:`cpuattn.quantize_kv`.

        Takes free pages as needed; if the last page is partial and shared
        (by a fork, a plan, or pinned by a running ``attention`` call), it
        is copied to a fresh page first. All-or-nothing: on any error
        nothing changes.

        Raises:
            PageError: unknown or freed ``seq``.
            ShapeError / DTypeError: bad ``k`` or ``v``, or the sequence
                would exceed 2**31 - 1 tokens.
            PoolFullError: fewer free pages than the append needs.
        """
        cdef int64_t sid = _seq_id(seq), n, need = 0
        cdef int rc
        cdef const char *rows[4]
        keep = []
        n = self._planes(k, v, True, rows, keep)
        with nogil:
            rc = cpa_pool_append(self._p, sid, rows, n, &need)
        self._grown(rc, seq, n, need, "append")

    def reserve(self, seq, n):
        """Grow sequence ``seq`` by ``n`` tokens without writing them; returns
        their slots, int64 ``(n,)`` (``page * page_size + offset``), for
        :meth:`write` (every layer has the same slots).

        Pages are taken all-or-nothing, and a shared partial last page (a
        fork's, or one a plan holds) is copied first, as for :meth:`append`.
        The new rows hold whatever the pages held (zeros in a fresh pool)
        until written.

        Raises:
            PageError: unknown or freed ``seq``.
            ShapeError: ``n`` is not an int >= 0, or the sequence would
                exceed 2**31 - 1 tokens.
            PoolFullError: fewer free pages than ``n`` tokens need.
        """
        cdef int64_t sid = _seq_id(seq), cnt, need = 0
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, numbers.Integral) \
                or not 0 <= n <= V.INDEX_MAX:
            raise ShapeError(f"n: expected an int in [0, {V.INDEX_MAX}], got {n!r}")
        cnt = n
        cdef cnp.ndarray slots = np.empty(cnt, np.int64)
        cdef int64_t *sp = <int64_t *>cnp.PyArray_DATA(slots)
        cdef int rc
        with nogil:
            rc = cpa_pool_reserve(self._p, sid, cnt, sp, &need)
        self._grown(rc, seq, cnt, need, "reserve")
        return slots

    def write(self, layer, slots, k, v):
        """Store rows of one layer at slots (from :meth:`reserve`).

        Args:
            layer: int in ``[0, num_layers)``.
            slots: int ``(n,)`` slot ids; a negative slot is skipped (padding).
            k, v: ``(n, num_kv_heads, head_dim)`` of any float dtype,
                converted or quantised as by :meth:`append`.

        A plan made after the slots were reserved sees the rows in its later
        runs. All-or-nothing: every slot is checked before anything is
        written.

        Raises:
            PageError: a slot past the storage, or in a page no sequence or
                plan holds.
            ShapeError / DTypeError: bad ``layer``, ``slots``, ``k`` or ``v``.
        """
        cdef int64_t li = self._layer(layer), n, bad = 0
        cdef cnp.ndarray sl = V.check_slots(slots)
        cdef const char *rows[4]
        keep = []
        n = self._planes(k, v, False, rows, keep)
        if n != sl.shape[0]:
            raise ShapeError(f"k: expected {sl.shape[0]} rows (one per slot), got {n}")
        cdef const int64_t *sp = <const int64_t *>cnp.PyArray_DATA(sl)
        cdef int rc
        with nogil:
            rc = cpa_pool_write(self._p, li, sp, n, rows, &bad)
        if rc == CPA_POOL_ESLOT:
            raise PageError(f"slots[{bad}]: expected a slot in [0, {self.num_pages * self.page_size})"
                            f" (num_pages * page_size), got {sl[bad]}")
        if rc == CPA_POOL_EFREESLOT:
            raise PageError(f"slots[{bad}]: slot {sl[bad]} is in page {sl[bad] // self.page_size}, "
                            "which no sequence or plan holds (reserve the slots first)")
        _check(rc, None)

    def fork(self, seq):
        """A new sequence sharing all of ``seq``'s pages (reference counted);
        returns its id. Appends to either copy the shared partial last page
        first, so neither sees the other's new tokens. PageError if ``seq`` is
        unknown or freed."""
        return self._ask(cpa_pool_fork, seq)

    def truncate(self, seq, length):
        """Keep the first ``length`` tokens of ``seq``; pages no longer used are
        released (to the free list once no other sequence or pin holds them).
        Returns None.

        Raises:
            PageError: unknown or freed ``seq``.
            ShapeError: ``length`` is not an int in ``[0, seq_len(seq)]``
                (never clamped).
        """
        cdef int64_t sid = _seq_id(seq), cur = 0, ln
        cdef int rc
        if isinstance(length, (bool, np.bool_)) or not isinstance(length, numbers.Integral) \
                or not 0 <= length <= _INT64_MAX:
            raise ShapeError(f"length: expected an int >= 0, got {length!r}")
        ln = length
        with nogil:
            rc = cpa_pool_truncate(self._p, sid, ln, &cur)
        if rc == CPA_POOL_ELEN:
            raise ShapeError(f"length: expected at most seq_len ({cur}) of sequence {seq}, "
                             f"got {length}")
        _check(rc, seq)

    def free_sequence(self, seq):
        """Free sequence ``seq``: its id becomes invalid and each of its pages
        goes back to the free list once no other sequence or running
        ``attention`` call holds it. PageError if unknown or already freed."""
        cdef int64_t sid = _seq_id(seq)
        cdef int rc
        with nogil:
            rc = cpa_pool_free_seq(self._p, sid)
        _check(rc, seq)

    def pages(self, seq):
        """The page chain of ``seq``: int32 ``(ceil(seq_len / page_size),)``, a
        copy. PageError if unknown or freed."""
        cdef int64_t sid = _seq_id(seq), npages = 0
        cdef int rc = CPA_POOL_ERETRY
        cdef int64_t cap
        cdef cnp.ndarray out = None
        cdef int32_t *data
        while rc == CPA_POOL_ERETRY:  # the chain may grow between calls
            out = np.empty(npages, np.int32)
            data, cap = <int32_t *>cnp.PyArray_DATA(out), npages
            with nogil:
                rc = cpa_pool_pages(self._p, sid, data, cap, &npages)
        _check(rc, seq)
        return out[:npages]

    def gather(self, seq, *, layer=0):
        """Contiguous copies ``(k, v)`` of sequence ``seq`` in one layer, each
        ``(seq_len, num_kv_heads, head_dim)`` in the storage dtype, or float32
        (dequantised) for low-bit storage. PageError if unknown or freed,
        ShapeError for a layer out of range."""
        cdef int64_t sid = _seq_id(seq), length = 0, li = self._layer(layer)
        cdef int rc = CPA_POOL_ERETRY, i
        cdef int64_t cap
        cdef char *out[4]
        while rc == CPA_POOL_ERETRY:  # the sequence may grow between calls
            bufs = [np.empty((length, self._row_bytes[i]), np.uint8) for i in range(4)]
            for i in range(4):
                out[i] = <char *>cnp.PyArray_DATA(<cnp.ndarray>bufs[i])
            cap = length
            with nogil:
                rc = cpa_pool_gather(self._p, sid, li, out, cap, &length)
        _check(rc, seq)
        return tuple(self._decode(bufs[i][:length], bufs[2 + i][:length], i) for i in range(2))

    def _decode(self, rows, scales, int i):
        """Gathered bytes of plane K (0) or V (1) as (n, num_kv_heads, head_dim)."""
        fmt, n = self._fmt[i], rows.shape[0]
        if fmt is None:
            return rows.view(self._page_dtype[i]).reshape((n,) + self._row_shape(i))
        flat = rows.reshape(n * self.num_kv_heads, self._row_shape(i)[1])
        sc = scales.view(fmt.scale_dtype).reshape(n * self.num_kv_heads,
                                                  int(np.prod(self._scale_row(i))))
        out = _quant.dequantize_rows(flat, sc, fmt.code, self.head_dim, False)
        return out.reshape(n, self.num_kv_heads, self.head_dim)

    def _seq_ids(self, seqs):
        if isinstance(seqs, np.ndarray):
            if seqs.ndim != 1:
                raise ShapeError(f"seqs: expected a 1-D list of sequence ids, got shape "
                                 f"{seqs.shape}")
            seqs = seqs.tolist()
        try:
            items = list(seqs)
        except TypeError:
            raise ShapeError(f"seqs: expected a list of sequence ids, got "
                             f"{type(seqs).__name__}") from None
        return np.array([_seq_id(s, f"seqs[{i}]") for i, s in enumerate(items)],
                        dtype=np.int64).reshape(-1)

    def _table(self, cnp.ndarray ids, bint pin):
        cdef int64_t n = ids.shape[0], width = 0, bad = 0
        cdef int rc = CPA_POOL_ERETRY
        cdef int64_t cap
        cdef cnp.ndarray table = None, lens = np.empty(n, np.int32)
        cdef const int64_t *idp = <const int64_t *>cnp.PyArray_DATA(ids)
        cdef int32_t *lp = <int32_t *>cnp.PyArray_DATA(lens)
        cdef int32_t *tp
        while rc == CPA_POOL_ERETRY:  # chains may grow between calls
            table = np.empty((n, width), np.int32)
            tp, cap = <int32_t *>cnp.PyArray_DATA(table), width
            with nogil:
                rc = cpa_pool_block_table(self._p, idp, n, pin, tp, cap, lp, &width, &bad)
        if rc != CPA_POOL_OK:
            i = int(np.flatnonzero(ids == bad)[0])
            raise _seq_error(rc, bad, f"seqs[{i}]")
        return table, lens

    def block_table(self, seqs):
        """Arrays for the functional API (``cpuattn.paged_attention``).

        Args:
            seqs: sequence ids (list, tuple or 1-D integer array), ``batch`` of
                them; repeats allowed.

        Returns:
            ``(block_table, seq_lens)``: int32 ``(batch, max_pages)`` with
            ``max_pages = max(1, longest chain)``, row ``b`` the page chain of
            ``seqs[b]`` then -1 in unused slots; int32 ``(batch,)`` lengths.
            A snapshot: later appends or frees do not change it, and nothing
            keeps its pages from being reused (``attention`` pins them).

        Raises:
            PageError: an id is not an int, unknown or freed.
        """
        return self._table(self._seq_ids(seqs), False)

    def attention(self, q, seqs, *, layer=0, cu_seqlens_q=None, causal=True, scale=None,
                  window=(-1, -1), softcap=0.0, sinks=None, alibi_slopes=None,
                  tree_mask=None, return_lse=False, out=None):
        """Paged attention over the listed sequences, as
        ``cpuattn.paged_attention(q, k_pages, v_pages, *block_table(seqs), ...)``
        over layer ``layer``; the same as ``plan(seqs, ...).run(q, ...)``
        with the plan closed at return.

        Args:
            q: ``(batch, num_heads, head_dim)`` (one decode query per sequence,
                at its last position) or, with ``cu_seqlens_q``,
                ``(total_q, num_heads, head_dim)``: sequence ``b``'s queries are
                its last ``cu[b+1] - cu[b]`` positions. float32/float64/
                float16/bfloat16; may differ from the storage dtype (low-bit
                storage needs float32, float16 or bfloat16).
            seqs: ``batch`` sequence ids; their K/V must already include the
                queries' own tokens (append first).
            layer: int in ``[0, num_layers)``.
            cu_seqlens_q, causal, scale, window, softcap, sinks, alibi_slopes,
                tree_mask, return_lse, out: as in ``cpuattn.paged_attention``.

        Returns:
            ``out`` ``(rows, num_heads, head_dim)`` in q's dtype, or
            ``(out, lse)`` with lse ``(num_heads, rows)``.

        The pages the call reads are held for its whole duration, so another
        thread may free, truncate or append to these sequences meanwhile:
        the call reads the state of when it started.

        Raises:
            PageError: a sequence id is not an int, unknown or freed.
            ShapeError / DTypeError: as ``cpuattn.paged_attention``.
        """
        with self.plan(seqs, cu_seqlens_q=cu_seqlens_q, tree_mask=tree_mask) as p:
            return p.run(q, layer=layer, causal=causal, scale=scale, window=window,
                         softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes,
                         return_lse=return_lse, out=out)

    def plan(self, seqs, *, cu_seqlens_q=None, tree_mask=None):
        """A :class:`cpuattn.PagedPlan` over the listed sequences of this pool,
        whose ``run(q, *, layer=0, ...)`` reads the pool's pages and scales.

        Args:
            seqs: sequence ids (list, tuple or 1-D integer array); repeats allowed.
            cu_seqlens_q, tree_mask: as :class:`cpuattn.PagedPlan`.

        The plan snapshots the sequences' page chains and lengths and holds a
        reference on every page it reads until ``close()`` (it is also a
        context manager) or garbage collection: freeing a sequence cannot let
        its pages be reused under it, and an ``append`` or ``reserve`` that
        would change a page it holds copies the page first. Rows written
        with :meth:`write` into slots that existed when the plan was made are
        seen by its later runs.

        Raises:
            PageError: an id is not an int, unknown or freed.
            ShapeError / DTypeError: bad ``cu_seqlens_q``.
        """
        return PoolPlan(self, self._seq_ids(seqs), cu_seqlens_q, tree_mask)

    def _unpin(self, cnp.ndarray table, cnp.ndarray lens):
        cdef const int32_t *t = <const int32_t *>cnp.PyArray_DATA(table)
        cdef const int32_t *l = <const int32_t *>cnp.PyArray_DATA(lens)
        cdef int64_t n = table.shape[0], width = table.shape[1]
        with nogil:
            cpa_pool_unpin(self._p, t, n, width, l)

    def _refcounts(self):
        """Per-page reference counts (chain references + pins), int32 copy."""
        cdef cnp.ndarray out = np.empty(self.num_pages, np.int32)
        with nogil:
            cpa_pool_refcounts(self._p, <int32_t *>cnp.PyArray_DATA(out))
        return out

    def _check_invariants(self):
        """None, or AssertionError naming the first broken invariant: free +
        referenced pages = total, each refcount = chain references + pins, no
        free page referenced or listed twice, chain lengths match seq_len."""
        cdef char msg[256]
        cdef int rc
        with nogil:
            rc = cpa_pool_check(self._p, msg, sizeof(msg))
        if rc:
            raise AssertionError("PagePool invariant: " + msg.decode())


# Every live pool, so that fork() never copies a pool lock held by another
# thread into the child (where that thread does not exist). Pages pinned by
# an attention call running in another thread at the moment of the fork stay
# pinned in the child's copy of the pool.
_live_pools = weakref.WeakSet()
_forking = []
_fork_lock = threading.Lock()  # one fork at a time between our hooks


def _before_fork():
    _fork_lock.acquire()
    _forking[:] = list(_live_pools)
    for pool in _forking:
        (<PagePool>pool)._fork_hook(0)


def _after_fork(int stage):
    global _fork_lock
    for pool in _forking:
        (<PagePool>pool)._fork_hook(stage)
    del _forking[:]
    if stage == 1:
        _fork_lock.release()
    else:
        _fork_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=lambda: _after_fork(1),
                        after_in_child=lambda: _after_fork(2))
