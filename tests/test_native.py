"""The C forward engine without Python (tests/native/attn_check.c): every
SIMD path of this CPU against a float64 reference, with NaN-filled scratch;
and the same check cross-compiled for aarch64 under qemu-user
(tools/check_aarch64.sh). Without the cross toolchain that test skips, or
fails under CPUATTN_REQUIRE_CROSS=1 (.ci/run installs it and sets that)."""
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


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX C toolchain")
@pytest.mark.parametrize("emulate_amx", [False, True], ids=["native", "amx-emulated"])
def test_native_engine_every_simd_path(tmp_path, emulate_amx):
    """With emulate_amx the amx path runs its tile products as C
    (CPA_AMX_EMULATE), so its layouts are checked on any AVX512_BF16 CPU;
    CI has no AMX."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    exe = str(tmp_path / "attn_check")
    build = subprocess.run(
        [cc, "-O2", "-std=gnu11", "-fno-strict-aliasing", "-Wall", "-Wno-unused-function",
         "-Wno-unknown-pragmas", "-pthread", "-I" + CSRC]
        + (["-DCPA_AMX_EMULATE"] if emulate_amx else [])
        + [os.path.join(ROOT, "tests", "native", "attn_check.c"),
           os.path.join(CSRC, "forward.c"), os.path.join(CSRC, "platform.c"),
           os.path.join(CSRC, "quant.c"), "-lm", "-o", exe],
        capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    r = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, _report(r)
    assert "\n0 of " in r.stdout and "FAIL" not in r.stdout, _report(r)
    if emulate_amx and "avx512bf16" in _threads.supported_isas():
        assert " amx " in r.stdout, _report(r)   # the emulated path ran


def test_aarch64_under_qemu():
    require_tools("aarch64-linux-gnu-gcc", "qemu-aarch64")
    r = subprocess.run(["sh", os.path.join(ROOT, "tools", "check_aarch64.sh")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, _report(r)
    assert "\n0 of " in r.stdout and "FAIL" not in r.stdout, _report(r)


def test_missing_cross_tools_fail_when_required(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("CPUATTN_REQUIRE_CROSS", "1")
    with pytest.raises(pytest.fail.Exception, match="qemu-aarch64"):
        require_tools("qemu-aarch64")
    monkeypatch.delenv("CPUATTN_REQUIRE_CROSS")
    with pytest.raises(pytest.skip.Exception):
        require_tools("qemu-aarch64")
