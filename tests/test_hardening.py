"""Hardening: no leaks over 10,000 calls, fork safety of the worker pool, and a
multi-threaded stress run mixing pool operations with attention."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cpuattn
from cpuattn import CpuAttnError, PagePool, PoolFullError

psutil = pytest.importorskip("psutil")

# the directory holding the cpuattn package under test (built in place or
# installed): subprocesses must import the same one
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(cpuattn.__file__)))


# ---- leaks ----

def _one_round(rng_arrays):
    q, k, v, qp, cu, kp, vp, table, lens, dout = rng_arrays
    out, lse = cpuattn.attention(q, k, v, causal=True, return_lse=True)
    cpuattn.attention_backward(dout, q, k, v, out, lse, causal=True)
    cpuattn.attention_varlen(q[0], k[0], v[0], cu, cu, causal=True)
    o2, l2 = cpuattn.paged_attention(qp, kp, vp, table, lens, return_lse=True)
    cpuattn.paged_attention_backward(qp, qp, kp, vp, table, lens, o2, l2)
    cpuattn.gather_pages(kp, table, lens)
    pool = PagePool(8, 4, 2, 16)   # a fresh pool each round: storage, chains, free list
    a = pool.create_sequence()
    pool.append(a, k[0], v[0])
    b = pool.fork(a)
    pool.append(b, k[0, :3], v[0, :3])
    pool.attention(qp[:2], [a, b])
    pool.gather(b)
    pool.truncate(a, 1)
    try:  # error paths must not leak either
        pool.append(a, np.zeros((100, 2, 16), np.float32), np.zeros((100, 2, 16), np.float32))
    except PoolFullError:
        pass
    try:
        cpuattn.paged_attention(qp, kp, vp, table + 1000, lens)
    except CpuAttnError:
        pass
    pool.free_sequence(a)
    pool.free_sequence(b)


def test_rss_stays_flat_over_10000_calls():
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    q, k, v = f(1, 8, 4, 16), f(1, 8, 2, 16), f(1, 8, 2, 16)
    arrays = (q, k, v, f(3, 4, 16), np.array([0, 3, 8], np.int32), f(6, 4, 2, 16),
              f(6, 4, 2, 16), np.array([[0, 1], [2, 3], [4, 5]], np.int32),
              np.array([5, 8, 1], np.int32), q)
    proc = psutil.Process()
    for _ in range(500):          # warm up allocator pools and caches
        _one_round(arrays)
    # Under AddressSanitizer (tools/sanitize.sh) freed memory waits in a
    # quarantine of up to 256 MiB before reuse, so RSS would grow with it
    # however little leaks: fill it first with large freed blocks, which it
    # returns to the system as the rounds' frees push them out.
    for _ in range(320):
        np.ones(1 << 18, np.float32)
    before = proc.memory_info().rss
    for _ in range(10_000):
        _one_round(arrays)
    grown = proc.memory_info().rss - before
    print(f"RSS before {before / 2**20:.1f} MiB, growth over 10,000 rounds "
          f"{grown / 2**20:.2f} MiB")
    # one round allocates ~2 x 4 KiB of page storage plus per-call scratch and
    # outputs: leaking any of them would grow RSS by >= 40 MiB
    assert grown < 8 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 10,000 rounds"


# ---- fork safety ----

FORK_SCRIPT = textwrap.dedent("""
    import multiprocessing as mp, os, sys
    import numpy as np, cpuattn
    mode = sys.argv[1]
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1, 256, 4, 64)).astype(np.float32)
    k = rng.standard_normal((1, 256, 2, 64)).astype(np.float32)
    cpuattn.set_num_threads(2)

    def workers():
        return cpuattn.info()["thread_pool"]["workers"]

    def child_work(_=None):
        out = cpuattn.attention(q, k, k, causal=True)
        pool = cpuattn.PagePool(64, 16, 2, 64)
        s = pool.create_sequence()
        pool.append(s, k[0], k[0])
        o2 = pool.attention(q[0, -1:], [s])
        return out.tobytes(), o2.tobytes(), cpuattn.get_num_threads(), workers()

    if mode == "early":    # fork before any kernel ran
        pid = os.fork()
        if pid == 0:
            got = child_work()
            os._exit(0 if got[2] == 2 and got[3] == 1 else 5)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    want = child_work()        # starts the worker in the parent
    assert want[2] == 2 and want[3] == 1
    # the child starts with no workers and a fresh pool, re-created on its
    # first threaded call; a page pool locked by nobody, and one used from
    # this thread, both cross the fork
    if mode == "fork":
        pid = os.fork()
        if pid == 0:
            fresh = workers() == 0
            got = child_work()
            ok = fresh and got[:2] == want[:2] and got[2] == 2 and got[3] == 1
            os._exit(0 if ok else 3)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        assert code == 0, f"child exit {code}"
    elif mode == "mp":
        with mp.get_context("fork").Pool(2) as p:
            res = p.map(child_work, range(4))
        assert all(r[:2] == want[:2] and r[2] == 2 and r[3] == 1 for r in res), res
    assert cpuattn.get_num_threads() == 2 and workers() == 1
    assert cpuattn.attention(q, k, k, causal=True).tobytes() == want[0]
    print("ok")
""")


@pytest.mark.parametrize("mode", ["fork", "mp", "early"])
def test_fork_after_threaded_calls_does_not_hang(mode):
    if not hasattr(os, "fork"):
        pytest.skip("no os.fork on this platform")
    env = dict(os.environ, OMP_NUM_THREADS="2",
               PYTHONPATH=os.pathsep.join([PKG_PARENT,
                                           os.environ.get("PYTHONPATH", "")]))
    try:
        r = subprocess.run([sys.executable, "-c", FORK_SCRIPT, mode], env=env,
                           capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"fork test ({mode}) hung: a child waited for workers it does not have")
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_fork_while_another_thread_uses_the_pool():
    # the pool lock is taken across fork(), so the child's copy is never left
    # locked by a thread that does not exist there
    script = textwrap.dedent("""
        import os, threading, numpy as np, cpuattn
        pool = cpuattn.PagePool(64, 4, 1, 8)
        stop = threading.Event()
        def churn():
            x = np.ones((3, 1, 8), np.float32)
            while not stop.is_set():
                s = pool.create_sequence(); pool.append(s, x, x); f = pool.fork(s)
                pool.gather(s); pool.free_sequence(s); pool.free_sequence(f)
        ts = [threading.Thread(target=churn) for _ in range(2)]
        for t in ts: t.start()
        for _ in range(30):
            pid = os.fork()
            if pid == 0:
                s = pool.create_sequence()
                pool.append(s, np.ones((2, 1, 8), np.float32), np.ones((2, 1, 8), np.float32))
                pool._check_invariants()
                os._exit(0 if pool.seq_len(s) == 2 else 4)
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        stop.set()
        for t in ts: t.join()
        print("ok")
    """)
    if not hasattr(os, "fork"):
        pytest.skip("no os.fork on this platform")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PKG_PARENT,
                                                       os.environ.get("PYTHONPATH", "")]))
    try:
        r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                           text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("a forked child hung on a pool lock held by another thread at fork time")
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
