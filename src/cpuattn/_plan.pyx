"""PagedPlan: a paged attention step's index arrays, checked and planned once.

A serving loop calls paged attention once per layer per step with the same
block table. A plan checks and copies the block table, the lengths and the
query layout once and keeps the work list (csrc/forward.c cpa_fwd_plan) of
the head counts and mask of its first run; ``run`` then checks only what can
differ between layers: q, the pages, their scales, the options and out.

``run`` takes plain inputs (numpy arrays with contiguous last axes and
element-aligned strides, builtin option types, scales C-contiguous of their
exact shape) on a path checked entirely in C. Anything else goes through
the general checks (``_validate``), which either raise the documented error
or hand back the same inputs in plain form, so there is one set of rules
and every call form (decode, ``cu_seqlens_q``, ``out=``, lse) costs the same
few microseconds. ``cpuattn.paged_attention`` is a plan of one run.

``dense_attention`` applies the same C checks (the helpers below: options,
out, per-head vectors) to plain dense calls of ``cpuattn.attention``.
"""
import weakref

from libc.math cimport isfinite, sqrt
from libc.stdint cimport int32_t, int64_t
from libc.string cimport memcpy, memset
cimport numpy as cnp
import numpy as np

from ._engine cimport (CPA_E4M3, CPA_E5M2, CPA_F64, CPA_I4, cpa_dtype_bits, cpa_fwd_args,
                       rows_of)
from ._forward cimport (fwd_work, doubles, float_code, free_work, page_code, plan_work, run,
                        run_work, scale_rows)
from . import _validate as V
from ._forward import LAYOUTS as _LAYOUTS
from .errors import PageError, ShapeError

cnp.import_array()

cdef int64_t INDEX_MAX = 2**31 - 1   # positions fit int32 (as in _validate)
cdef tuple _PAGED = _LAYOUTS["paged"]
cdef tuple _DENSE = _LAYOUTS["dense"]


cdef bint _rows_ok(cnp.ndarray x, int ndim):
    """ndim, native byte order, element-aligned strides, contiguous last
    axis (or empty)."""
    if cnp.PyArray_NDIM(x) != ndim or not cnp.PyArray_ISNOTSWAPPED(x):
        return False
    if cnp.PyArray_SIZE(x) == 0:
        return True
    cdef cnp.npy_intp isz = cnp.PyArray_ITEMSIZE(x)
    cdef int i
    for i in range(ndim):
        if cnp.PyArray_STRIDES(x)[i] % isz:
            return False
    return cnp.PyArray_DIMS(x)[ndim - 1] == 1 or cnp.PyArray_STRIDES(x)[ndim - 1] == isz


cdef bint _int32_c(object x, int ndim):
    return (type(x) is np.ndarray and cnp.PyArray_NDIM(<cnp.ndarray>x) == ndim
            and cnp.PyArray_TYPE(<cnp.ndarray>x) == cnp.NPY_INT32
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>x))


cdef bint _real(object x):
    return (type(x) is float or type(x) is int) and isfinite(<double>x)


cdef void _bounds(cnp.ndarray x, char **lo, char **hi) noexcept:
    """The first and one-past-last byte array x can reach."""
    cdef char *l = <char *>cnp.PyArray_DATA(x)
    cdef char *h = l
    cdef int i
    cdef cnp.npy_intp n, s
    for i in range(cnp.PyArray_NDIM(x)):
        n, s = cnp.PyArray_DIMS(x)[i], cnp.PyArray_STRIDES(x)[i]
        if n == 0:
            lo[0] = hi[0] = l
            return
        if s < 0:
            l += s * (n - 1)
        else:
            h += s * (n - 1)
    lo[0], hi[0] = l, h + cnp.PyArray_ITEMSIZE(x)


cdef bint _apart(cnp.ndarray a, cnp.ndarray b) noexcept:
    """Whether a and b certainly share no memory (their byte ranges are disjoint)."""
    cdef char *alo
    cdef char *ahi
    cdef char *blo
    cdef char *bhi
    _bounds(a, &alo, &ahi)
    _bounds(b, &blo, &bhi)
    return ahi <= blo or bhi <= alo or alo == ahi or blo == bhi


