"""The command line: ``python -m cpuattn info`` and ``python -m cpuattn bench``.

Runs the CLI in a subprocess against the cpuattn this test imported (built
in place or installed). No timing assertions: timings belong in ``bench/``.
"""
import json
import os
import subprocess
import sys

import cpuattn

# the directory holding the cpuattn package under test
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(cpuattn.__file__)))


def run_cli(*args, timeout=120):
    env = dict(os.environ)
    env["PYTHONPATH"] = PKG_PARENT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "cpuattn", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_info_prints_simd_path():
    r = run_cli("info")
    assert r.returncode == 0, r.stderr
    assert cpuattn.info()["simd"] in r.stdout
    assert "OpenMP" in r.stdout and "threads" in r.stdout


def test_info_json():
    r = run_cli("info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["simd"] == cpuattn.info()["simd"]
    assert "openmp_runtimes" in info


def test_bench_list_and_unknown_case():
    r = run_cli("bench", "--list")
    assert r.returncode == 0, r.stderr
    assert "decode_tiny_ctx16_fp32" in r.stdout
    r = run_cli("bench", "--cases", "no_such_case")
    assert r.returncode == 2
    assert "unknown case" in r.stderr


def test_bench_quick_json(tmp_path):
    path = tmp_path / "out.json"
    r = run_cli("bench", "--quick", "--cases", "decode_tiny_ctx16_fp32", "--json", str(path))
    assert r.returncode == 0, r.stderr
    assert "decode_tiny_ctx16_fp32" in r.stdout          # the table
    assert "[1/1] decode_tiny_ctx16_fp32" in r.stderr    # progress
    result = json.loads(path.read_text())
    assert {"schema", "machine", "settings", "runs"} <= set(result)
    m = result["machine"]
    assert m["cpuattn"]["simd"] == cpuattn.info()["simd"]
    assert {"cpu_model", "torch", "numpy", "logical_cpus"} <= set(m)
    (run,) = result["runs"]
    # the default run uses the thread count of a fresh process (`cpuattn info`)
    info = json.loads(run_cli("info", "--json").stdout)
    assert run["threads"] == run["threads_effective"] == info["num_threads"]
    assert run["roofline"]["read_bandwidth"]["median_gbps"] > 0
    assert run["roofline"]["gemm"]["median_gflops"] > 0
    (case,) = run["results"]
    assert case["case"] == "decode_tiny_ctx16_fp32"
    assert set(case["impls"]) == {"cpuattn", "torch_sdpa", "torch_paged", "reference"}
    statuses = {"ok", "unsupported", "unavailable", "skipped", "n/a"}
    for name, entry in case["impls"].items():
        assert entry["status"] in statuses, (name, entry)
        if entry["status"] == "ok":
            assert entry["median_s"] > 0 and len(entry["times_s"]) == entry["reps"]
    assert case["impls"]["cpuattn"]["status"] == "ok"
    assert case["pct_bandwidth_roofline"] > 0


def test_bench_isa_forces_the_path_for_the_run(tmp_path):
    path = tmp_path / "out.json"
    r = run_cli("bench", "--quick", "--isa", "scalar", "--cases", "decode_call_h1_d16",
                "--json", str(path))
    assert r.returncode == 0, r.stderr
    assert "simd=scalar" in r.stdout
    result = json.loads(path.read_text())
    assert result["machine"]["cpuattn"]["simd"] == "scalar"
    assert result["runs"][0]["results"][0]["impls"]["cpuattn"]["status"] == "ok"
    r = run_cli("bench", "--isa", "no_such_isa", "--cases", "decode_call_h1_d16")
    assert r.returncode == 2
    assert "--isa" in r.stderr and "no_such_isa" in r.stderr
