"""PagePool against a pure-Python model (hypothesis RuleBasedStateMachine).

The model keeps, for each live sequence, its K/V rows and its page chain as
a list of opaque page tokens shared by forks; a write into a partial last
page that another chain also holds gets a new token (copy-on-write). From it
follow the exact number of free pages, the reference counts and whether an
append must fail with PoolFullError. After every step the pool must agree:
content (bitwise), lengths, chains (a consistent token <-> page id mapping),
refcounts, free count, and its own C invariant check. Invalid calls (freed or
unknown ids, bad lengths, bad rows) must raise the documented error and
change nothing.
"""
import itertools

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, initialize,
                                 invariant, precondition, rule)

import cpuattn
from cpuattn import DTypeError, PageError, PagePool, PoolFullError, ShapeError
from conftest import BF16

H, D = 2, 3
_tokens = itertools.count()


def npdt(name):
    return BF16 if name == "bfloat16" else np.dtype(name)


class PoolMachine(RuleBasedStateMachine):
    seqs = Bundle("seqs")

    @initialize(num_pages=st.integers(1, 10), page_size=st.integers(1, 4),
                dtype=st.sampled_from(["float32", "float16", "bfloat16", "float64"]))
    def setup(self, num_pages, page_size, dtype):
        self.pool = PagePool(num_pages, page_size, H, D, dtype=dtype)
        self.dt = npdt(dtype)
        self.rows = {}     # seq -> (k, v) in the pool dtype
        self.chain = {}    # seq -> [token, ...]
        self.freed = []
        self.rng = np.random.default_rng(num_pages * 100 + page_size)

    # ---- model helpers ----
    def used_tokens(self):
        return {t for c in self.chain.values() for t in c}

    def model_free(self):
        return self.pool.num_pages - len(self.used_tokens())

    def shared(self, seq, token):
        return any(token in c for s, c in self.chain.items() if s != seq)

    def snapshot(self):
        p = self.pool
        return (p.num_free_pages, {s: (p.seq_len(s), p.pages(s).tolist()) for s in self.rows},
                p._refcounts().tolist())

    # ---- rules ----
    @rule(target=seqs)
    def create(self):
        s = self.pool.create_sequence()
        assert s not in self.rows and s not in self.freed
        self.rows[s] = (np.zeros((0, H, D), self.dt),) * 2
        self.chain[s] = []
        return s

    @precondition(lambda self: self.rows)
    @rule(seq=seqs, n=st.integers(0, 7), src=st.sampled_from(["float32", "float64", "float16"]))
    def append(self, seq, n, src):
        if seq not in self.rows:
            with pytest.raises(PageError):
                self.pool.append(seq, np.zeros((n, H, D)), np.zeros((n, H, D)))
            return
        ps = self.pool.page_size
        k = (self.rng.standard_normal((n, H, D)) * 3).astype(src)
        v = (self.rng.standard_normal((n, H, D)) * 3).astype(src)
        length = len(self.rows[seq][0])
        chain = self.chain[seq]
        cow = n > 0 and length % ps != 0 and self.shared(seq, chain[-1])
        need = -(-(length + n) // ps) - len(chain) + int(cow)
        before = self.snapshot()
        if need > self.model_free():
            with pytest.raises(PoolFullError):
                self.pool.append(seq, k, v)
            assert self.snapshot() == before, "a failed append changed the pool"
            return
        self.pool.append(seq, k, v)
        if cow:
            chain[-1] = next(_tokens)
        chain.extend(next(_tokens) for _ in range(-(-(length + n) // ps) - len(chain)))
        wk, wv = self.rows[seq]
        self.rows[seq] = (np.concatenate([wk, k.astype(self.dt)]),
                          np.concatenate([wv, v.astype(self.dt)]))

    @rule(target=seqs, seq=seqs)
    def fork(self, seq):
        if seq not in self.rows:
            with pytest.raises(PageError):
                self.pool.fork(seq)
            return seq  # bundles need a value; a freed id is useful too
        f = self.pool.fork(seq)
        assert f not in self.rows and f not in self.freed
        self.rows[f] = self.rows[seq]
        self.chain[f] = list(self.chain[seq])
        return f

    @rule(seq=seqs, frac=st.floats(0, 1), over=st.sampled_from([0, 0, 0, 1, -1]))
    def truncate(self, seq, frac, over):
        if seq not in self.rows:
            with pytest.raises(PageError):
                self.pool.truncate(seq, 0)
            return
        length = len(self.rows[seq][0])
        new = int(frac * length)
        if over:
            bad = length + 1 if over > 0 else -1
            before = self.snapshot()
            with pytest.raises(ShapeError):
                self.pool.truncate(seq, bad)
            assert self.snapshot() == before
            return
        self.pool.truncate(seq, new)
        self.rows[seq] = tuple(x[:new] for x in self.rows[seq])
        del self.chain[seq][-(-new // self.pool.page_size):]

    @rule(seq=consumes(seqs))
    def free(self, seq):
        if seq not in self.rows:
            with pytest.raises(PageError):
                self.pool.free_sequence(seq)
            return
        self.pool.free_sequence(seq)
        del self.rows[seq], self.chain[seq]
        self.freed.append(seq)

    @rule(bad=st.sampled_from(["id", "negative", "float", "bool", "shape", "dtype", "rows"]))
    def invalid(self, bad):
        before = self.snapshot()
        live = next(iter(self.rows), None)
        z = np.zeros((1, H, D), np.float32)
        if bad == "id":
            with pytest.raises(PageError):
                self.pool.seq_len(10**6)
        elif bad == "negative":
            with pytest.raises(PageError):
                self.pool.gather(-1)
        elif bad == "float":
            with pytest.raises(PageError):
                self.pool.pages(1.0)
        elif bad == "bool":
            with pytest.raises(PageError):
                self.pool.fork(True)
        elif live is not None and bad == "shape":
            with pytest.raises(ShapeError):
                self.pool.append(live, np.zeros((1, H, D + 1), np.float32), z)
        elif live is not None and bad == "dtype":
            with pytest.raises(DTypeError):
                self.pool.append(live, z.astype(np.int32), z)
        elif live is not None and bad == "rows":
            with pytest.raises(ShapeError):
                self.pool.append(live, z, np.zeros((2, H, D), np.float32))
        assert self.snapshot() == before

    @precondition(lambda self: any(len(r[0]) for r in self.rows.values()))
    @rule(data=st.data())
    def attention(self, data):
        live = [s for s, r in self.rows.items() if len(r[0])]
        seqs = data.draw(st.lists(st.sampled_from(live), min_size=1, max_size=3))
        qdt = np.float64 if self.dt == np.float64 else np.float32
        q = self.rng.standard_normal((len(seqs), 2 * H, D)).astype(qdt)
        before = self.snapshot()
        out = self.pool.attention(q, seqs)
        assert self.snapshot() == before, "attention left pins or changed the pool"
        for b, s in enumerate(seqs):
            k, v = (x.astype(np.float64) for x in self.rows[s])
            ref = cpuattn.reference_attention(q[b][None, None], k[None], v[None], causal=True)
            np.testing.assert_allclose(out[b], ref[0, 0], atol=1e-4 * (1 + np.abs(v).max()),
                                       rtol=1e-4)

    # ---- invariants ----
    @invariant()
    def agrees_with_model(self):
        if not hasattr(self, "pool"):
            return
        p = self.pool
        p._check_invariants()
        assert p.num_free_pages == self.model_free()
        tok2page = {}
        counts = np.zeros(p.num_pages, np.int64)
        for s, (wk, wv) in self.rows.items():
            assert p.seq_len(s) == len(wk)
            pages = p.pages(s).tolist()
            assert len(pages) == len(self.chain[s])
            for t, pg in zip(self.chain[s], pages):
                assert tok2page.setdefault(t, pg) == pg, "one model page, two pool pages"
                counts[pg] += 1
            k, v = p.gather(s)
            assert k.dtype == self.dt and k.shape == wk.shape
            assert np.array_equal(k.view(np.uint8), wk.view(np.uint8))
            assert np.array_equal(v.view(np.uint8), wv.view(np.uint8))
        assert len(set(tok2page.values())) == len(tok2page), "two model pages, one pool page"
        np.testing.assert_array_equal(p._refcounts(), counts)
        if self.rows:
            table, lens = p.block_table(list(self.rows))
            assert lens.tolist() == [len(r[0]) for r in self.rows.values()]
        for s in self.freed[-3:]:
            with pytest.raises(PageError):
                p.seq_len(s)

    def teardown(self):
        if hasattr(self, "pool"):
            for s in list(self.rows):
                self.pool.free_sequence(s)
            assert self.pool.num_free_pages == self.pool.num_pages
            assert not self.pool._refcounts().any()


PoolMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40)
TestPoolMachine = PoolMachine.TestCase