cdef bint _same_view(cnp.ndarray a, cnp.ndarray b) noexcept:
    cdef int i
    if (cnp.PyArray_DATA(a) != cnp.PyArray_DATA(b) or cnp.PyArray_NDIM(a) != cnp.PyArray_NDIM(b)):
        return False
    for i in range(cnp.PyArray_NDIM(a)):
        if (cnp.PyArray_DIMS(a)[i] != cnp.PyArray_DIMS(b)[i]
                or cnp.PyArray_STRIDES(a)[i] != cnp.PyArray_STRIDES(b)[i]):
            return False
    return True


_NOT_PLAIN = object()


cdef object _plain_scale(object s, int code, cnp.npy_intp *pd, int64_t d):
    """The scale array the kernel reads for pages of `code` (dims pd, head
    dim d): None for float pages, a 1-element array for a per-tensor fp8
    scale; _NOT_PLAIN for anything else (the general checks decide)."""
    if cpa_dtype_bits(code) >= 16:
        return None if s is None else _NOT_PLAIN
    if (code == CPA_E4M3 or code == CPA_E5M2) and (
            s is None or (type(s) is float and isfinite(<double>s) and s >= 0)):
        return np.full(1, 1.0 if s is None else s, np.float32)
    if type(s) is not np.ndarray:
        return _NOT_PLAIN
    cdef cnp.ndarray a = s
    cdef int want = cnp.NPY_FLOAT16 if code == CPA_I4 else cnp.NPY_FLOAT32
    cdef int nd = 4 if code == CPA_I4 else 3
    if (cnp.PyArray_TYPE(a) != want or cnp.PyArray_NDIM(a) != nd
            or not cnp.PyArray_IS_C_CONTIGUOUS(a)):
        return _NOT_PLAIN
    cdef cnp.npy_intp *sd = cnp.PyArray_DIMS(a)
    if sd[0] != pd[0] or sd[1] != pd[1] or sd[2] != pd[2]:
        return _NOT_PLAIN
    if nd == 4 and sd[3] != (d + 31) // 32:
        return _NOT_PLAIN
    return a


def _count(x, name, int64_t lo):
    if type(x) is not int:
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
            raise ShapeError(f"{name}: expected an int >= {lo}, got {x!r}")
        x = int(x)
    if not lo <= x <= INDEX_MAX:
        raise ShapeError(f"{name}: expected an int in [{lo}, {INDEX_MAX}], got {x}")
    return x


