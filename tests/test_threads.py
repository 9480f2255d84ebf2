"""Thread control, SIMD path reporting and build info."""
import os
import platform
import threading

import numpy as np
import pytest

import cpuattn
from cpuattn import ShapeError, _threads
from conftest import thread_cap

# The SIMD paths a build has, slowest first, by machine: aarch64 (and any
# other CPU) runs the baseline kernels only, which the compiler lowers to NEON.
PATHS = {"x86_64": ["scalar", "avx2", "avx512", "avx512bf16"]}


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
                best = "avx512bf16"
    return best


def test_info_reports_build_and_runtime():
    info = cpuattn.info()
    for key in ("version", "compiler", "openmp", "simd", "num_threads"):
        assert key in info
    assert info["num_threads"] == cpuattn.get_num_threads()
    names = _threads.isa_names()
    if platform.machine() == "x86_64":
        # avx512bf16 needs GCC >= 10 / Clang >= 9 to be built at all
        assert names in (PATHS["x86_64"], PATHS["x86_64"][:-1])
    else:
        assert names == ["scalar"]
    best = expected_best_isa()
    if best is not None:
        assert _threads.best_isa() == best
        assert _threads.supported_isas()[-1] == best
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
    assert cap == (usable if cpuattn.info()["openmp"] else 1)


def test_thread_count_is_min_of_cap_and_openmp_limit(threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not cpuattn.info()["openmp"]:
        pytest.skip("serial build")
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
        assert thread_cap() == (3 if cpuattn.info()["openmp"] else 1)
    finally:
        cpuattn.set_num_threads(old)


def _threads_fixture():
    import conftest
    return conftest.threads.__wrapped__()


def test_threadpoolctl_limits_the_kernels(threads):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not cpuattn.info()["openmp"]:
        pytest.skip("serial build")
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
        assert cpuattn.get_num_threads() == (1000 if cpuattn.info()["openmp"] else 1)
    threads(np.int64(1))
    assert cpuattn.get_num_threads() == 1


def _info_in_subprocess(code, **env):
    import json
    import os
    import subprocess
    import sys
    full = {k: v for k, v in os.environ.items()
            if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "CPUATTN_SPINCOUNT")}
    full.update(env)
    r = subprocess.run([sys.executable, "-c", code + "\nimport json, os, cpuattn\n"
                        "print(json.dumps([cpuattn.info()['omp_spin'], "
                        "os.environ.get('GOMP_SPINCOUNT')]))"],
                       env=full, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_bounded_spin_is_set_for_our_libgomp_only():
    """Issue 12: libgomp gets GOMP_SPINCOUNT while cpuattn loads it, and the
    variable is gone from os.environ afterwards (children, torch unaffected)."""
    if not cpuattn.info()["openmp"]:
        pytest.skip("serial build")
    spin, leaked = _info_in_subprocess("")
    if spin["reason"].startswith("libgomp.so.1 was already loaded"):
        pytest.skip("libgomp preloaded in this environment")
    assert spin["applied"] and spin["spincount"] == _ompenv_default()
    assert leaked is None


def _ompenv_default():
    from cpuattn import _ompenv
    return _ompenv.DEFAULT_SPINCOUNT


def test_user_wait_policy_wins_and_is_kept():
    spin, kept = _info_in_subprocess("", GOMP_SPINCOUNT="777")
    assert not spin["applied"] and "GOMP_SPINCOUNT" in spin["reason"]
    assert kept == "777"
    spin, _ = _info_in_subprocess("", OMP_WAIT_POLICY="active")
    assert not spin["applied"]
    spin, _ = _info_in_subprocess("", CPUATTN_SPINCOUNT="off")
    assert not spin["applied"]


def test_spin_not_applied_when_libgomp_already_loaded():
    """A libgomp someone else loaded (and initialised) first is left alone."""
    import ctypes.util
    if not cpuattn.info()["openmp"] or ctypes.util.find_library("gomp") is None:
        pytest.skip("no system libgomp")
    spin, leaked = _info_in_subprocess("import ctypes; ctypes.CDLL('libgomp.so.1')")
    assert not spin["applied"] and "already loaded" in spin["reason"]
    assert leaked is None


def test_spin_count_knob():
    if not cpuattn.info()["openmp"]:
        pytest.skip("serial build")
    spin, leaked = _info_in_subprocess("", CPUATTN_SPINCOUNT="2500")
    if spin["reason"].startswith("libgomp.so.1 was already loaded"):
        pytest.skip("libgomp preloaded in this environment")
    assert spin["applied"] and spin["spincount"] == 2500 and leaked is None
