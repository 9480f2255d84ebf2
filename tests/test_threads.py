"""Thread control, SIMD path reporting and build info."""
import threading

import numpy as np
import pytest

import cpuattn
from cpuattn import ShapeError, _threads


def test_info_reports_build_and_runtime():
    info = cpuattn.info()
    for key in ("version", "compiler", "openmp", "simd", "num_threads"):
        assert key in info
    assert info["simd"] in ("scalar", "avx2", "avx512", "avx512bf16", "neon")
    assert info["num_threads"] == cpuattn.get_num_threads()


def test_set_num_threads_caps_and_validates(threads):
    threads(1)
    assert cpuattn.get_num_threads() == 1
    for bad in (0, -2, 1.5, "2", True, None):
        with pytest.raises(ShapeError):
            cpuattn.set_num_threads(bad)
    assert cpuattn.get_num_threads() == 1


def test_default_cap_is_usable_cpus():
    assert _threads.usable_cpus() >= 1
    assert cpuattn.get_num_threads() <= _threads.usable_cpus()


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
    assert cpuattn.get_num_threads() >= 1
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