cdef class PagedPlan:
    """The block table, lengths and query layout of one paged attention step,
    checked and copied once, for every layer's :meth:`run`. Several Python
    threads may run one plan at once.

    ``PagedPlan(block_table, seq_lens, *, page_size, num_pages,
    cu_seqlens_q=None, tree_mask=None)``

    Args:
        block_table: int ``(batch, max_pages_per_seq)``: the pages of each
            sequence in order; entries past ``ceil(seq_lens[b] / page_size)``
            are ignored, used ones must be in ``[0, num_pages)`` (PageError).
        seq_lens: int ``(batch,)``: KV length of each sequence, the query
            tokens' own K/V included.
        page_size, num_pages: the shape of the pages every run will read
            (``k_pages.shape[:2]``).
        cu_seqlens_q: optional int ``(batch + 1,)``: sequence b's
            ``cu[b+1] - cu[b]`` queries are its last positions (at most
            ``seq_lens[b]``). None: one decode query per sequence.
        tree_mask: optional bool array of ``sum_b n_b ** 2`` entries (needs
            ``cu_seqlens_q``; runs need ``causal=True``): sequence b's block,
            row-major ``n_b x n_b``, says which of its last n_b tokens (the
            draft) each of its n_b queries sees; keys before the draft are
            seen by all of them (the window still applies). The diagonal must
            be True and the entries above it False (ShapeError).

    Index arrays of any integer dtype are accepted and converted after
    their range is checked. The plan keeps its own copies: changing the
    caller's arrays later changes nothing. It also keeps the work split of
    its first run's head counts and mask (one plan serves every layer of a
    step, so it is planned once; a run with others plans for itself).

    Attributes:
        batch_size, num_queries (rows of q: batch, or ``cu_seqlens_q[-1]``),
        page_size, num_pages; block_table (int32 copy, unused entries 0),
        seq_lens (int32 copy), cu_seqlens_q (int32 copy, or None).

    Raises:
        ShapeError, DTypeError, PageError: as :func:`cpuattn.paged_attention`
            for the index arrays.
    """
    cdef readonly int64_t batch_size, num_queries, page_size, num_pages
    cdef cnp.ndarray _table      # int32 (batch, width), C-contiguous, private
    cdef cnp.ndarray _seqs       # int64 (3, batch): q_start, q_len, k_len
    cdef object _tree, _tree_start   # uint8 masks, int64 block starts; or None
    cdef bint _decode
    cdef fwd_work _work
    cdef bint _planned
    cdef int32_t _key_h, _key_hkv
    cdef int64_t _key_left, _key_right
    cdef int32_t _key_causal
    cdef object __weakref__

    def __cinit__(self, *args, **kwargs):
        memset(&self._work, 0, sizeof(fwd_work))

    def __dealloc__(self):
        free_work(&self._work)

    def __init__(self, block_table, seq_lens, *, page_size, num_pages, cu_seqlens_q=None,
                 tree_mask=None):
        self.page_size = _count(page_size, "page_size", 1)
        self.num_pages = _count(num_pages, "num_pages", 0)
        if tree_mask is not None and cu_seqlens_q is None:
            raise ShapeError("tree_mask: needs cu_seqlens_q (each sequence's draft queries)")
        if not self._take_plain(block_table, seq_lens, cu_seqlens_q):
            bt, lens = V.block_table(block_table, seq_lens, self.num_pages, self.page_size)
            cu = V.paged_queries(cu_seqlens_q, lens)
            if not self._take_plain(bt, lens.astype(np.int32),
                                    None if cu_seqlens_q is None else cu.astype(np.int32)):
                raise RuntimeError("cpuattn internal error: checked index arrays not plain")
        if tree_mask is not None:
            self._tree, self._tree_start = V.tree_masks(tree_mask, self._seqs[1])
            self._tree.flags.writeable = False

    cdef bint _take_plain(self, bt, sl, cu) except -1:
        """Check and copy plain index arrays (int32, C-contiguous, in range);
        False, nothing taken, if they are not plain or not valid."""
        if not (_int32_c(bt, 2) and _int32_c(sl, 1) and (cu is None or _int32_c(cu, 1))):
            return False
        cdef cnp.ndarray bta = bt, sla = sl
        cdef int64_t batch = cnp.PyArray_DIMS(sla)[0], width = cnp.PyArray_DIMS(bta)[1]
        cdef int64_t ps = self.page_size, npg = self.num_pages, b, j, n, used, nq
        if cnp.PyArray_DIMS(bta)[0] != batch:
            return False
        cdef const int32_t *lens = <const int32_t *>cnp.PyArray_DATA(sla)
        cdef const int32_t *table = <const int32_t *>cnp.PyArray_DATA(bta)
        cdef const int32_t *cuq = NULL
        if cu is not None:
            if cnp.PyArray_DIMS(<cnp.ndarray>cu)[0] != batch + 1:
                return False
            cuq = <const int32_t *>cnp.PyArray_DATA(<cnp.ndarray>cu)
            if cuq[0] != 0:
                return False
        for b in range(batch):
            n = lens[b]
            if n < 0 or n > width * ps:
                return False
            if cuq != NULL:
                nq = <int64_t>cuq[b + 1] - cuq[b]
                if nq < 0 or nq > n:
                    return False
            for j in range((n + ps - 1) // ps):
                if table[b * width + j] < 0 or table[b * width + j] >= npg:
                    return False
        cdef cnp.ndarray own = np.zeros((batch, width), np.int32)
        cdef cnp.ndarray seqs = np.empty((3, batch), np.int64)
        cdef int32_t *dst = <int32_t *>cnp.PyArray_DATA(own)
        cdef int64_t *s = <int64_t *>cnp.PyArray_DATA(seqs)
        for b in range(batch):
            used = (lens[b] + ps - 1) // ps   # unused entries stay 0: never read
            memcpy(dst + b * width, table + b * width, used * sizeof(int32_t))
            s[b] = b if cuq == NULL else cuq[b]                       # q_start
            s[batch + b] = 1 if cuq == NULL else cuq[b + 1] - cuq[b]  # q_len
            s[2 * batch + b] = lens[b]                                # k_len
        own.flags.writeable = False
        self._table, self._seqs = own, seqs
        self.batch_size = batch
        self.num_queries = batch if cuq == NULL else cuq[batch]
        self._decode = cuq == NULL
        return True

    @property
    def block_table(self):
        return self._table.copy()

    @property
    def seq_lens(self):
        return self._seqs[2].astype(np.int32)

    @property
    def cu_seqlens_q(self):
        if self._decode:
            return None
        return np.append(self._seqs[0], self.num_queries).astype(np.int32)

    @property
    def _shared_items(self):
        """(items run for several sequences, sequence items they cover) in
        the plan's work list; (0, 0) before its first run. For tests."""
        cdef int64_t i, n = 0, cover = 0
        for i in range(self._work.n_items):
            if self._work.items[i].nshare > 1:
                n += 1
                cover += self._work.items[i].nshare
        return n, cover

    def __repr__(self):
        return (f"PagedPlan(batch_size={self.batch_size}, num_queries={self.num_queries}, "
                f"page_size={self.page_size}, num_pages={self.num_pages})")

    def run(self, q, k_pages, v_pages, *, causal=True, scale=None, window=(-1, -1),
            softcap=0.0, sinks=None, alibi_slopes=None, k_scale=None, v_scale=None,
            return_lse=False, out=None):
        """Paged attention of this plan's sequences over one layer's pages.

        Args:
            q: ``(num_queries, num_heads, head_dim)``: decode plans one row
                per sequence, ``cu_seqlens_q`` plans its rows. float32,
                float64, float16 or bfloat16.
            k_pages, v_pages: ``(num_pages, page_size, num_kv_heads,
                head_dim)`` (``head_dim // 2`` bytes for int4) with the
                plan's num_pages and page_size; float or low-bit, K and V
                types apart (see :func:`cpuattn.paged_attention`).
            causal, scale, window, softcap, k_scale, v_scale, return_lse,
                out: as :func:`cpuattn.paged_attention`.
            sinks, alibi_slopes: optional float ``(num_heads,)``, as
                :func:`cpuattn.attention`.

        Returns:
            ``out`` ``(num_queries, num_heads, head_dim_v)`` in q's dtype, or
            ``(out, lse)`` with lse ``(num_heads, num_queries)`` float32
            (float64 for float64 q). The same bytes as
            :func:`cpuattn.paged_attention` with the same arguments.

        Raises:
            ShapeError / DTypeError: bad q, pages, scales, options or out, or
                pages of another num_pages / page_size than planned.
        """
        return self._run(q, k_pages, v_pages, k_scale, v_scale, causal, scale, window, softcap,
                         sinks, alibi_slopes, return_lse, out)

    cdef object _run(self, q, k_pages, v_pages, k_scale, v_scale, causal, scale, window,
                     softcap, sinks, alibi_slopes, return_lse, out):
        cdef cpa_fwd_args a
        memset(&a, 0, sizeof(a))
        kept = self._fill(&a, q, k_pages, v_pages, k_scale, v_scale, causal, scale, window,
                          softcap, sinks, alibi_slopes, out, False)
        if kept is None:
            # not plain: the general checks raise, or give the inputs in plain form
            q, k_pages, v_pages, k_scale, v_scale, dims = V.paged_operands(
                q, k_pages, v_pages, k_scale, v_scale)
            self._check_planned(q, k_pages, v_pages)
            opts = V.check_options(scale, window, softcap, causal, dims[2])
            if self._tree is not None and not opts.causal:
                raise ShapeError("causal: a plan with a tree_mask needs causal=True, got False")
            if out is not None:
                V.check_out(out, (self.num_queries, dims[0], dims[3]), q.dtype,
                            [("q", q, True), ("k_pages", k_pages, False),
                             ("v_pages", v_pages, False)])
            sinks = V.head_vector(sinks, "sinks", dims[0])
            alibi_slopes = V.head_vector(alibi_slopes, "alibi_slopes", dims[0])
            kept = self._fill(&a, q, k_pages, v_pages, k_scale, v_scale, opts.causal,
                              opts.scale, (opts.window_left, opts.window_right), opts.softcap,
                              sinks, alibi_slopes, out, True)
            if kept is None:
                raise RuntimeError("cpuattn internal error: checked paged inputs not plain")
        res = kept[0]
        lse = None
        if return_lse:
            lse = np.empty((a.num_heads, self.num_queries),
                           np.float64 if a.q_dtype == CPA_F64 else np.float32)
            a.lse = rows_of(lse, _PAGED[2])
        cdef fwd_work other
        memset(&other, 0, sizeof(other))
        try:
            if self.num_queries:
                run_work(&a, self._work_for(&a, &other))
        finally:
            free_work(&other)
        return res if lse is None else (res, lse)

    def _check_planned(self, q, k_pages, v_pages):
        for name, p in (("k_pages", k_pages), ("v_pages", v_pages)):
            if p.shape[0] != self.num_pages or p.shape[1] != self.page_size:
                raise ShapeError(f"{name}: expected (num_pages, page_size) ({self.num_pages}, "
                                 f"{self.page_size}) as planned, got {p.shape[:2]}")
        if q.shape[0] != self.num_queries:
            raise ShapeError(V.plan_queries_message(self._decode, self.num_queries, q.shape))

    cdef object _fill(self, cpa_fwd_args *a, q, k_pages, v_pages, k_scale, v_scale, causal,
                      scale, window, softcap, sinks, alibi, out, bint checked):
        """Fill a from plain inputs: (out array, kept alive objects), or None
        when any input is not plain (or not valid). checked: the general
        checks passed (scales as they return them; out checked)."""
        if not (type(q) is np.ndarray and type(k_pages) is np.ndarray
                and type(v_pages) is np.ndarray and _options_ok(causal, scale, window, softcap)
                and (out is None or type(out) is np.ndarray)):
            return None
        cdef cnp.ndarray qa = q, ka = k_pages, va = v_pages
        if not (_rows_ok(qa, 3) and _rows_ok(ka, 4) and _rows_ok(va, 4)):
            return None
        cdef int qc = float_code(qa), kc = page_code(ka), vc = page_code(va)
        if (qc < 0 or kc < 0 or vc < 0 or (qc == CPA_F64) != (kc == CPA_F64)
                or (qc == CPA_F64) != (vc == CPA_F64)):
            return None
        cdef cnp.npy_intp *qd = cnp.PyArray_DIMS(qa)
        cdef cnp.npy_intp *kd = cnp.PyArray_DIMS(ka)
        cdef cnp.npy_intp *vd = cnp.PyArray_DIMS(va)
        cdef int64_t h = qd[1], d = qd[2], hkv = kd[2]
        cdef int64_t dk = kd[3] * (2 if kc == CPA_I4 else 1), dv = vd[3] * (2 if vc == CPA_I4 else 1)
        if (qd[0] != self.num_queries or kd[0] != self.num_pages or kd[1] != self.page_size
                or vd[0] != kd[0] or vd[1] != kd[1] or vd[2] != hkv or dk != d or d < 1
                or dv < 1 or hkv < 1 or h < 1 or h % hkv or h > INDEX_MAX or d > INDEX_MAX
                or dv > INDEX_MAX):
            return None
        sinks, alibi = _plain_heads(sinks, h), _plain_heads(alibi, h)
        if sinks is _NOT_PLAIN or alibi is _NOT_PLAIN:
            return None
        if self._tree is not None and not causal:
            return None   # the general checks raise
        if checked:
            ks, vs = k_scale, v_scale
        else:
            ks = _plain_scale(k_scale, kc, kd, dk)
            vs = _plain_scale(v_scale, vc, vd, dv)
            if ks is _NOT_PLAIN or vs is _NOT_PLAIN:
                return None
        cdef cnp.ndarray oa
        if out is None:
            oa = np.empty((self.num_queries, h, dv), dtype=qa.dtype)
        else:
            oa = out
            if not (cnp.PyArray_NDIM(oa) == 3 and cnp.PyArray_DIMS(oa)[0] == qd[0]
                    and cnp.PyArray_DIMS(oa)[1] == h and cnp.PyArray_DIMS(oa)[2] == dv
                    and _out_ok(oa, qa, ka, va, checked)):
                return None
        _set_rows(a, _PAGED, qa, oa, ka, va, None, h, hkv, d, dv, sinks, alibi, scale,
                  softcap, causal, window)
        a.q_dtype, a.k_dtype, a.v_dtype = qc, kc, vc
        a.k_scale = scale_rows(ks)
        a.v_scale = scale_rows(vs)
        cdef int64_t *s = <int64_t *>cnp.PyArray_DATA(self._seqs)
        a.num_seqs = self.batch_size
        a.q_start, a.q_len, a.k_len = s, s + self.batch_size, s + 2 * self.batch_size
        a.k_start = a.q_start                        # unread: paged
        if self._tree is not None:
            a.tree = <const unsigned char *>cnp.PyArray_DATA(<cnp.ndarray>self._tree)
            a.tree_start = <const int64_t *>cnp.PyArray_DATA(<cnp.ndarray>self._tree_start)
        a.block_table = <const int32_t *>cnp.PyArray_DATA(self._table)
        a.bt_stride = cnp.PyArray_DIMS(self._table)[1]
        a.page_size = self.page_size
        return (oa, ks, vs, sinks, alibi)

    cdef fwd_work *_work_for(self, cpa_fwd_args *a, fwd_work *other) except NULL:
        """The work list of a's head counts and mask: the plan's own, made at
        its first run; a run with other head counts or another mask plans into
        `other` (freed by the caller). The plan's list is never replaced, so
        runs in several Python threads at once (the GIL is released while the
        kernels run) never see it freed under them."""
        if not self._planned:
            plan_work(a, &self._work)
            self._key_h, self._key_hkv = a.num_heads, a.num_kv_heads
            self._key_causal = a.mask.causal
            self._key_left, self._key_right = a.mask.window_left, a.mask.window_right
            self._planned = True
        if (self._key_h == a.num_heads and self._key_hkv == a.num_kv_heads
                and self._key_causal == a.mask.causal and self._key_left == a.mask.window_left
                and self._key_right == a.mask.window_right):
            return &self._work
        plan_work(a, other)
        return other


def dense_attention(q, k, v, causal, scale, window, softcap, sinks, alibi, return_lse, out,
                    seqs=None):
    """cpuattn.attention for plain inputs, checked here in C: the result, or
    None when any input is not plain (the caller's general checks then
    raise the documented error or run it). Plain: numpy arrays (B, S, H, D)
    of one float dtype with a contiguous last axis and aligned strides,
    builtin options, sinks / slopes float32 or float64 of length H, and an
    out that certainly does not overlap k or v.

    seqs (private, ``dense._attention_ranges``; needs return_lse False):
    None, each batch row is one whole sequence; or int64 C-contiguous
    ``(4, B)`` rows q_start, k_start, q_len, k_len: batch row b attends
    queries ``q_start[b] + t`` (t < q_len[b]) to keys ``k_start[b] + j``
    (j < k_len[b]), the mask bottom-right aligned within those ranges; rows
    of out outside the ranges are not written (zeros when out is None).
    ShapeError for a range outside its row. The caller keeps seqs
    unchanged while the call runs."""
    if not (type(q) is np.ndarray and type(k) is np.ndarray and type(v) is np.ndarray
            and _options_ok(causal, scale, window, softcap)
            and (out is None or type(out) is np.ndarray)):
        return None
    cdef cnp.ndarray qa = q, ka = k, va = v
    if not (_rows_ok(qa, 4) and _rows_ok(ka, 4) and _rows_ok(va, 4)):
        return None
    cdef int qc = float_code(qa)
    if qc < 0 or cnp.PyArray_TYPE(ka) != cnp.PyArray_TYPE(qa) \
            or cnp.PyArray_TYPE(va) != cnp.PyArray_TYPE(qa):
        return None
    cdef cnp.npy_intp *qd = cnp.PyArray_DIMS(qa)
    cdef cnp.npy_intp *kd = cnp.PyArray_DIMS(ka)
    cdef cnp.npy_intp *vd = cnp.PyArray_DIMS(va)
    cdef int64_t batch = qd[0], sq = qd[1], h = qd[2], d = qd[3], sk = kd[1], hkv = kd[2]
    cdef int64_t dv = vd[3]
    if (kd[0] != batch or vd[0] != batch or vd[1] != sk or vd[2] != hkv or kd[3] != d
            or d < 1 or dv < 1 or hkv < 1 or h < 1 or h % hkv or sq > INDEX_MAX
            or sk > INDEX_MAX or h > INDEX_MAX or d > INDEX_MAX or dv > INDEX_MAX):
        return None
    sinks, alibi = _plain_heads(sinks, h), _plain_heads(alibi, h)
    if sinks is _NOT_PLAIN or alibi is _NOT_PLAIN:
        return None
    cdef cnp.ndarray oa
    if out is None:
        oa = (np.empty if seqs is None else np.zeros)((batch, sq, h, dv), dtype=qa.dtype)
    else:
        oa = out
        if not (cnp.PyArray_NDIM(oa) == 4 and cnp.PyArray_DIMS(oa)[0] == batch
                and cnp.PyArray_DIMS(oa)[1] == sq and cnp.PyArray_DIMS(oa)[2] == h
                and cnp.PyArray_DIMS(oa)[3] == dv and _out_ok(oa, qa, ka, va, False)):
            return None
    lse = np.empty((batch, h, sq), np.float64 if qc == CPA_F64 else np.float32) \
        if return_lse else None
    cdef cnp.ndarray ranges
    cdef int64_t *sp
    cdef int64_t i
    if seqs is None:
        ranges = np.empty((4, batch), np.int64)
        sp = <int64_t *>cnp.PyArray_DATA(ranges)
        for i in range(batch):
            sp[i] = 0                  # q_start: each sequence's own batch row
            sp[batch + i] = 0          # k_start
            sp[2 * batch + i] = sq
            sp[3 * batch + i] = sk
    else:
        ranges = _seq_ranges(seqs, batch, sq, sk)
        sp = <int64_t *>cnp.PyArray_DATA(ranges)
    cdef cpa_fwd_args a
    memset(&a, 0, sizeof(a))
    _set_rows(&a, _DENSE, qa, oa, ka, va, lse, h, hkv, d, dv, sinks, alibi, scale, softcap,
              causal, window)
    a.q_dtype = a.k_dtype = a.v_dtype = qc
    a.num_seqs = batch
    a.q_start, a.k_start, a.q_len, a.k_len = sp, sp + batch, sp + 2 * batch, sp + 3 * batch
    if sq and batch:
        run(&a)
    return (oa, lse) if return_lse else oa


cdef cnp.ndarray _seq_ranges(object seqs, int64_t batch, int64_t sq, int64_t sk):
    """dense_attention's seqs, checked: int64 C-contiguous (4, batch), every
    range of queries inside [0, sq) and of keys inside [0, sk)."""
    if not (type(seqs) is np.ndarray and cnp.PyArray_NDIM(<cnp.ndarray>seqs) == 2
            and cnp.PyArray_DIMS(<cnp.ndarray>seqs)[0] == 4
            and cnp.PyArray_DIMS(<cnp.ndarray>seqs)[1] == batch
            and cnp.PyArray_TYPE(<cnp.ndarray>seqs) == cnp.NPY_INT64
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>seqs)):
        raise ShapeError(f"seqs: expected an int64 C-contiguous (4, {batch}) array, got "
                         f"{getattr(seqs, 'dtype', type(seqs).__name__)} "
                         f"{getattr(seqs, 'shape', '')}")
    cdef const int64_t *sp = <const int64_t *>cnp.PyArray_DATA(<cnp.ndarray>seqs)
    cdef int64_t b
    for b in range(batch):
        if not (0 <= sp[b] and 0 <= sp[2 * batch + b] <= sq - sp[b]
                and 0 <= sp[batch + b] and 0 <= sp[3 * batch + b] <= sk - sp[batch + b]):
            raise ShapeError(f"seqs: batch row {b}: expected queries in [0, {sq}) and keys "
                             f"in [0, {sk}), got q_start {sp[b]}, q_len {sp[2 * batch + b]}, "
                             f"k_start {sp[batch + b]}, k_len {sp[3 * batch + b]}")
    return seqs


