"""Thread control, the worker pool, SIMD path reporting and build info."""
import json
import os
import platform
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import cpuattn
from cpuattn import ShapeError, _threads
from conftest import thread_cap

# The SIMD paths a build has, slowest first, by machine: aarch64 (and any
# other CPU) runs the baseline kernels only, which the compiler lowers to NEON.
# amx (tile products) is built on x86-64 Linux only: only Linux's request for
# the tile state is implemented.
PATHS = {"x86_64": ["scalar", "avx2", "avx512", "avx512bf16"]
         + (["amx"] if sys.platform.startswith("linux") else [])}


def _x86_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def expected_best_isa():
    """The path csrc/platform.c must pick on this machine (None: unknown),
    from the CPU flags Linux reports (it hides those the OS does not save)."""
    if platform.machine() != "x86_64":
        return "scalar"
    flags = _x86_flags()
    if flags is None:
        return None
    best = "scalar"
    if {"avx", "fma", "f16c", "avx2"} <= flags:
        best = "avx2"
        if {"avx512f", "avx512dq", "avx512bw", "avx512vl"} <= flags:
            best = "avx512"
            if "avx512_bf16" in flags and "avx512bf16" in _threads.isa_names():
                best = "avx512bf16"   # amx is opt-in (CPUATTN_ISA=amx), never the default
    return best


def test_info_reports_build_and_runtime():
    info = cpuattn.info()
    for key in ("version", "compiler", "openmp", "simd", "num_threads", "thread_pool"):
        assert key in info
    assert info["thread_pool"]["spin_us"] > 0
    assert info["num_threads"] == cpuattn.get_num_threads()
    names = _threads.isa_names()
    if platform.machine() == "x86_64":
        # avx512bf16 (and amx on it) need GCC >= 10 / Clang >= 9 to be built at all
        assert names in (PATHS["x86_64"], PATHS["x86_64"][:4], PATHS["x86_64"][:3])
    else:
        assert names == ["scalar"]
    best = expected_best_isa()
    if best is not None:
        assert _threads.best_isa() == best
        assert [p for p in _threads.supported_isas() if p != "amx"][-1] == best
    forced = os.environ.get("CPUATTN_ISA", "").strip().lower()
    want = forced if forced in _threads.supported_isas() else _threads.best_isa()
    assert info["simd"] == want


def test_set_num_threads_caps_and_validates(threads):
    threads(1)
    assert cpuattn.get_num_threads() == 1
    for bad in (0, -2, 1.5, "2", True, None):
        with pytest.raises(ShapeError):
            cpuattn.set_num_threads(bad)
    assert cpuattn.get_num_threads() == 1


