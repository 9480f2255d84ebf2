"""No SIGILL on older x86-64 CPUs: the extension imports and runs under
qemu-user emulating CPUs without AVX (Sandy Bridge: AVX but no FMA/AVX2) and
without AVX-512 (Haswell), picks the path that CPU has, and matches the
reference. The wheel is one build: every faster path sits behind CPUID and
XGETBV checks (csrc/platform.c). Needs qemu-x86_64 (Debian's qemu-user): skips
without it, or fails under CPUATTN_REQUIRE_CROSS=1 (as .ci/run sets)."""
import os
import platform
import shutil
import subprocess
import sys

import pytest

import cpuattn
from conftest import require_tools

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(cpuattn.__file__)))

SCRIPT = r"""
import sys
import numpy as np, cpuattn
want = sys.argv[1]
info = cpuattn.info()
assert info["simd"] == want, (info["simd"], info["simd_supported"])
rng = np.random.default_rng(0)
q = rng.standard_normal((1, 37, 4, 40)).astype(np.float32)
k = rng.standard_normal((1, 37, 2, 40)).astype(np.float32)
err = abs(cpuattn.attention(q, k, k, causal=True) - cpuattn.reference_attention(q, k, k, causal=True)).max()
assert err < 1e-5, err
kp = rng.standard_normal((6, 16, 2, 40)).astype(np.float16)
bt = np.arange(6, dtype=np.int32).reshape(2, 3)
lens = np.array([40, 17], np.int32)
q1 = rng.standard_normal((2, 4, 40)).astype(np.float32)
out = cpuattn.paged_attention(q1, kp, kp, bt, lens)
kd = cpuattn.gather_pages(kp, bt, lens).astype(np.float64)
for b in range(2):
    ref = cpuattn.reference_attention(q1[b][None, None], kd[b:b + 1, :lens[b]], kd[b:b + 1, :lens[b]])
    assert abs(out[b] - ref[0, 0]).max() < 1e-5
print("ok", info["simd"])
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 CPU models")
@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="the sanitizer run (tools/sanitize.sh) does not emulate other CPUs")
@pytest.mark.parametrize("cpu,path", [("SandyBridge", "scalar"), ("Haswell", "avx2")])
def test_runs_on_older_cpu(cpu, path):
    require_tools("qemu-x86_64")
    env = dict(os.environ, PYTHONPATH=PKG_PARENT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("CPUATTN_ISA", None)
    r = subprocess.run([shutil.which("qemu-x86_64"), "-cpu", cpu, sys.executable, "-c", SCRIPT, path], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith(f"ok {path}"), r.stdout + r.stderr