cdef void _set_rows(cpa_fwd_args *a, tuple layout, cnp.ndarray qa, cnp.ndarray oa,
                    cnp.ndarray ka, cnp.ndarray va, lse, int64_t h, int64_t hkv, int64_t d,
                    int64_t dv, sinks, alibi, scale, softcap, causal, window):
    """What a dense and a paged call fill alike from checked plain inputs: the
    rows of q, out, k, v (and lse) by the layout's axes, head counts and dims,
    per-head vectors and options."""
    q_axes, kv_axes, lse_axes = layout
    a.q = rows_of(qa, q_axes)
    a.out = rows_of(oa, q_axes)
    a.k = rows_of(ka, kv_axes)
    a.v = rows_of(va, kv_axes)
    a.lse = rows_of(lse, lse_axes)
    a.num_heads = <int32_t>h
    a.num_kv_heads = <int32_t>hkv
    a.head_dim_qk = <int32_t>d
    a.head_dim_v = <int32_t>dv
    a.sinks = doubles(sinks)
    a.alibi = doubles(alibi)
    a.scale = 1.0 / sqrt(<double>d) if scale is None else <double>scale
    a.softcap = <double>softcap
    a.mask.causal = causal
    a.mask.window_left = window[0]
    a.mask.window_right = window[1]


