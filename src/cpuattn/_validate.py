"""Argument checks of every public call: the one layer that validates.

All validation happens here, before any kernel runs: the kernels trust what
they get. Each call form (dense, packed, paged, and their backward) turns its
arguments into a checked :class:`Call` (arrays, layout, sequences, options)
that the engine drivers (``_forward.forward``, ``_backward.backward``) run
as is. Errors name the argument, what was expected and what was received.
The one exception is ``_plan.PagedPlan``: it checks plain paged inputs in C
by the same rules and hands everything else (including every invalid input)
to the checks here, which raise or give the inputs back in plain form.
"""
import math
import numbers
from typing import NamedTuple

import numpy as np

from ._forward import DTYPES, check_chains, kernel_available
from .errors import DTypeError, PageError, ShapeError

# the engine's storage dtypes (csrc/engine.h), by name: the float ones any
# array may have, and the low-bit ones only KV pages have
DTYPE_NAMES = tuple(name for name, _, bits in DTYPES if bits >= 16)
LOW_BIT_NAMES = tuple(name for name, _, bits in DTYPES if bits < 16)
_CODES = {name: code for name, code, _ in DTYPES}
INDEX_MAX = 2**31 - 1


class KVFormat(NamedTuple):
    """A low-bit KV storage format (csrc/quant.h): its engine code, the
    numpy dtype of its codes, the dtype of its scales and how many scales a
    row of head_dim values has (int4: one per group of 32)."""
    name: str
    code: int
    codes_dtype: np.dtype
    scale_dtype: np.dtype
    group: int      # 0: one scale per row


INT4_GROUP = 32


def _fp8_dtype(name):
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - ml_dtypes is in the test extra
        raise DTypeError(f"{name} KV storage needs the ml_dtypes package "
                         "(pip install ml_dtypes)") from None
    return np.dtype(getattr(ml_dtypes, name))


def kv_format(dtype, name="dtype"):
    """The KVFormat named by dtype ("int8", "int4", "float8_e4m3fn",
    "float8_e5m2", or the numpy dtype of int8 / fp8 codes), or DTypeError."""
    key = dtype if isinstance(dtype, str) else getattr(np.dtype(dtype) if _is_dtype(dtype)
                                                      else None, "name", None)
    if key == "int8":
        return KVFormat("int8", _CODES["int8"], np.dtype(np.int8), np.dtype(np.float32), 0)
    if key == "int4":
        return KVFormat("int4", _CODES["int4"], np.dtype(np.uint8), np.dtype(np.float16),
                        INT4_GROUP)
    if key in ("float8_e4m3fn", "float8_e5m2"):
        return KVFormat(key, _CODES[key], _fp8_dtype(key), np.dtype(np.float32), 0)
    raise DTypeError(f"{name}: expected a low-bit KV dtype \"int8\", \"int4\", "
                     f"\"float8_e4m3fn\" or \"float8_e5m2\", got {dtype!r}")


def _is_dtype(x):
    try:
        np.dtype(x)
    except TypeError:
        return False
    return True


def kv_format_of(pages):
    """The KVFormat of low-bit pages by their dtype (uint8 pages are int4),
    or None for float pages."""
    name = pages.dtype.name
    if name == "uint8":
        return kv_format("int4")
    if name in LOW_BIT_NAMES:
        return kv_format(name)
    return None


