"""The C engine without Python: the forward kernels on every SIMD path of
this CPU against a float64 reference, with NaN-filled scratch
(tests/native/attn_check.c), and the OS-facing code, worker pool and page
pool (tests/native/os_check.c); both also cross-compiled for aarch64 under
qemu-user (tools/check_aarch64.sh) and for Windows with mingw-w64 under wine
(tools/check_windows.sh). Without a cross toolchain those tests skip, or
fail under CPUATTN_REQUIRE_CROSS=1 (.ci/run installs them and sets that)."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import require_tools

from cpuattn import _threads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "src", "cpuattn", "csrc")


def _report(r):
    return r.stdout[-4000:] + r.stderr[-2000:]


def _check_passed(r, checks):
    """A native check's run: exit status 0 and, for each of `checks` checks
    run, its closing 'N of M ... failed' line with N = 0."""
    assert r.returncode == 0, _report(r)
    assert r.stdout.count("\n0 of ") == checks and "FAIL" not in r.stdout, _report(r)


def _build_and_run(tmp_path, name, csources, *flags, envs=({},)):
    """Build tests/native/NAME.c with the sources and run it once per env."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    exe = str(tmp_path / name)
    build = subprocess.run(
        [cc, "-O2", "-std=gnu11", "-fno-strict-aliasing", "-Wall", "-Wno-unused-function",
         "-Wno-unknown-pragmas", *flags, "-I" + CSRC,
         os.path.join(ROOT, "tests", "native", name + ".c"),
         *[os.path.join(CSRC, c) for c in csources], "-lm", "-o", exe],
        capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    for env in envs:
        r = subprocess.run([exe], capture_output=True, text=True, timeout=300,
                           env={**os.environ, **env})
        _check_passed(r, 1)
    return r


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX C toolchain")
@pytest.mark.parametrize("emulate_amx", [False, True], ids=["native", "amx-emulated"])
def test_native_engine_every_simd_path(tmp_path, emulate_amx):
    """With emulate_amx the amx path runs its tile products as C
    (CPA_AMX_EMULATE), so its layouts are checked on any AVX512_BF16 CPU;
    CI has no AMX."""
    r = _build_and_run(tmp_path, "attn_check", ["forward.c", "platform.c", "quant.c"], "-pthread",
                       *(["-DCPA_AMX_EMULATE"] if emulate_amx else []))
    if emulate_amx and "avx512bf16" in _threads.supported_isas():
        assert " amx " in r.stdout, _report(r)   # the emulated path ran


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX C toolchain")
def test_native_worker_pool_and_page_pool(tmp_path):
    # built without -fopenmp: the thread limit comes from OMP_NUM_THREADS alone
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    _build_and_run(tmp_path, "os_check", ["workers.c", "pool.c", "platform.c"], "-pthread",
                   envs=({"OMP_NUM_THREADS": "3,2"}, {"OMP_NUM_THREADS": "junk"}))
    r = subprocess.run([str(tmp_path / "os_check")], capture_output=True, text=True, timeout=300,
                       env=env)
    _check_passed(r, 1)
    assert "thread limit without OpenMP: 2147483647" in r.stdout, _report(r)


def test_aarch64_under_qemu():
    require_tools("aarch64-linux-gnu-gcc", "qemu-aarch64")
    r = subprocess.run(["sh", os.path.join(ROOT, "tools", "check_aarch64.sh")],
                       capture_output=True, text=True, timeout=600)
    _check_passed(r, 2)


def test_windows_under_wine():
    """mingw-w64 (the Windows wheels' toolchain) and wine: winpthreads under
    the worker pool, the SRW lock of the page pool, CPUID/XGETBV dispatch."""
    wine = shutil.which("wine64") or shutil.which("wine") or "/usr/lib/wine/wine64"
    require_tools("x86_64-w64-mingw32-gcc-posix", wine,
                  packages="--no-install-recommends gcc-mingw-w64-x86-64 wine64")
    # not under tools/sanitize.sh's LD_PRELOAD: wine cannot start with libasan
    # loaded, and the .exe it runs is not the instrumented build anyway
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    r = subprocess.run(["sh", os.path.join(ROOT, "tools", "check_windows.sh")],
                       capture_output=True, text=True, timeout=900, env={**env, "WINE": wine})
    _check_passed(r, 2)


def test_missing_cross_tools_fail_when_required(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CPUATTN_REQUIRE_CROSS", "1")
    with pytest.raises(pytest.fail.Exception, match="qemu-aarch64"):
        require_tools("qemu-aarch64")
    monkeypatch.delenv("CPUATTN_REQUIRE_CROSS")
    with pytest.raises(pytest.skip.Exception):
        require_tools("qemu-aarch64")
