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

The runner's calls join in: ``reserve`` grows a sequence by rows the model
marks unknown until ``write`` stores them (into the physical slots, so every
chain and plan holding that page sees them); ``plan`` snapshots sequences
and holds their pages (counted as references, and as sharing for
copy-on-write) until ``close``; ``run`` of an open plan must equal the
oracle over its snapshot.
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
        self.known = {}    # seq -> bool per row: False for reserved, unwritten rows
        self.reserved = {}  # seq -> [(token, offset)] of its last reserve
        self.plans = []    # open plans: (plan, [(chain copy, rows copy, known copy)])
        self.freed = []
        self.rng = np.random.default_rng(num_pages * 100 + page_size)

    # ---- model helpers ----
    def used_tokens(self):
        held = {t for _, snap in self.plans for c, _, _ in snap for t in c}
        return {t for c in self.chain.values() for t in c} | held

    def model_free(self):
        return self.pool.num_pages - len(self.used_tokens())

    def shared(self, seq, token):
        return (any(token in c for s, c in self.chain.items() if s != seq)
                or any(token in c for _, snap in self.plans for c, _, _ in snap))

    def tok2page(self):
        return {t: pg for s, c in self.chain.items() for t, pg in zip(c, self.pool.pages(s))}

    def grow(self, seq, n, cow):
        """The model of append / reserve's pages: copy-on-write, new tokens."""
        chain, ps = self.chain[seq], self.pool.page_size
        if cow:
            chain[-1] = next(_tokens)
        chain.extend(next(_tokens) for _ in range(-(-(len(self.rows[seq][0]) + n) // ps)
                                                  - len(chain)))

    def need(self, seq, n):
        ps, chain, length = self.pool.page_size, self.chain[seq], len(self.rows[seq][0])
        cow = n > 0 and length % ps != 0 and self.shared(seq, chain[-1])
        return -(-(length + n) // ps) - len(chain) + int(cow), cow

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
        self.known[s] = np.zeros(0, bool)
        return s

    @precondition(lambda self: self.rows)
    @rule(seq=seqs, n=st.integers(0, 7), src=st.sampled_from(["float32", "float64", "float16"]))
    def append(self, seq, n, src):
        if seq not in self.rows:
            with pytest.raises(PageError):
                self.pool.append(seq, np.zeros((n, H, D)), np.zeros((n, H, D)))
            return
        k = (self.rng.standard_normal((n, H, D)) * 3).astype(src)
        v = (self.rng.standard_normal((n, H, D)) * 3).astype(src)
        need, cow = self.need(seq, n)
        before = self.snapshot()
        if need > self.model_free():
            with pytest.raises(PoolFullError):
                self.pool.append(seq, k, v)
            assert self.snapshot() == before, "a failed append changed the pool"
            return
        self.pool.append(seq, k, v)
        self.grow(seq, n, cow)
        wk, wv = self.rows[seq]
        self.rows[seq] = (np.concatenate([wk, k.astype(self.dt)]),
                          np.concatenate([wv, v.astype(self.dt)]))
        self.known[seq] = np.concatenate([self.known[seq], np.ones(n, bool)])

    @precondition(lambda self: self.rows)
    @rule(seq=seqs, n=st.integers(0, 5))
    def reserve(self, seq, n):
        if seq not in self.rows:
            with pytest.raises(PageError):
                self.pool.reserve(seq, n)
            return
        need, cow = self.need(seq, n)
        before = self.snapshot()
        if need > self.model_free():
            with pytest.raises(PoolFullError):
                self.pool.reserve(seq, n)
            assert self.snapshot() == before, "a failed reserve changed the pool"
            return
        length, ps = len(self.rows[seq][0]), self.pool.page_size
        slots = self.pool.reserve(seq, n)
        self.grow(seq, n, cow)
        pos = np.arange(length, length + n)
        pages = self.pool.pages(seq)
        np.testing.assert_array_equal(slots, pages[pos // ps] * ps + pos % ps)
        self.reserved[seq] = [(self.chain[seq][p // ps], p % ps) for p in pos]
        self.rows[seq] = tuple(np.concatenate([x, np.zeros((n, H, D), self.dt)])
                               for x in self.rows[seq])
        self.known[seq] = np.concatenate([self.known[seq], np.zeros(n, bool)])

    @precondition(lambda self: self.reserved)
    @rule(data=st.data(), src=st.sampled_from(["float32", "float64"]))
    def write(self, data, src):
        seq = data.draw(st.sampled_from(sorted(self.reserved)))
        t2p = self.tok2page()
        # slots whose page a chain still holds (a page held only by a plan, or
        # freed, may have been reused: the caller's business, not modelled)
        todo = [(t, o) for t, o in self.reserved[seq] if t in t2p]
        if not todo:
            return
        ps = self.pool.page_size
        slots = np.array([t2p[t] * ps + o for t, o in todo], np.int64)
        k = (self.rng.standard_normal((len(todo), H, D)) * 3).astype(src)
        v = (self.rng.standard_normal((len(todo), H, D)) * 3).astype(src)
        self.pool.write(0, slots, k, v)
        views = [(self.chain[s], self.rows[s], self.known[s]) for s in self.rows]
        views += [x for _, snap in self.plans for x in snap]
        for i, (t, o) in enumerate(todo):
            for chain, (rk, rv), known in views:
                for j in (j for j, c in enumerate(chain) if c == t):
                    if j * ps + o < len(rk):
                        rk[j * ps + o], rv[j * ps + o] = k[i], v[i]
                        known[j * ps + o] = True

    @precondition(lambda self: self.rows and len(self.plans) < 3)
    @rule(data=st.data())
    def plan(self, data):
        seqs = data.draw(st.lists(st.sampled_from(sorted(self.rows)), min_size=1, max_size=3))
        p = self.pool.plan(seqs)
        self.plans.append((p, [(list(self.chain[s]), tuple(x.copy() for x in self.rows[s]),
                                self.known[s].copy()) for s in seqs]))

    @precondition(lambda self: self.plans)
    @rule(data=st.data())
    def run(self, data):
        p, snap = data.draw(st.sampled_from(self.plans))
        qdt = np.float64 if self.dt == np.float64 else np.float32
        q = self.rng.standard_normal((len(snap), 2 * H, D)).astype(qdt)
        out = p.run(q)
        for b, (_, (rk, rv), known) in enumerate(snap):
            if not len(rk):
                assert not out[b].any()
            elif known.all():
                k, v = rk.astype(np.float64), rv.astype(np.float64)
                ref = cpuattn.reference_attention(q[b][None, None], k[None], v[None], causal=True)
                np.testing.assert_allclose(out[b], ref[0, 0], atol=1e-4 * (1 + np.abs(v).max()),
                                           rtol=1e-4)

    @precondition(lambda self: self.plans)
    @rule(data=st.data())
    def close(self, data):
        i = data.draw(st.integers(0, len(self.plans) - 1))
        p, _ = self.plans.pop(i)
        p.close()
        p.close()

    @rule(target=seqs, seq=seqs)
    def fork(self, seq):
        if seq not in self.rows:
            with pytest.raises(PageError):
                self.pool.fork(seq)
            return seq  # bundles need a value; a freed id is useful too
        f = self.pool.fork(seq)
        assert f not in self.rows and f not in self.freed
        self.rows[f] = tuple(x.copy() for x in self.rows[seq])
        self.chain[f] = list(self.chain[seq])
        self.known[f] = self.known[seq].copy()
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
        self.rows[seq] = tuple(x[:new].copy() for x in self.rows[seq])
        self.known[seq] = self.known[seq][:new].copy()
        del self.chain[seq][-(-new // self.pool.page_size):]

    @rule(seq=consumes(seqs))
    def free(self, seq):
        if seq not in self.rows:
            with pytest.raises(PageError):
                self.pool.free_sequence(seq)
            return
        self.pool.free_sequence(seq)
        del self.rows[seq], self.chain[seq], self.known[seq]
        self.reserved.pop(seq, None)
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
            if not self.known[s].all():
                continue
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
        t2p = self.tok2page()
        for _, snap in self.plans:
            for chain, _, _ in snap:
                for t in chain:
                    if t in t2p:
                        counts[t2p[t]] += 1
        held_only = sum(1 for t in self.used_tokens() if t not in t2p)
        for s, (wk, wv) in self.rows.items():
            assert p.seq_len(s) == len(wk)
            pages = p.pages(s).tolist()
            assert len(pages) == len(self.chain[s])
            for t, pg in zip(self.chain[s], pages):
                assert tok2page.setdefault(t, pg) == pg, "one model page, two pool pages"
                counts[pg] += 1
            k, v = p.gather(s)
            kn = self.known[s]
            assert k.dtype == self.dt and k.shape == wk.shape
            assert np.array_equal(k[kn].view(np.uint8), wk[kn].view(np.uint8))
            assert np.array_equal(v[kn].view(np.uint8), wv[kn].view(np.uint8))
        assert len(set(tok2page.values())) == len(tok2page), "two model pages, one pool page"
        refs = p._refcounts()
        held = refs > counts      # pages only plans hold: their count is the plans' refs
        assert held.sum() == held_only
        np.testing.assert_array_equal(refs[~held], counts[~held])
        if self.rows:
            table, lens = p.block_table(list(self.rows))
            assert lens.tolist() == [len(r[0]) for r in self.rows.values()]
        for s in self.freed[-3:]:
            with pytest.raises(PageError):
                p.seq_len(s)

    def teardown(self):
        if hasattr(self, "pool"):
            for plan, _ in self.plans:
                plan.close()
            for s in list(self.rows):
                self.pool.free_sequence(s)
            assert self.pool.num_free_pages == self.pool.num_pages
            assert not self.pool._refcounts().any()


PoolMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40)
TestPoolMachine = PoolMachine.TestCase