def scale_shape(fmt, rows_shape, head_dim):
    """Shape of the scales of codes whose rows (tokens x heads) are rows_shape."""
    if fmt.group:
        return tuple(rows_shape) + (-(-head_dim // fmt.group),)
    return tuple(rows_shape)


def kv_scale(scale, fmt, rows_shape, head_dim, name):
    """A checked scale for codes of format fmt: (contiguous array, per_tensor).

    int8/int4: an array of exactly scale_shape() and fmt.scale_dtype. fp8:
    also a Python/numpy real number (one scale for the whole tensor; None
    means 1.0)."""
    if fmt.name.startswith("float8") and scale is None:
        scale = 1.0   # per tensor, as vLLM's default k_scale
    if fmt.name.startswith("float8") and isinstance(scale, numbers.Real) \
            and not isinstance(scale, (bool, np.bool_)):
        if not math.isfinite(scale) or scale < 0:
            raise ShapeError(f"{name}: expected a finite scale >= 0, got {scale!r}")
        return np.full(1, scale, dtype=np.float32), True
    if scale is None:
        raise ShapeError(f"{name}: {fmt.name} pages need their scales, got None")
    arr = np.asarray(scale) if not isinstance(scale, np.ndarray) else scale
    want = scale_shape(fmt, rows_shape, head_dim)
    if arr.shape != want:
        raise ShapeError(f"{name}: expected shape {want} for {fmt.name} codes, got {arr.shape}")
    if arr.dtype != fmt.scale_dtype:
        raise DTypeError(f"{name}: expected dtype {fmt.scale_dtype} for {fmt.name} codes, "
                         f"got {arr.dtype}")
    # the kernels read a row's scales as one contiguous run (they are small:
    # 1/32 of the codes at most, so a strided view is copied once)
    return (arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)), False


class Options(NamedTuple):
    """Checked options of a call, as the engine takes them."""
    scale: float
    window_left: int
    window_right: int
    softcap: float
    causal: bool


class Sequences(NamedTuple):
    """The sequences of a call (contiguous int64, one entry per sequence):
    sequence b's queries are rows q_start[b] .. q_start[b] + q_len[b] - 1 of
    q, its keys rows k_start[b] .. of k (unused for paged K/V)."""
    q_start: np.ndarray
    k_start: np.ndarray
    q_len: np.ndarray
    k_len: np.ndarray


class Call(NamedTuple):
    """A checked call, as the engine runs it: q, k, v (pages for "paged"),
    the layout (a key of ``_forward.LAYOUTS``), the sequences, the options,
    the int32 block table ("paged" only) and the head counts and dims."""
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    layout: str
    seqs: Sequences
    opts: Options
    block_table: "np.ndarray | None"
    heads: int
    kv_heads: int
    head_dim: int
    head_dim_v: int
    k_scale: "np.ndarray | None" = None   # low-bit pages: their scales (kv_scale)
    v_scale: "np.ndarray | None" = None
    sinks: "np.ndarray | None" = None     # float64 (heads,) each (head_vector)
    alibi: "np.ndarray | None" = None


def compute_dtype(dtype):
    """The dtype kernels compute and return lse in: float64 for float64
    storage, float32 for every other storage dtype."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def dtype_code(arr, name):
    """Kernel dtype tag of a float array, or DTypeError."""
    # by name: bfloat16 is a user dtype (ml_dtypes)
    code = _CODES.get(arr.dtype.name) if arr.dtype.name in DTYPE_NAMES else None
    if code is None:
        raise DTypeError(f"{name}: expected dtype {', '.join(DTYPE_NAMES[:-1])} or "
                         f"{DTYPE_NAMES[-1]}, got {arr.dtype}")
    return code


def as_array(x, name, kv=False):
    """A numpy view of x (no copy where numpy.asarray can avoid one), with a
    contiguous last axis (copied once otherwise). A float array, or with kv
    also low-bit KV codes (int8, uint8 = int4 pairs, fp8)."""
    if isinstance(x, np.ndarray):
        arr = x
    else:
        if type(x).__module__.startswith("torch"):
            if getattr(x, "device", None) is not None and x.device.type != "cpu":
                raise ShapeError(f"{name}: expected a CPU tensor, got one on {x.device}")
            if str(getattr(x, "dtype", "")) == "torch.bfloat16":
                raise DTypeError(f"{name}: numpy cannot view a torch.bfloat16 tensor; "
                                 "use cpuattn.torch.attention for torch tensors")
            if getattr(x, "requires_grad", False):
                x = x.detach()
        try:
            arr = np.asarray(x)
        except Exception as e:  # noqa: BLE001 - any conversion failure is a dtype problem
            raise DTypeError(f"{name}: expected an array of float32/float64/float16/bfloat16, "
                             f"got {type(x).__name__} ({e})") from None
    if not (kv and kv_format_of(arr)):
        dtype_code(arr, name)
    if not arr.dtype.isnative:   # the kernels read native byte order
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.ndim and arr.size:
        isz = arr.itemsize
        if (arr.shape[-1] > 1 and arr.strides[-1] != isz) or any(s % isz for s in arr.strides):
            arr = np.ascontiguousarray(arr)
    return arr


def estrides(arr):
    """Strides in elements."""
    return tuple(s // arr.itemsize for s in arr.strides)


def check_ndim(arr, name, ndim, layout):
    if arr.ndim != ndim:
        raise ShapeError(f"{name}: expected a {ndim}-D array {layout}, got shape {arr.shape}")


def check_heads(num_heads, num_kv_heads, qname="q", kname="k"):
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ShapeError(f"{qname}/{kname}: num_heads ({num_heads}) must be a positive multiple "
                         f"of num_kv_heads ({num_kv_heads})")


def check_options(scale, window, softcap, causal, head_dim):
    """Validated Options (scale, window_left, window_right, softcap, causal)."""
    if not isinstance(causal, (bool, np.bool_)):
        raise ShapeError(f"causal: expected a bool, got {causal!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    elif isinstance(scale, (bool, np.bool_)) or not isinstance(scale, numbers.Real) \
            or not math.isfinite(scale):
        raise ShapeError(f"scale: expected a finite real number or None, got {scale!r}")
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, numbers.Real) \
            or not math.isfinite(softcap) or softcap < 0:
        raise ShapeError(f"softcap: expected a finite number >= 0 (0 disables), got {softcap!r}")
    try:
        left, right = window
    except (TypeError, ValueError):
        raise ShapeError(f"window: expected a pair (left, right), got {window!r}") from None
    for side, w in (("left", left), ("right", right)):
        if isinstance(w, (bool, np.bool_)) or not isinstance(w, numbers.Integral) or w < -1:
            raise ShapeError(f"window: {side} must be an int >= -1 (-1 = unbounded), got {w!r}")
    # positions fit int32: a wider window is the same as an unbounded one
    left, right = (-1 if int(w) > INDEX_MAX else int(w) for w in (left, right))
    return Options(float(scale), left, right, float(softcap), bool(causal))


def check_index_array(x, name, ndim, length=None):
    """An integer array converted to contiguous int64 after its range is checked."""
    try:
        arr = np.asarray(x)
    except Exception:  # noqa: BLE001
        raise ShapeError(f"{name}: expected an integer array, got {type(x).__name__}") from None
    if arr.dtype.kind not in "iu":
        raise DTypeError(f"{name}: expected an integer dtype (int32), got {arr.dtype}")
    if arr.ndim != ndim:
        raise ShapeError(f"{name}: expected a {ndim}-D array, got shape {arr.shape}")
    if length is not None and arr.shape[0] != length:
        raise ShapeError(f"{name}: expected length {length}, got {arr.shape[0]}")
    if arr.size and (arr.min() < -INDEX_MAX or arr.max() > INDEX_MAX):
        raise ShapeError(f"{name}: values must fit in int32, got range "
                         f"[{arr.min()}, {arr.max()}]")
    return np.ascontiguousarray(arr, dtype=np.int64)


def head_vector(x, name, num_heads):
    """A per-query-head float vector (sinks, ALiBi slopes) as contiguous
    float64 (num_heads,), or None: any float dtype, kept exactly (float32
    values are exact in float64; kernels computing in float32 round them
    once). NaN and inf are kept (a NaN sink or slope propagates to its
    head's rows)."""
    if x is None:
        return None
    arr = as_array(x, name) if not isinstance(x, np.ndarray) else x
    if arr.dtype.kind != "f" and arr.dtype.name != "bfloat16":
        raise DTypeError(f"{name}: expected a float array (float32) of one value per query "
                         f"head, got dtype {arr.dtype}")
    if arr.shape != (num_heads,):
        raise ShapeError(f"{name}: expected shape ({num_heads},) (one per query head), "
                         f"got {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float64)


def tree_masks(tree_mask, q_len):
    """Checked speculative tree masks of sequences with q_len[b] queries
    each: (uint8 masks, int64 start of each sequence's block). tree_mask is
    a bool array of sum(q_len ** 2) entries; block b, row-major q_len[b] x
    q_len[b], must hold True on its diagonal and False above it (a query
    sees itself, and no later draft token)."""
    try:
        arr = np.asarray(tree_mask)
    except Exception:  # noqa: BLE001
        raise ShapeError(f"tree_mask: expected a 1-D bool array, got "
                         f"{type(tree_mask).__name__}") from None
    if arr.dtype != np.bool_:
        raise DTypeError(f"tree_mask: expected a bool array, got dtype {arr.dtype}")
    sizes = q_len.astype(np.int64) ** 2
    if arr.ndim != 1 or arr.shape[0] != int(sizes.sum()):
        raise ShapeError(f"tree_mask: expected shape ({int(sizes.sum())},) (sum over sequences "
                         f"of n_b ** 2, n_b from cu_seqlens_q), got {arr.shape}")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    for b, n in enumerate(q_len.tolist()):
        block = arr[starts[b]:starts[b] + n * n].reshape(n, n)
        if not block.diagonal().all():
            i = int(np.argmin(block.diagonal()))
            raise ShapeError(f"tree_mask: sequence {b}'s query {i} must see its own token "
                             f"(M[{i}, {i}] True), got False")
        upper = np.triu(block, 1)
        if upper.any():
            i, j = (int(x[0]) for x in np.nonzero(upper))
            raise ShapeError(f"tree_mask: sequence {b}'s query {i} cannot see the later draft "
                             f"token {j} (M[{i}, {j}] must be False)")
    return np.ascontiguousarray(arr).view(np.uint8), starts


def check_slots(slots, name="slots"):
    """Slot ids (page * page_size + offset): a 1-D integer array as
    contiguous int64; their range is checked against the storage later."""
    try:
        arr = np.asarray(slots)
    except Exception:  # noqa: BLE001
        raise ShapeError(f"{name}: expected a 1-D integer array, got {type(slots).__name__}") from None
    if arr.ndim != 1:
        raise ShapeError(f"{name}: expected a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise DTypeError(f"{name}: expected an integer dtype (int64), got {arr.dtype}")
    if arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max:
        raise ShapeError(f"{name}: values must fit in int64, got {arr.max()}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def check_cu_seqlens(x, name, total):
    """cu_seqlens: int (batch+1,), starts at 0, non-decreasing, ends at total."""
    cu = check_index_array(x, name, 1)
    if cu.shape[0] < 1:
        raise ShapeError(f"{name}: expected shape (batch + 1,), got {cu.shape}")
    if cu[0] != 0:
        raise ShapeError(f"{name}: must start at 0, got {cu[0]}")
    if cu.shape[0] > 1 and np.any(np.diff(cu) < 0):
        i = int(np.argmax(np.diff(cu) < 0))
        raise ShapeError(f"{name}: must be non-decreasing, got {cu[i]} then {cu[i + 1]} "
                         f"at index {i}")
    if cu[-1] != total:
        raise ShapeError(f"{name}: must end at the total number of rows ({total}), got {cu[-1]}")
    return cu


def check_out(out, shape, dtype, inputs, name="out"):
    """A caller-supplied output array: right shape/dtype, writable, contiguous
    last axis, no self-overlap, not overlapping the inputs it is computed from
    (writing in place over q itself is allowed)."""
    if not isinstance(out, np.ndarray):
        raise ShapeError(f"{name}: expected a numpy array, got {type(out).__name__}")
    if out.shape != tuple(shape):
        raise ShapeError(f"{name}: expected shape {tuple(shape)}, got {out.shape}")
    if out.dtype != dtype:
        raise DTypeError(f"{name}: expected dtype {dtype}, got {out.dtype}")
    if not out.flags.writeable:
        raise ShapeError(f"{name}: expected a writable array, got a read-only one")
    if out.size:
        isz = out.itemsize
        if (out.shape[-1] > 1 and out.strides[-1] != isz) or any(s % isz for s in out.strides):
            raise ShapeError(f"{name}: the last axis must be contiguous, got strides {out.strides}")
        if any(s == 0 and n > 1 for s, n in zip(out.strides, out.shape)):
            raise ShapeError(f"{name}: must not have zero (broadcast) strides, got {out.strides}")
        for nm, arr, inplace_ok in inputs:
            if np.may_share_memory(out, arr):
                same = (inplace_ok and out.ctypes.data == arr.ctypes.data
                        and out.strides == arr.strides and out.shape == arr.shape)
                if not same:
                    raise ShapeError(f"{name}: must not overlap {nm}")
    return out


def prepare_outputs(out, shape, q, inputs, return_lse, lse_shape):
    """The output array (allocated, or the caller's checked one) and the lse
    array (float32; float64 for float64 q) or None."""
    if out is None:
        out = np.empty(shape, dtype=q.dtype)
    else:
        check_out(out, shape, q.dtype, inputs)
    lse = None
    if return_lse:
        lse = np.empty(lse_shape, dtype=compute_dtype(q.dtype))
    return out, lse


# ---- the call forms ----

def _same_dtype(q, k, v):
    code = dtype_code(q, "q")
    for name, a in (("k", k), ("v", v)):
        dtype_code(a, name)
        if a.dtype != q.dtype:
            raise DTypeError(f"{name}: expected the dtype of q ({q.dtype}), got {a.dtype}")
    if not kernel_available(code, code, code):
        raise DTypeError(f"q: no kernel for dtype {q.dtype}")


def _head_dims(q, k, v, heads_axis, kname="k", vname="v"):
    """(H, Hkv, Dqk, Dv) after the head-count and head-dim checks."""
    h, d = q.shape[heads_axis], q.shape[-1]
    hkv, dk = k.shape[-2], k.shape[-1]
    if v.shape[-2] != hkv:
        raise ShapeError(f"{vname}: expected num_kv_heads {hkv} (as {kname}), got {v.shape[-2]}")
    if dk != d:
        raise ShapeError(f"{kname}: expected head_dim {d} (as q), got {dk}")
    if d < 1 or v.shape[-1] < 1:
        raise ShapeError(f"q/{vname}: head_dim must be >= 1, got {d} and {v.shape[-1]}")
    check_heads(h, hkv)
    return h, hkv, d, v.shape[-1]


def dense_call(q, k, v, causal, scale, window, softcap, sinks=None, alibi=None):
    """The Call of the dense API: q (B, Sq, H, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv)."""
    q, k, v = as_array(q, "q"), as_array(k, "k"), as_array(v, "v")
    check_ndim(q, "q", 4, "(batch, seq_q, num_heads, head_dim)")
    check_ndim(k, "k", 4, "(batch, seq_k, num_kv_heads, head_dim)")
    check_ndim(v, "v", 4, "(batch, seq_k, num_kv_heads, head_dim)")
    _same_dtype(q, k, v)
    b, sq = q.shape[:2]
    if k.shape[0] != b or v.shape[0] != b:
        raise ShapeError(f"k/v: expected batch {b} (as q), got {k.shape[0]} and {v.shape[0]}")
    sk = k.shape[1]
    if v.shape[1] != sk:
        raise ShapeError(f"v: expected seq_k {sk} (as k), got {v.shape[1]}")
    dims = _head_dims(q, k, v, 2)
    for name, n in (("seq_q", sq), ("seq_k", sk)):
        if n > INDEX_MAX:
            raise ShapeError(f"{name}: at most {INDEX_MAX}, got {n}")
    zeros = np.zeros(b, dtype=np.int64)
    seqs = Sequences(zeros, zeros, np.full(b, sq, dtype=np.int64),
                     np.full(b, sk, dtype=np.int64))
    opts = check_options(scale, window, softcap, causal, dims[2])
    return Call(q, k, v, "dense", seqs, opts, None, *dims,
                sinks=head_vector(sinks, "sinks", dims[0]),
                alibi=head_vector(alibi, "alibi_slopes", dims[0]))


def packed_call(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, window, softcap,
                sinks=None, alibi=None):
    """The Call of the packed (varlen) API: q (Tq, H, D), k (Tk, Hkv, D),
    v (Tk, Hkv, Dv) and both cu_seqlens of one batch size."""
    q, k, v = as_array(q, "q"), as_array(k, "k"), as_array(v, "v")
    check_ndim(q, "q", 3, "(total_q, num_heads, head_dim)")
    check_ndim(k, "k", 3, "(total_k, num_kv_heads, head_dim)")
    check_ndim(v, "v", 3, "(total_k, num_kv_heads, head_dim)")
    _same_dtype(q, k, v)
    if v.shape[0] != k.shape[0]:
        raise ShapeError(f"v: expected total_k {k.shape[0]} (as k), got {v.shape[0]}")
    dims = _head_dims(q, k, v, 1)
    cuq = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q.shape[0])
    cuk = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", k.shape[0])
    if cuq.shape != cuk.shape:
        raise ShapeError(f"cu_seqlens_k: expected shape {cuq.shape} (as cu_seqlens_q), "
                         f"got {cuk.shape}")
    opts = check_options(scale, window, softcap, causal, dims[2])
    seqs = Sequences(cuq[:-1].copy(), cuk[:-1].copy(), np.diff(cuq), np.diff(cuk))
    return Call(q, k, v, "packed", seqs, opts, None, *dims,
                sinks=head_vector(sinks, "sinks", dims[0]),
                alibi=head_vector(alibi, "alibi_slopes", dims[0]))


def pages(k_pages, v_pages, low_bit=False):
    """Validated page arrays (num_pages, page_size, Hkv, D or D // 2 for
    int4); one float dtype, or with low_bit any float or low-bit dtype each."""
    k_pages = as_array(k_pages, "k_pages", kv=low_bit)
    v_pages = as_array(v_pages, "v_pages", kv=low_bit)
    check_ndim(k_pages, "k_pages", 4, "(num_pages, page_size, num_kv_heads, head_dim)")
    check_ndim(v_pages, "v_pages", 4, "(num_pages, page_size, num_kv_heads, head_dim)")
    if not low_bit:
        dtype_code(k_pages, "k_pages")
        if v_pages.dtype != k_pages.dtype:
            raise DTypeError(f"v_pages: expected the dtype of k_pages ({k_pages.dtype}), "
                             f"got {v_pages.dtype}")
    if v_pages.shape[:3] != k_pages.shape[:3]:
        raise ShapeError(f"v_pages: expected (num_pages, page_size, num_kv_heads) "
                         f"{k_pages.shape[:3]} (as k_pages), got {v_pages.shape[:3]}")
    check_page_size(k_pages, "k_pages")
    return k_pages, v_pages


def page_head_dim(pages):
    """head_dim of page rows: twice the last axis for int4 pairs."""
    fmt = kv_format_of(pages)
    return pages.shape[-1] * (2 if fmt is not None and fmt.group else 1)


def page_scale(scale, pages, name, pname):
    """The checked scale of pages (None for float pages), see kv_scale."""
    fmt = kv_format_of(pages)
    if fmt is None:
        if scale is not None:
            raise ShapeError(f"{name}: {pname} are {pages.dtype}, which takes no scale; "
                             f"got {type(scale).__name__}")
        return None
    arr, _ = kv_scale(scale, fmt, pages.shape[:3], page_head_dim(pages), name)
    return arr


def check_page_size(pages, name):
    if pages.shape[1] < 1:
        raise ShapeError(f"{name}: page_size must be >= 1, got {pages.shape[1]}")


def block_table(table, seq_lens, num_pages, page_size):
    """Validated (block_table int32 (B, W) C-contiguous, seq_lens int64 (B,)).

    Raises ShapeError for malformed arrays or lengths beyond the table, and
    PageError for a used entry outside [0, num_pages). Entries past a
    sequence's pages are never read, so they may hold anything (e.g. -1)."""
    bt = table if isinstance(table, np.ndarray) else np.asarray(table)
    if bt.dtype != np.int32 and bt.dtype != np.int64:
        if bt.dtype.kind not in "iu":
            raise DTypeError(f"block_table: expected an integer dtype (int32), got {bt.dtype}")
        bt = bt.astype(np.int64)
    if bt.ndim != 2:
        raise ShapeError(f"block_table: expected shape (batch, max_pages_per_seq), got {bt.shape}")
    lens = check_index_array(seq_lens, "seq_lens", 1, bt.shape[0])
    if lens.size:
        if lens.min() < 0:
            b = int(np.argmin(lens))
            raise ShapeError(f"seq_lens: expected lengths >= 0, got {lens[b]} for sequence {b}")
        width = bt.shape[1]
        if int(lens.max()) > width * page_size:
            b = int(np.argmax(lens))
            raise ShapeError(f"seq_lens: sequence {b} has length {lens[b]}, which needs "
                             f"{(lens[b] + page_size - 1) // page_size} pages, but block_table "
                             f"has {width} columns")
    bad = check_chains(bt, lens, num_pages, page_size)
    if bad is not None:
        raise PageError(f"block_table[{bad[0]}, {bad[1]}]: expected a page id in "
                        f"[0, {num_pages}), got {bt[bad]}")
    if bt.dtype != np.int32 or not bt.flags.c_contiguous:
        # unused entries may not fit int32: zero them, they are never read
        used = np.arange(bt.shape[1])[None, :] < ((lens + page_size - 1) // page_size)[:, None]
        bt = np.where(used, bt, 0).astype(np.int32)
    return bt, lens


def paged_operands(q, k_pages, v_pages, k_scale, v_scale, any_float_pages=False):
    """The checked operands of a paged call: (q, k_pages, v_pages, k_scale,
    v_scale, (H, Hkv, D, Dv)): q (Tq, H, D) over pages (P, page_size, Hkv,
    D), float or low-bit (with their scales, see page_scale; K and V types
    chosen apart).

    any_float_pages: the backward's form: float pages of q's dtype family
    (float64 pairs only with float64), converted by the caller, no scales."""
    q = as_array(q, "q")
    check_ndim(q, "q", 3, "(tokens, num_heads, head_dim)")
    k_pages, v_pages = pages(k_pages, v_pages, low_bit=not any_float_pages)
    q_code = dtype_code(q, "q")
    for name, p in (("k_pages", k_pages), ("v_pages", v_pages)):
        code = _CODES[kv_name(p)]
        if any_float_pages:
            paired = (q.dtype == np.float64) == (p.dtype == np.float64)
        else:
            paired = kernel_available(q_code, code, code)
        if not paired:
            raise DTypeError(f"{name}: no kernel for q {q.dtype} over {kv_name(p)} pages "
                             "(float64 q needs float64 pages and vice versa; low-bit pages "
                             "need a float32, float16 or bfloat16 q)")
    h, d = q.shape[1], q.shape[-1]
    hkv, dk, dv = k_pages.shape[2], page_head_dim(k_pages), page_head_dim(v_pages)
    if dk != d:
        raise ShapeError(f"k_pages: expected head_dim {d} (as q), got {dk}"
                         + (f" ({k_pages.shape[-1]} bytes of int4 pairs)" if dk != k_pages.shape[-1] else ""))
    if d < 1 or dv < 1:
        raise ShapeError(f"q/v_pages: head_dim must be >= 1, got {d} and {dv}")
    check_heads(h, hkv)
    ks = page_scale(k_scale, k_pages, "k_scale", "k_pages")
    vs = page_scale(v_scale, v_pages, "v_scale", "v_pages")
    return q, k_pages, v_pages, ks, vs, (h, hkv, d, dv)


def paged_call(q, k_pages, v_pages, table, seq_lens, cu_seqlens_q, causal, scale, window,
               softcap, sinks=None, alibi=None):
    """The Call of the paged backward: q (Tq, H, D) over float pages
    (P, page_size, Hkv, D) of q's dtype family (see paged_operands)."""
    q, k_pages, v_pages, ks, vs, dims = paged_operands(q, k_pages, v_pages, None, None,
                                                       any_float_pages=True)
    num_pages, page_size = k_pages.shape[:2]
    bt, lens = block_table(table, seq_lens, num_pages, page_size)
    cuq = paged_queries(cu_seqlens_q, lens)
    if cuq[-1] != q.shape[0]:
        raise ShapeError(plan_queries_message(cu_seqlens_q is None, int(cuq[-1]), q.shape))
    opts = check_options(scale, window, softcap, causal, dims[2])
    q_start = cuq[:-1].copy()
    seqs = Sequences(q_start, q_start, np.diff(cuq), lens)   # k_start: unused for pages
    return Call(q, k_pages, v_pages, "paged", seqs, opts, bt, *dims, ks, vs,
                head_vector(sinks, "sinks", dims[0]), head_vector(alibi, "alibi_slopes", dims[0]))


def paged_queries(cu_seqlens_q, lens):
    """cu_seqlens_q (int64 (batch + 1,)) of paged queries over sequences of
    lengths lens: one query per sequence without it (decode); with it, each
    sequence's queries are its last positions, so there may be at most
    seq_lens[b] of them."""
    batch = lens.shape[0]
    if cu_seqlens_q is None:
        return np.arange(batch + 1, dtype=np.int64)
    cu = check_index_array(cu_seqlens_q, "cu_seqlens_q", 1)
    cuq = check_cu_seqlens(cu, "cu_seqlens_q", cu[-1] if cu.size else 0)
    if cuq.shape[0] != batch + 1:
        raise ShapeError(f"cu_seqlens_q: expected shape ({batch + 1},) for {batch} "
                         f"sequences, got {cuq.shape}")
    nq = np.diff(cuq)
    if np.any(nq > lens):
        b = int(np.argmax(nq > lens))
        raise ShapeError(f"cu_seqlens_q: sequence {b} has {nq[b]} queries but seq_lens[{b}] "
                         f"is {lens[b]} (its queries are its last positions)")
    return cuq


def plan_queries_message(decode, total, q_shape):
    """ShapeError text for a q of another row count than the plan's queries."""
    if decode:
        return (f"q: expected one query per sequence, shape ({total}, {q_shape[1]}, "
                f"{q_shape[2]}), got {q_shape}")
    return (f"q: expected {total} rows, where cu_seqlens_q ends (total_q), "
            f"got shape {q_shape}")


def kv_name(pages):
    """The engine's name of a page array's storage dtype (uint8: int4)."""
    fmt = kv_format_of(pages)
    return fmt.name if fmt is not None else pages.dtype.name


def outputs(call, out, return_lse):
    """The output array (allocated, or the caller's checked one) and the lse
    array (compute dtype) or None, shaped for the call's layout."""
    q = call.q
    tokens = q.shape[:-2]
    shape = tokens + (call.heads, call.head_dim_v)
    inputs = [("q", q, True)]
    if call.layout == "paged":
        inputs += [("k_pages", call.k, False), ("v_pages", call.v, False)]
    else:
        inputs += [("k", call.k, False), ("v", call.v, False)]
    return prepare_outputs(out, shape, q, inputs, return_lse, lse_shape(call))


def lse_shape(call):
    """(batch, H, seq_q) for "dense", (H, total_q) otherwise."""
    if call.layout == "dense":
        return (call.q.shape[0], call.heads, call.q.shape[1])
    return (call.heads, call.q.shape[0])


_LAYOUT_TEXT = {"dense": ("(batch, seq_q, num_heads, head_dim_v)", "(batch, num_heads, seq_q)"),
                "packed": ("(total_q, num_heads, head_dim_v)", "(num_heads, total_q)")}
_LAYOUT_TEXT["paged"] = _LAYOUT_TEXT["packed"]


def forward_results(call, out, dout, lse):
    """The backward's out, dout (the forward output's shape, q's dtype) and
    lse (as the forward returned it), as arrays."""
    out, dout = as_array(out, "out"), as_array(dout, "dout")
    q = call.q
    out_shape = q.shape[:-2] + (call.heads, call.head_dim_v)
    layout, lse_layout = _LAYOUT_TEXT[call.layout]
    for name, arr in (("out", out), ("dout", dout)):
        if arr.shape != out_shape:
            raise ShapeError(f"{name}: expected shape {out_shape} {layout}, got {arr.shape}")
        if arr.dtype != q.dtype:
            raise DTypeError(f"{name}: expected dtype {q.dtype} (as q), got {arr.dtype}")
    lse = as_array(lse, "lse")
    want = compute_dtype(q.dtype)
    if lse.dtype != want:
        raise DTypeError(f"lse: expected dtype {want} for {q.dtype} input "
                         f"(as returned by the forward), got {lse.dtype}")
    if lse.shape != lse_shape(call):
        raise ShapeError(f"lse: expected shape {lse_shape(call)} {lse_layout}, got {lse.shape}")
    return out, dout, lse
