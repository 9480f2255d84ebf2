"""cpuattn.PagePool: the C-level paged KV pool.

Data round trips, page chains, fork/copy-on-write, truncate, free, exhaustion
atomicity, bad ids and arrays, zero-copy views, block tables, thread safety
and the pinning done by PagePool.attention.
"""
import gc
import sys
import threading
import time
import types

import numpy as np
import pytest

import cpuattn
from cpuattn import DTypeError, PagePool, PageError, PoolFullError, ShapeError

try:
    import ml_dtypes
    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes is in the test extra
    BF16 = None

DTYPES = ["float32", "float64", "float16", "bfloat16"]
H, D = 2, 8


def np_dtype(name):
    if name == "bfloat16":
        if BF16 is None:
            pytest.skip("ml_dtypes not installed")
        return BF16
    return np.dtype(name)


def randn(rng, n, dtype=np.float32, h=H, d=D):
    return rng.standard_normal((n, h, d)).astype(dtype)


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(
        np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


def refcounts_from_chains(pool, seqs):
    counts = np.zeros(pool.num_pages, np.int64)
    for s in seqs:
        np.add.at(counts, pool.pages(s), 1)
    return counts


class Tracked:
    """A pool plus the expected content of each sequence, built from numpy."""

    def __init__(self, pool):
        self.pool = pool
        self.want = {}

    def new(self):
        s = self.pool.create_sequence()
        self.want[s] = (np.zeros((0, self.pool.num_kv_heads, self.pool.head_dim), self.pool.dtype),) * 2
        return s

    def append(self, s, k, v):
        self.pool.append(s, k, v)
        wk, wv = self.want[s]
        self.want[s] = (np.concatenate([wk, np.asarray(k).astype(self.pool.dtype)]),
                        np.concatenate([wv, np.asarray(v).astype(self.pool.dtype)]))

    def fork(self, s):
        f = self.pool.fork(s)
        self.want[f] = self.want[s]
        return f

    def truncate(self, s, n):
        self.pool.truncate(s, n)
        self.want[s] = tuple(x[:n] for x in self.want[s])

    def free(self, s):
        self.pool.free_sequence(s)
        del self.want[s]

    def check(self):
        self.pool._check_invariants()
        for s, (wk, wv) in self.want.items():
            k, v = self.pool.gather(s)
            assert same_bits(k, wk) and same_bits(v, wv), f"sequence {s} content"
            assert self.pool.seq_len(s) == len(wk)
            assert len(self.pool.pages(s)) == -(-len(wk) // self.pool.page_size)
        np.testing.assert_array_equal(self.pool._refcounts(),
                                      refcounts_from_chains(self.pool, self.want))


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ---- construction and attributes ----

@pytest.mark.parametrize("dtype", DTYPES)
def test_attributes(dtype):
    dt = np_dtype(dtype)
    pool = PagePool(5, 7, 3, 4, dtype=dtype)
    assert (pool.num_pages, pool.page_size, pool.num_kv_heads, pool.head_dim) == (5, 7, 3, 4)
    assert pool.dtype == dt and isinstance(pool.dtype, np.dtype)
    assert pool.num_free_pages == 5
    assert pool.nbytes == 2 * 5 * 7 * 3 * 4 * dt.itemsize
    for view in (pool.k_pages, pool.v_pages):
        assert view.shape == (5, 7, 3, 4) and view.dtype == dt
        assert view.flags.c_contiguous and view.flags.writeable
        assert view.ctypes.data % 64 == 0
        assert not view.view(np.uint8).any()  # zero-initialised
    assert pool.nbytes == pool.k_pages.nbytes + pool.v_pages.nbytes
    assert "PagePool(num_pages=5, page_size=7" in repr(pool) and dt.name in repr(pool)
    pool._check_invariants()


def test_dtype_spellings():
    assert PagePool(1, 1, 1, 1, dtype=np.float16).dtype == np.float16
    assert PagePool(1, 1, 1, 1, dtype=np.dtype("f8")).dtype == np.float64
    assert PagePool(1, 1, 1, 1).dtype == np.float32
    if BF16 is not None:
        assert PagePool(1, 1, 1, 1, dtype=BF16).dtype == BF16


@pytest.mark.parametrize("bad", ["int32", "float8", None, np.int64, "complex64", object()])
def test_bad_dtype(bad):
    with pytest.raises(DTypeError, match="dtype"):
        PagePool(2, 2, 1, 1, dtype=bad)


def test_bfloat16_needs_ml_dtypes(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import now fails
    with pytest.raises(DTypeError, match="pip install ml_dtypes"):
        PagePool(2, 2, 1, 1, dtype="bfloat16")


@pytest.mark.parametrize("arg", range(4))
@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4", None, 2**31])
def test_bad_sizes(arg, bad):
    args = [3, 4, 2, 8]
    args[arg] = bad
    name = ["num_pages", "page_size", "num_kv_heads", "head_dim"][arg]
    with pytest.raises(ShapeError, match=name):
        PagePool(*args)


def test_numpy_int_sizes():
    pool = PagePool(np.int64(3), np.int32(4), np.uint8(2), np.int16(8))
    assert pool.k_pages.shape == (3, 4, 2, 8)


def test_size_overflow():
    big = 2**31 - 1
    with pytest.raises(ShapeError, match="address space"):
        PagePool(big, big, big, big)
    # addressable by size_t but not allocatable (2**57 bytes)
    with pytest.raises(MemoryError, match="cannot allocate"):
        PagePool(1, 2**31 - 1, 2**20, 16, dtype="float32")


# ---- round trips ----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size", [1, 7, 16, 32])
def test_round_trip_chunks(rng, dtype, page_size):
    dt = np_dtype(dtype)
    t = Tracked(PagePool(64, page_size, H, D, dtype=dtype))
    s = t.new()
    for n in (5, 1, 13, 0, 20, page_size, 2):  # partial pages, exact pages, empty chunk
        t.append(s, randn(rng, n, np.float32), randn(rng, n, np.float32))
        t.check()
    k, v = t.pool.gather(s)
    assert k.dtype == dt and k.flags.c_contiguous and v.flags.c_contiguous
    # the chain really is where the rows live (token-major, page_size rows a page)
    chain = t.pool.pages(s)
    assert chain.dtype == np.int32 and len(set(chain.tolist())) == len(chain)
    n = t.pool.seq_len(s)
    assert same_bits(t.pool.k_pages[chain].reshape(-1, H, D)[:n], k)
    assert same_bits(t.pool.v_pages[chain].reshape(-1, H, D)[:n], v)
    assert t.pool.num_free_pages == 64 - len(chain)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_dtype", DTYPES)
def test_conversion_from_any_float(rng, dtype, in_dtype):
    dt, it = np_dtype(dtype), np_dtype(in_dtype)
    pool = PagePool(4, 4, H, D, dtype=dtype)
    s = pool.create_sequence()
    x = randn(rng, 6, np.float32).astype(it)
    pool.append(s, x, -x)
    k, v = pool.gather(s)
    assert same_bits(k, x.astype(dt)) and same_bits(v, (-x).astype(dt))


def test_round_to_nearest_even():
    # halfway cases: ties go to the even mantissa
    pool = PagePool(2, 4, 1, 4, dtype="float16")
    s = pool.create_sequence()
    u = 2.0**-11  # half an fp16 ulp at 1
    x = np.array([1 + u, 1 + 3 * u, -(1 + u), 65520.0], np.float32).reshape(1, 1, 4)
    with np.errstate(over="ignore"):  # 65520 rounds up to inf, as it should
        pool.append(s, x, x.astype(np.float64))
    k, v = pool.gather(s)
    want = np.array([1.0, 1 + 4 * u, -1.0, np.inf], np.float16).reshape(1, 1, 4)
    assert same_bits(k, want) and same_bits(v, want)
    if BF16 is not None:
        pool = PagePool(2, 4, 1, 3, dtype="bfloat16")
        s = pool.create_sequence()
        u = 2.0**-8  # half a bf16 ulp at 1
        x = np.array([1 + u, 1 + 3 * u, -(1 + u)], np.float32).reshape(1, 1, 3)
        pool.append(s, x, x)
        k, _ = pool.gather(s)
        want = np.array([1.0, 1 + 4 * u, -1.0], np.float32).astype(BF16).reshape(1, 1, 3)
        assert same_bits(k, want)


def test_strided_and_list_inputs(rng):
    pool = PagePool(4, 3, H, D)
    s = pool.create_sequence()
    x = rng.standard_normal((H, 5, D)).astype(np.float32).transpose(1, 0, 2)  # (5, H, D) view
    y = rng.standard_normal((5, H, 2 * D)).astype(np.float32)[:, :, ::2]  # strided last axis
    pool.append(s, x, y)
    pool.append(s, x[:1].tolist(), y[:1].tolist())  # nested lists: float64 via numpy
    k, v = pool.gather(s)
    np.testing.assert_array_equal(k, np.concatenate([x, x[:1]]))
    np.testing.assert_array_equal(v, np.concatenate([y, y[:1]]))


def test_append_from_own_pages(rng):
    # a view of the pool's own storage is a valid source (memmove, no aliasing trouble)
    t = Tracked(PagePool(6, 4, H, D))
    s = t.new()
    t.append(s, randn(rng, 6), randn(rng, 6))
    chain = t.pool.pages(s)
    t.append(s, t.pool.k_pages[chain[0]], t.pool.v_pages[chain[0]])
    t.check()


def test_empty_sequence():
    pool = PagePool(2, 4, H, D)
    s = pool.create_sequence()
    assert pool.seq_len(s) == 0 and pool.pages(s).shape == (0,)
    k, v = pool.gather(s)
    assert k.shape == (0, H, D) and v.shape == (0, H, D)
    pool.append(s, np.zeros((0, H, D)), np.zeros((0, H, D)))
    assert pool.seq_len(s) == 0 and pool.num_free_pages == 2


def test_ids_are_distinct_and_never_reused():
    pool = PagePool(2, 4, H, D)
    ids = [pool.create_sequence() for _ in range(50)]
    assert len(set(ids)) == 50 and all(isinstance(i, int) for i in ids)
    for i in ids:
        pool.free_sequence(i)
    assert pool.create_sequence() not in ids


# ---- fork and copy-on-write ----

def test_fork_shares_pages_and_cow(rng):
    t = Tracked(PagePool(10, 4, H, D))
    pool = t.pool
    parent = t.new()
    t.append(parent, randn(rng, 10), randn(rng, 10))  # 3 pages, last holds 2 of 4
    pchain = pool.pages(parent)
    free0 = pool.num_free_pages
    child = t.fork(parent)
    np.testing.assert_array_equal(pool.pages(child), pchain)
    assert pool.num_free_pages == free0  # sharing takes no page
    np.testing.assert_array_equal(pool._refcounts()[pchain], [2, 2, 2])
    t.check()

    t.append(child, randn(rng, 1), randn(rng, 1))  # COW of the shared partial page
    cchain = pool.pages(child)
    np.testing.assert_array_equal(cchain[:2], pchain[:2])
    assert cchain[2] != pchain[2]
    np.testing.assert_array_equal(pool.pages(parent), pchain)
    np.testing.assert_array_equal(pool._refcounts()[pchain], [2, 2, 1])
    assert pool.num_free_pages == free0 - 1
    t.check()

    t.append(parent, randn(rng, 1), randn(rng, 1))  # parent's page is its own now: in place
    np.testing.assert_array_equal(pool.pages(parent), pchain)
    assert pool.num_free_pages == free0 - 1
    t.check()

    t.append(parent, randn(rng, 5), randn(rng, 5))
    t.append(child, randn(rng, 9), randn(rng, 9))
    t.check()


def test_parent_append_leaves_fork_alone(rng):
    t = Tracked(PagePool(10, 4, H, D))
    parent = t.new()
    t.append(parent, randn(rng, 6), randn(rng, 6))
    child = t.fork(parent)
    t.append(parent, randn(rng, 3), randn(rng, 3))  # parent copies the shared page
    assert t.pool.pages(parent)[1] != t.pool.pages(child)[1]
    t.check()


def test_fork_at_page_boundary_needs_no_copy(rng):
    t = Tracked(PagePool(10, 4, H, D))
    parent = t.new()
    t.append(parent, randn(rng, 8), randn(rng, 8))
    child = t.fork(parent)
    free0 = t.pool.num_free_pages
    t.append(child, randn(rng, 1), randn(rng, 1))
    assert t.pool.num_free_pages == free0 - 1  # a fresh page, the full ones stay shared
    np.testing.assert_array_equal(t.pool.pages(child)[:2], t.pool.pages(parent))
    t.check()


def test_fork_of_fork_and_empty(rng):
    t = Tracked(PagePool(12, 3, H, D))
    a = t.new()
    e = t.fork(a)  # fork of an empty sequence
    t.append(a, randn(rng, 5), randn(rng, 5))
    b = t.fork(a)
    c = t.fork(b)
    np.testing.assert_array_equal(t.pool._refcounts()[t.pool.pages(a)], [3, 3])
    for s in (a, b, c, e):
        t.append(s, randn(rng, 2), randn(rng, 2))
        t.check()


# ---- truncate ----

@pytest.mark.parametrize("length,pages_left", [(0, 0), (5, 2), (8, 2), (9, 3), (11, 3)])
def test_truncate(rng, length, pages_left):
    t = Tracked(PagePool(6, 4, H, D))
    s = t.new()
    t.append(s, randn(rng, 11), randn(rng, 11))
    chain = t.pool.pages(s)
    t.truncate(s, length)
    np.testing.assert_array_equal(t.pool.pages(s), chain[:pages_left])
    assert t.pool.num_free_pages == 6 - pages_left
    t.check()
    t.append(s, randn(rng, 6), randn(rng, 6))  # then append: rows land after `length`
    t.check()


def test_truncate_errors_change_nothing(rng):
    t = Tracked(PagePool(6, 4, H, D))
    s = t.new()
    t.append(s, randn(rng, 7), randn(rng, 7))
    with pytest.raises(ShapeError, match=r"at most seq_len \(7\)"):
        t.pool.truncate(s, 8)  # never clamped
    for bad in (-1, 2.0, None, True, "3"):
        with pytest.raises(ShapeError, match="length"):
            t.pool.truncate(s, bad)
    t.check()
    t.pool.truncate(s, np.int64(3))
    t.want[s] = tuple(x[:3] for x in t.want[s])
    t.check()


def test_truncate_shared(rng):
    t = Tracked(PagePool(8, 4, H, D))
    parent = t.new()
    t.append(parent, randn(rng, 10), randn(rng, 10))
    child = t.fork(parent)
    free0 = t.pool.num_free_pages
    t.truncate(child, 5)  # drops its reference to page 3, which parent still uses
    assert t.pool.num_free_pages == free0
    t.check()
    t.append(child, randn(rng, 2), randn(rng, 2))  # shared partial page 2: copied first
    assert t.pool.pages(child)[1] != t.pool.pages(parent)[1]
    t.check()
    t.truncate(parent, 0)
    t.check()


# ---- free ----

def test_free_sequence(rng):
    t = Tracked(PagePool(8, 4, H, D))
    a = t.new()
    t.append(a, randn(rng, 10), randn(rng, 10))
    b = t.fork(a)
    t.append(b, randn(rng, 4), randn(rng, 4))  # b: COW page 2 plus a new page
    assert t.pool.num_free_pages == 3
    t.free(a)  # pages 0, 1 still held by b; a's own page 2 returns
    assert t.pool.num_free_pages == 4
    t.check()
    t.free(b)
    assert t.pool.num_free_pages == 8
    t.check()
    with pytest.raises(PageError, match=f"sequence id {b} was freed"):
        t.pool.free_sequence(b)  # double free is refused, not corrupting
    t.pool._check_invariants()


# ---- exhaustion ----

def test_pool_full_changes_nothing(rng):
    t = Tracked(PagePool(4, 4, H, D))
    s = t.new()
    t.append(s, randn(rng, 10), randn(rng, 10))  # 3 pages, 1 free
    chain = t.pool.pages(s)
    k_before, v_before = t.pool.k_pages.copy(), t.pool.v_pages.copy()
    with pytest.raises(PoolFullError, match="needs 2 free pages.*has 1 of 4 free"):
        t.pool.append(s, randn(rng, 7), randn(rng, 7))
    assert t.pool.num_free_pages == 1 and t.pool.seq_len(s) == 10
    np.testing.assert_array_equal(t.pool.pages(s), chain)
    assert same_bits(t.pool.k_pages, k_before) and same_bits(t.pool.v_pages, v_before)
    t.check()
    t.append(s, randn(rng, 6), randn(rng, 6))  # exactly fits
    assert t.pool.num_free_pages == 0
    t.check()
    with pytest.raises(PoolFullError):
        t.pool.append(s, randn(rng, 1), randn(rng, 1))
    t.check()


def test_pool_full_counts_the_cow_page(rng):
    t = Tracked(PagePool(3, 4, H, D))
    a = t.new()
    t.append(a, randn(rng, 6), randn(rng, 6))
    b = t.fork(a)
    filler = t.new()
    t.append(filler, randn(rng, 4), randn(rng, 4))  # takes the last free page
    with pytest.raises(PoolFullError, match="needs 1 free page"):
        t.pool.append(b, randn(rng, 1), randn(rng, 1))  # fits the page, but must copy it
    t.check()
    t.free(filler)
    t.append(b, randn(rng, 1), randn(rng, 1))
    t.check()


# ---- bad ids and arrays ----

BAD_IDS = [999, -1, 2**70, 1.0, "0", None, True, np.float32(0)]


def _calls(pool, seq):
    ok = np.zeros((1, H, D), np.float32)
    return [lambda: pool.seq_len(seq), lambda: pool.append(seq, ok, ok),
            lambda: pool.fork(seq), lambda: pool.truncate(seq, 0),
            lambda: pool.free_sequence(seq), lambda: pool.pages(seq),
            lambda: pool.gather(seq), lambda: pool.block_table([seq])]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_ids(bad):
    pool = PagePool(4, 4, H, D)
    s = pool.create_sequence()
    pool.append(s, np.ones((3, H, D)), np.ones((3, H, D)))
    for call in _calls(pool, bad):
        with pytest.raises(PageError, match="seq"):
            call()
    assert pool.seq_len(s) == 3 and pool.num_free_pages == 3
    pool._check_invariants()


def test_freed_id_everywhere():
    pool = PagePool(4, 4, H, D)
    s = pool.create_sequence()
    pool.append(s, np.ones((3, H, D)), np.ones((3, H, D)))
    pool.free_sequence(s)
    for call in _calls(pool, s):
        with pytest.raises(PageError, match=f"{s} was freed"):
            call()
    pool._check_invariants()
    assert pool.num_free_pages == 4


def test_numpy_int_ids():
    pool = PagePool(4, 4, H, D)
    s = pool.create_sequence()
    assert pool.seq_len(np.int64(s)) == 0
    assert pool.fork(np.uint32(s)) != s


@pytest.mark.parametrize("k_shape,v_shape,match", [
    ((3, H, D + 1), (3, H, D), "k: expected shape"),
    ((3, H + 1, D), (3, H, D), "k: expected shape"),
    ((3, H, D), (3, H, 1), "v: expected shape"),
    ((H, D), (H, D), "k: expected a 3-D"),
    ((1, 3, H, D), (1, 3, H, D), "k: expected a 3-D"),
    ((3, H, D), (2, H, D), "v: expected 3 rows"),
])
def test_bad_shapes(k_shape, v_shape, match):
    pool = PagePool(4, 4, H, D)
    s = pool.create_sequence()
    with pytest.raises(ShapeError, match=match):
        pool.append(s, np.zeros(k_shape, np.float32), np.zeros(v_shape, np.float32))
    assert pool.seq_len(s) == 0 and pool.num_free_pages == 4


@pytest.mark.parametrize("bad", [np.int32, np.complex64, np.bool_, np.float128]
                         if hasattr(np, "float128") else [np.int32, np.complex64, np.bool_])
def test_bad_dtypes(bad):
    pool = PagePool(4, 4, H, D)
    s = pool.create_sequence()
    with pytest.raises(DTypeError, match="v: expected dtype float32"):
        pool.append(s, np.zeros((2, H, D), np.float32), np.zeros((2, H, D), bad))
    with pytest.raises(DTypeError, match="k: expected"):
        pool.append(s, "not an array", np.zeros((2, H, D), np.float32))
    assert pool.seq_len(s) == 0


def test_too_long():
    pool = PagePool(1, 1, 1, 1)
    s = pool.create_sequence()
    # 2**31 rows without the memory: a broadcast array (checked before conversion)
    big = np.broadcast_to(np.zeros((1, 1, 1), np.float32), (2**31, 1, 1))
    with pytest.raises(ShapeError, match="would exceed"):
        pool.append(s, big, big)
    assert pool.seq_len(s) == 0


# ---- zero-copy views ----

def test_views_are_zero_copy(rng):
    pool = PagePool(4, 4, H, D)
    kv, vv = pool.k_pages, pool.v_pages  # taken before any write
    s = pool.create_sequence()
    x = randn(rng, 5)
    pool.append(s, x, 2 * x)
    chain = pool.pages(s)
    np.testing.assert_array_equal(kv[chain].reshape(-1, H, D)[:5], x)
    np.testing.assert_array_equal(vv[chain].reshape(-1, H, D)[:5], 2 * x)
    kv[chain[0], 0] = 42.0  # and writes through the view show in gather
    assert np.all(pool.gather(s)[0][0] == 42.0)
    assert np.shares_memory(pool.k_pages, kv) and not np.shares_memory(kv, vv)


def test_views_keep_pool_alive(rng):
    pool = PagePool(4, 4, H, D)
    s = pool.create_sequence()
    x = randn(rng, 3)
    pool.append(s, x, x)
    kv = pool.k_pages
    del pool
    gc.collect()
    for _ in range(3):  # churn the allocator; kv must still point at live memory
        PagePool(4, 4, H, D).k_pages[:] = 7
    np.testing.assert_array_equal(kv[0, :3], x)
    kv[:] = 1.0


# ---- block_table ----

def test_block_table(rng):
    pool = PagePool(16, 4, H, D)
    seqs = [pool.create_sequence() for _ in range(4)]
    for s, n in zip(seqs, (9, 0, 4, 13)):
        pool.append(s, randn(rng, n), randn(rng, n))
    order = [seqs[3], seqs[1], seqs[0], seqs[3], seqs[2]]
    table, lens = pool.block_table(order)
    assert table.dtype == np.int32 and lens.dtype == np.int32
    assert table.shape == (5, 4) and table.flags.c_contiguous
    np.testing.assert_array_equal(lens, [13, 0, 9, 13, 4])
    for row, s in zip(table, order):
        chain = pool.pages(s)
        np.testing.assert_array_equal(row[:len(chain)], chain)
        assert np.all(row[len(chain):] == -1)
    # the same through a numpy id array
    t2, l2 = pool.block_table(np.array(order, dtype=np.int16))
    np.testing.assert_array_equal(t2, table)
    np.testing.assert_array_equal(l2, lens)
    # rebuilding K from the table and the view gives gather's rows
    kp = pool.k_pages
    for b, s in enumerate(order):
        rows = kp[table[b, :-(-lens[b] // 4)]].reshape(-1, H, D)[:lens[b]]
        np.testing.assert_array_equal(rows, pool.gather(s)[0])


def test_block_table_edges():
    pool = PagePool(4, 4, H, D)
    t, l = pool.block_table([])
    assert t.shape == (0, 1) and l.shape == (0,)
    s = pool.create_sequence()
    t, l = pool.block_table((s,))
    np.testing.assert_array_equal(t, [[-1]])
    np.testing.assert_array_equal(l, [0])
    with pytest.raises(PageError, match=r"seqs\[1\]: unknown sequence id 77"):
        pool.block_table([s, 77])
    with pytest.raises(PageError, match=r"seqs\[0\]: expected an int"):
        pool.block_table([0.5])
    with pytest.raises(ShapeError, match="seqs"):
        pool.block_table(s)
    with pytest.raises(ShapeError, match="seqs"):
        pool.block_table(np.zeros((1, 1), np.int64))


# ---- threads ----

def test_threads_hammer():
    pool = PagePool(96, 4, 1, 4, dtype="float16")
    stop = threading.Event()
    errors = []
    lock = threading.Lock()  # guards `errors` only

    def worker(seed):
        rng = np.random.default_rng(seed)
        t = Tracked(pool)  # each thread owns its sequences and checks their content
        try:
            while not stop.is_set():
                op = rng.integers(7)
                if op == 0 or not t.want:
                    t.new()
                    continue
                s = list(t.want)[rng.integers(len(t.want))]
                if op == 1:
                    n = int(rng.integers(0, 9))
                    x = rng.standard_normal((n, 1, 4)).astype(np.float32)
                    try:
                        t.append(s, x, -x)
                    except PoolFullError:
                        pass
                elif op == 2 and len(t.want) < 6:
                    t.fork(s)
                elif op == 3:
                    t.truncate(s, int(rng.integers(0, pool.seq_len(s) + 1)))
                elif op == 4:
                    t.free(s)
                elif op == 5:
                    k, v = pool.gather(s)
                    assert same_bits(k, t.want[s][0]) and same_bits(v, t.want[s][1])
                    table, lens = pool.block_table(list(t.want))
                    assert list(lens) == [len(w[0]) for w in t.want.values()]
                elif len(t.want[s][0]):
                    # attention over this thread's sequences while the others
                    # append/fork/truncate/free on the same pool
                    seqs = [x for x in t.want if len(t.want[x][0])]
                    q = rng.standard_normal((len(seqs), 2, 4)).astype(np.float32)
                    out = pool.attention(q, seqs)
                    for b, x in enumerate(seqs):
                        wk, wv = (w.astype(np.float64) for w in t.want[x])
                        ref = cpuattn.reference_attention(q[b][None, None], wk[None], wv[None],
                                                          causal=True)
                        np.testing.assert_allclose(out[b], ref[0, 0], atol=2e-5, rtol=2e-5)
            for s in list(t.want):
                k, v = pool.gather(s)
                assert same_bits(k, t.want[s][0]) and same_bits(v, t.want[s][1])
                t.free(s)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            with lock:
                errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        pool._check_invariants()  # a consistent snapshot under the pool's lock
        time.sleep(0.05)
    stop.set()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    pool._check_invariants()
    assert pool.num_free_pages == pool.num_pages
    assert not pool._refcounts().any()


# ---- attention: plans hold the pages they read ----

def snapshot_reference(pool, seqs, q):
    """The float64 oracle of decode over the sequences as they are now."""
    rows = []
    for b, s in enumerate(seqs):
        k, v = pool.gather(s)
        rows.append(cpuattn.reference_attention(q[b][None, None], k[None].astype(np.float64),
                                                v[None].astype(np.float64), causal=True)[0, 0])
    return np.stack(rows)


def test_plan_holds_pages(rng):
    t = Tracked(PagePool(8, 4, H, D))
    pool = t.pool
    a, b = t.new(), t.new()
    t.append(a, randn(rng, 6), randn(rng, 6))
    t.append(b, randn(rng, 3), randn(rng, 3))
    pinned = np.concatenate([pool.pages(a), pool.pages(b)])
    free0 = pool.num_free_pages  # 5
    q = randn(rng, 2, np.float32, h=4)
    want = snapshot_reference(pool, [a, b], q)
    with pool.plan([a, b]) as plan:
        np.testing.assert_array_equal(plan.block_table, [pool.pages(a), [pool.pages(b)[0], 0]])
        np.testing.assert_array_equal(plan.seq_lens, [6, 3])
        np.testing.assert_array_equal(pool._refcounts()[pinned], 2)  # chain + plan
        pool._check_invariants()
        # free a sequence from another thread: its pages stay out of the free list
        th = threading.Thread(target=t.free, args=(a,))
        th.start()
        th.join()
        assert pool.num_free_pages == free0
        pool._check_invariants()
        with pytest.raises(PageError):
            pool.seq_len(a)
        # take every free page: none of them may be a held one
        filler = t.new()
        with pytest.raises(PoolFullError):
            t.append(filler, randn(rng, 100), randn(rng, 100))
        t.append(filler, randn(rng, 4 * free0), randn(rng, 4 * free0))
        assert pool.num_free_pages == 0
        assert not set(pool.pages(filler).tolist()) & set(pinned.tolist())
        # the plan still reads the snapshot
        np.testing.assert_allclose(plan.run(q), want, rtol=2e-5, atol=2e-5)
        t.free(filler)
    assert plan.closed
    plan.close()   # a second close does nothing
    with pytest.raises(PageError, match="closed"):
        plan.run(q)
    # after close the freed sequence's pages come back
    assert pool.num_free_pages == 8 - len(pool.pages(b))
    np.testing.assert_array_equal(pool._refcounts(), refcounts_from_chains(pool, [b]))
    t.check()


def test_plan_released_by_garbage_collection(rng):
    pool = PagePool(4, 4, H, D)
    s = pool.create_sequence()
    pool.append(s, randn(rng, 5), randn(rng, 5))
    plan = pool.plan([s])
    assert pool._refcounts()[pool.pages(s)].tolist() == [2, 2]
    del plan
    gc.collect()
    np.testing.assert_array_equal(pool._refcounts(), refcounts_from_chains(pool, [s]))


def test_attention_forwards_options_and_unpins_on_error(rng):
    pool = PagePool(4, 4, H, D)
    s = pool.create_sequence()
    pool.append(s, randn(rng, 5), randn(rng, 5))
    q = randn(rng, 2, np.float32, h=4)
    opts = dict(cu_seqlens_q=[0, 2], causal=False, scale=0.5, window=(3, 0), softcap=20.0,
                return_lse=True)
    got = pool.attention(q, [s], **opts)
    want = cpuattn.paged_attention(q, pool.k_pages, pool.v_pages, *pool.block_table([s]), **opts)
    for g, w in zip(got, want):
        assert same_bits(g, w)
    with pytest.raises(ShapeError, match="q"):
        pool.attention(q[:, :3], [s])
    np.testing.assert_array_equal(pool._refcounts(), refcounts_from_chains(pool, [s]))
    pool._check_invariants()
    # a bad id fails before anything is held
    with pytest.raises(PageError, match=r"seqs\[1\]"):
        pool.attention(q, [s, 5])
    np.testing.assert_array_equal(pool._refcounts(), refcounts_from_chains(pool, [s]))


def test_append_while_planned_copies_the_page(rng):
    # an append into a held partial page must not change what the plan reads
    t = Tracked(PagePool(6, 4, H, D))
    pool = t.pool
    s = t.new()
    t.append(s, randn(rng, 6), randn(rng, 6))
    last = pool.pages(s)[-1]
    q = randn(rng, 1, h=4)
    want = snapshot_reference(pool, [s], q)
    with pool.plan([s]) as plan:
        before = pool.k_pages[last].copy()
        t.truncate(s, 5)
        t.append(s, randn(rng, 2), randn(rng, 2))  # rewrites slot 1 of the last page: COW
        assert pool.pages(s)[1] != last
        assert same_bits(pool.k_pages[last], before)
        pool._check_invariants()
        np.testing.assert_allclose(plan.run(q), want, rtol=2e-5, atol=2e-5)
    t.check()
    assert pool.num_free_pages == 6 - 2


# ---- attention: the real kernel (needs cpuattn.paged) ----

def test_attention_matches_reference(rng):
    pytest.importorskip("cpuattn.paged")
    pool = PagePool(32, 5, H, D, dtype="float16")
    seqs = [pool.create_sequence() for _ in range(3)]
    for s, n in zip(seqs, (1, 12, 23)):
        pool.append(s, randn(rng, n), randn(rng, n))
    seqs.append(pool.fork(seqs[2]))
    pool.append(seqs[3], randn(rng, 3), randn(rng, 3))
    nh = 2 * H
    # decode: one query per sequence at its last position
    q = randn(rng, len(seqs), np.float32, h=nh)
    out, lse = pool.attention(q, seqs, return_lse=True)
    for b, s in enumerate(seqs):
        k, v = pool.gather(s)
        ro, rl = cpuattn.reference_attention(q[b][None, None], k[None].astype(np.float64),
                                             v[None].astype(np.float64), causal=True,
                                             return_lse=True)
        np.testing.assert_allclose(out[b], ro[0, 0], atol=2e-5, rtol=2e-5)
        np.testing.assert_allclose(lse[:, b], rl[0, :, 0], atol=2e-5, rtol=2e-5)
    # chunked: the last n_b positions of each sequence
    cu = np.array([0, 1, 4, 4, 9], np.int32)
    q = randn(rng, int(cu[-1]), np.float32, h=nh)
    out = pool.attention(q, seqs, cu_seqlens_q=cu)
    for b, s in enumerate(seqs):
        if cu[b + 1] == cu[b]:
            continue
        k, v = pool.gather(s)
        ro = cpuattn.reference_attention(q[cu[b]:cu[b + 1]][None], k[None].astype(np.float64),
                                         v[None].astype(np.float64), causal=True)
        np.testing.assert_allclose(out[cu[b]:cu[b + 1]], ro[0], atol=2e-5, rtol=2e-5)
    pool._check_invariants()
    assert not (pool._refcounts() - refcounts_from_chains(pool, seqs)).any()


def test_attention_while_another_thread_frees(rng):
    # each round, another thread frees the sequence being read and refills the
    # pool with NaN: the call either fails up front (PageError) or reads the
    # pinned pages and gives exactly the result of an undisturbed call
    pytest.importorskip("cpuattn.paged")
    pool = PagePool(40, 16, H, D)
    k0, v0 = randn(rng, 200), randn(rng, 200)
    other = pool.create_sequence()
    pool.append(other, randn(rng, 100), randn(rng, 100))
    q = randn(rng, 2, np.float32, h=2 * H)
    nan = np.full((16, H, D), np.nan, np.float32)
    want = None

    def churn(victim):
        pool.free_sequence(victim)
        filler = pool.create_sequence()
        try:
            while True:
                pool.append(filler, nan, nan)
        except PoolFullError:
            pass
        pool.free_sequence(filler)

    for _ in range(20):
        victim = pool.create_sequence()
        pool.append(victim, k0, v0)
        if want is None:
            want = pool.attention(q, [victim, other])
        th = threading.Thread(target=churn, args=(victim,))
        th.start()
        try:
            np.testing.assert_array_equal(pool.attention(q, [victim, other]), want)
        except PageError:
            pass
        finally:
            th.join()
    pool._check_invariants()
    assert pool.num_free_pages == 40 - len(pool.pages(other))