cdef object _plain_heads(object x, int64_t h):
    """sinks / alibi_slopes in the kernels' form (float64 C-contiguous (h,))
    from None or a float32 / float64 numpy vector of length h; _NOT_PLAIN
    for anything else (the general checks decide)."""
    if x is None:
        return None
    if not (type(x) is np.ndarray and cnp.PyArray_NDIM(<cnp.ndarray>x) == 1
            and cnp.PyArray_DIMS(<cnp.ndarray>x)[0] == h):
        return _NOT_PLAIN
    cdef int t = cnp.PyArray_TYPE(<cnp.ndarray>x)
    if t == cnp.NPY_FLOAT64 and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>x):
        return x
    if t == cnp.NPY_FLOAT64 or t == cnp.NPY_FLOAT32:
        return np.ascontiguousarray(x, dtype=np.float64)
    return _NOT_PLAIN


cdef bint _options_ok(causal, scale, window, softcap):
    """Builtin, in-range options: the plain form of check_options' input."""
    return (type(causal) is bool and (scale is None or _real(scale)) and _real(softcap)
            and softcap >= 0 and type(window) is tuple and len(window) == 2
            and type(window[0]) is int and type(window[1]) is int
            and -1 <= window[0] <= INDEX_MAX and -1 <= window[1] <= INDEX_MAX)