def test_default_cap_is_usable_cpus():
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    limit = _threads._cgroup_cpu_limit()
    assert _threads.usable_cpus() == (n if limit is None else min(n, limit))
    # the cap of a fresh process, read with OpenMP's own limit raised
    import subprocess
    import sys
    code = ("import threadpoolctl, cpuattn\n"
            "with threadpoolctl.threadpool_limits(limits=1 << 30, user_api='openmp'):\n"
            "    print(cpuattn.get_num_threads(), cpuattn.info()['usable_cpus'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cap, usable = map(int, r.stdout.split())
    assert cap == (usable if cpuattn.info()["openmp"] else no_openmp_limit(usable))


def no_openmp_limit(cap):
    """get_num_threads() of a build without OpenMP under cap: the kernels are
    threaded all the same (the worker pool), limited by OMP_NUM_THREADS's
    first entry alone (threadpoolctl has no runtime to limit)."""
    first = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return min(cap, int(first)) if first.isdigit() and int(first) >= 1 else cap


def test_thread_count_is_min_of_cap_and_openmp_limit(threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not cpuattn.info()["openmp"]:
        pytest.skip("built without OpenMP: no runtime for threadpoolctl")
    for cap, omp in ((3, 5), (5, 3), (4, 4), (1, 7), (7, 1)):
        threads(cap)
        with threadpoolctl.threadpool_limits(omp, user_api="openmp"):
            assert cpuattn.get_num_threads() == min(cap, omp)
        assert thread_cap() == cap


def test_threads_fixture_restores_the_previous_cap():
    old = thread_cap()
    try:
        cpuattn.set_num_threads(3)
        gen = _threads_fixture()
        set_threads = next(gen)
        set_threads(1)
        assert cpuattn.get_num_threads() == 1
        next(gen, None)
        assert thread_cap() == 3
    finally:
        cpuattn.set_num_threads(old)


def _threads_fixture():
    import conftest
    return conftest.threads.__wrapped__()


def test_threadpoolctl_limits_the_kernels(threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not cpuattn.info()["openmp"]:
        pytest.skip("built without OpenMP: no runtime for threadpoolctl")
    threads(64)
    apis = {p["user_api"] for p in threadpoolctl.threadpool_info()}
    assert "openmp" in apis
    with threadpoolctl.threadpool_limits(1, user_api="openmp"):
        assert cpuattn.get_num_threads() == 1


def test_cap_holds_in_other_python_threads(threads):
    threads(1)
    seen = []
    t = threading.Thread(target=lambda: seen.append(cpuattn.get_num_threads()))
    t.start()
    t.join()
    assert seen == [1]


def test_forcing_a_simd_path():
    names = _threads.supported_isas()
    assert names[0] == "scalar"
    old = _threads.get_isa()
    try:
        for name in names:
            _threads.set_isa(name)
            assert cpuattn.info()["simd"] == name
        with pytest.raises(ShapeError):
            _threads.set_isa("sse9")
    finally:
        _threads.set_isa(old)


def test_isa_env_var_in_subprocess():
    import subprocess
    import sys
    code = "import cpuattn; print(cpuattn.info()['simd'])"
    r = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ,
                       "CPUATTN_ISA": "scalar"}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "scalar"


def test_set_num_threads_takes_any_int(threads):
    """A cap above any core count (or a numpy int) is accepted and means no cap."""
    threads(2**70)
    threadpoolctl = pytest.importorskip("threadpoolctl")
    with threadpoolctl.threadpool_limits(1000, user_api="openmp"):
        assert cpuattn.get_num_threads() == (1000 if cpuattn.info()["openmp"]
                                             else no_openmp_limit(1 << 30))
    threads(np.int64(1))
    assert cpuattn.get_num_threads() == 1


# ---- the worker pool (csrc/workers.c) ----

POOL_SCRIPT = textwrap.dedent("""
    import json, sys
    if sys.argv[1] == "torch":
        import torch
    import numpy as np, cpuattn
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 200, 4, 64)).astype(np.float32)
    k = rng.standard_normal((2, 200, 2, 64)).astype(np.float32)
    v = rng.standard_normal((2, 200, 2, 64)).astype(np.float32)
    ref = cpuattn.reference_attention(q, k, v, causal=True)
    outs, used = {}, []
    for n in (1, 2, 3, 8):
        cpuattn.set_num_threads(n)
        used.append(cpuattn.get_num_threads())
        outs[n] = cpuattn.attention(q, k, v, causal=True)
    assert all(np.array_equal(outs[1], o) for o in outs.values())
    assert np.allclose(outs[1], ref, atol=1e-5)
    pool = cpuattn.info()["thread_pool"]
    assert pool["kind"] == "cpuattn workers" and pool["workers"] == max(used) - 1, pool
    print(json.dumps(used))
""")


def _threads_used_in_subprocess(first):
    """Thread counts a subprocess used for caps 1, 2, 3, 8 (after checking
    that their results are bitwise equal and the pool grew to match)."""
    env = dict(os.environ, OMP_NUM_THREADS="8")   # more threads than cores on purpose
    r = subprocess.run([sys.executable, "-c", POOL_SCRIPT, first], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_results_are_bitwise_equal_for_1_2_3_8_threads():
    assert _threads_used_in_subprocess("numpy") == [1, 2, 3, 8]


def test_pool_is_used_when_torch_is_imported_first():
    """Issue 12: the kernels' threads do not depend on whose OpenMP runtime
    was loaded first; torch's libgomp serves only the thread limit (torch
    sets that limit itself when it loads)."""
    pytest.importorskip("torch")
    if not cpuattn.info()["openmp"] or _threads.usable_cpus() < 2:
        pytest.skip("built without OpenMP or one CPU: torch limits OpenMP to 1 thread")
    assert max(_threads_used_in_subprocess("torch")) >= 2


def _decode_inputs(rng, batch=2, ctx=300):
    """A paged decode call big enough to run on several threads."""
    k = rng.standard_normal((batch * 20, 16, 2, 64)).astype(np.float32)
    v = rng.standard_normal((batch * 20, 16, 2, 64)).astype(np.float32)
    q = rng.standard_normal((batch, 8, 64)).astype(np.float32)
    table = rng.permutation(batch * 20).astype(np.int32).reshape(batch, 20)
    lens = np.full(batch, ctx, dtype=np.int32)
    return q, k, v, table, lens


def test_many_small_calls_in_a_loop(threads, rng):
    threads(2)
    args = _decode_inputs(rng)
    want = cpuattn.paged_attention(*args)
    for _ in range(2000):
        assert np.array_equal(cpuattn.paged_attention(*args), want)
    if cpuattn.get_num_threads() == 2:
        assert cpuattn.info()["thread_pool"]["workers"] >= 1


def test_concurrent_calls_from_python_threads(threads, rng):
    """One job at a time on the pool: a caller that finds it busy runs its
    items on its own thread, with bitwise the same result."""
    threads(2)
    inputs = [_decode_inputs(np.random.default_rng(i), batch=1 + i) for i in range(4)]
    wants = [cpuattn.paged_attention(*a) for a in inputs]
    wrong = []

    def hammer(i):
        for _ in range(300):
            if not np.array_equal(cpuattn.paged_attention(*inputs[i]), wants[i]):
                wrong.append(i)

    ts = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in ts), "a kernel call hung"
    assert wrong == []


def _fresh_info(isa):
    code = ("import json, warnings\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    import cpuattn\n"
            "print(json.dumps([cpuattn.info()['simd'], [str(x.message) for x in w "
            "if x.category is RuntimeWarning]]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "CPUATTN_ISA": isa})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_amx_only_where_the_cpu_and_os_grant_it():
    """amx is listed exactly when the CPU reports AMX-TILE and AMX-BF16 with
    their OS state (Linux lists the flags only then) and AVX512_BF16; it is
    never the default (opt-in until it has run on AMX hardware), forcing it
    there selects it, and forcing it elsewhere warns and runs the best path."""
    flags = _x86_flags() or set()
    has_amx = platform.machine() == "x86_64" and "amx" in _threads.isa_names() and \
        {"amx_tile", "amx_bf16", "avx512_bf16"} <= flags
    assert ("amx" in _threads.supported_isas()) == has_amx
    assert _threads.best_isa() != "amx"
    simd, warned = _fresh_info("amx")
    if has_amx:
        assert simd == "amx" and not warned
    else:
        assert simd == _threads.best_isa() != "amx"
        assert warned and "CPUATTN_ISA='amx' is not supported" in warned[0]
        with pytest.raises(ShapeError, match="isa"):
            _threads.set_isa("amx")