cdef bint _out_ok(cnp.ndarray oa, cnp.ndarray qa, cnp.ndarray ka, cnp.ndarray va, bint checked):
    """An out array of the right shape (checked by the caller) that the
    kernels can write: q's dtype, writable, plain rows, and (unless the
    general check_out passed) certainly apart from k and v and either apart
    from q or q itself, no broadcast axis."""
    if not (cnp.PyArray_TYPE(oa) == cnp.PyArray_TYPE(qa) and cnp.PyArray_ISWRITEABLE(oa)
            and _rows_ok(oa, cnp.PyArray_NDIM(oa))):
        return False
    return checked or ((_apart(oa, qa) or _same_view(oa, qa)) and _apart(oa, ka)
                       and _apart(oa, va) and _no_broadcast(oa))


cdef bint _no_broadcast(cnp.ndarray x) noexcept:
    cdef int i
    for i in range(cnp.PyArray_NDIM(x)):
        if cnp.PyArray_STRIDES(x)[i] == 0 and cnp.PyArray_DIMS(x)[i] > 1:
            return False
    return True


cdef class PoolPlan(PagedPlan):
    """A :class:`PagedPlan` over sequences of a :class:`cpuattn.PagePool`,
    made by ``pool.plan(seqs, ...)``: it snapshots their page chains and
    lengths and holds a reference on every page it reads until
    :meth:`close` (or garbage collection), so a freed sequence's pages are
    not reused under it, and an ``append`` / ``reserve`` into a page it
    holds copies that page first. Rows ``pool.write`` stores into slots that
    existed when the plan was made are seen by its later runs."""
    cdef object _pool, _layers, _release

    def __init__(self, pool, ids, cu_seqlens_q=None, tree_mask=None):
        table, lens = pool._table(ids, True)   # pinned: refcount + 1 on every page
        # read-only: the release trusts them to be what was pinned
        table.flags.writeable = False
        lens.flags.writeable = False
        self._release = weakref.finalize(self, pool._unpin, table, lens)
        try:
            PagedPlan.__init__(self, table, lens, page_size=pool.page_size,
                               num_pages=pool.num_pages, cu_seqlens_q=cu_seqlens_q,
                               tree_mask=tree_mask)
        except BaseException:
            self._release()
            raise
        self._pool = pool
        self._layers = [None] * pool.num_layers

    def run(self, q, *, layer=0, causal=True, scale=None, window=(-1, -1), softcap=0.0,
            sinks=None, alibi_slopes=None, return_lse=False, out=None):
        """:meth:`PagedPlan.run` over layer ``layer`` of the pool's pages and
        scales (ShapeError if out of range; PageError after close)."""
        if self._layers is None:
            raise PageError("plan: closed; its pages were released")
        if type(layer) is not int or not 0 <= layer < len(self._layers):
            layer = self._pool._layer(layer)
        views = self._layers[layer]
        if views is None:
            views = self._layers[layer] = self._pool._layer_views(layer)
        kp, vp, ks, vs = views
        return self._run(q, kp, vp, ks, vs, causal, scale, window, softcap, sinks,
                         alibi_slopes, return_lse, out)

    def close(self):
        """Release the plan's page references (a second close does nothing)."""
        self._layers = None
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    @property
    def closed(self):
        return self._layers is None

    @property
    def pool(self):
        """The :class:`cpuattn.PagePool` this plan reads."""
        return self._pool

    def __repr__(self):
        return (f"PoolPlan(batch_size={self.batch_size}, num_queries={self.num_queries}, "
                f"page_size={self.page_size}, num_pages={self.num_pages}, closed={self.closed})")
