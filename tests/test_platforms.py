"""What a build reports about its toolchain (cpuattn.info(), `python -m
cpuattn info`), and how setup.py asks a compiler for OpenMP: -fopenmp for
GCC and LLVM clang, the preprocessor's flag and -lomp for Apple clang (here
through stub compilers that accept only one form), none without OpenMP."""
import ast
import os
import stat
import sys

import pytest

import cpuattn
from cpuattn.__main__ import format_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_info_names_the_compiler_and_the_openmp_runtime():
    info = cpuattn.info()
    assert info["compiler"].startswith(("gcc ", "clang ", "mingw-w64 gcc ")), info["compiler"]
    assert any(ch.isdigit() for ch in info["compiler"])   # a version, not just a name
    if info["openmp"]:
        assert info["openmp_version"] >= 200805   # _OPENMP: 3.0 or later
        lib = info["openmp_library"]
        assert lib and os.path.isfile(lib), lib
        # libgomp, LLVM libomp or Intel libiomp5; a static link names the module itself
        assert "omp" in os.path.basename(lib) or "cpuattn" in lib, lib
    else:
        assert info["openmp_version"] == 0 and info["openmp_library"] is None


def test_info_text_shows_compiler_and_runtime():
    info = cpuattn.info()
    text = format_info(info, [])
    assert info["compiler"] in text
    assert ("OpenMP library:  " + (info["openmp_library"] or "-")) in text
    off = format_info({**info, "openmp": False, "openmp_version": 0, "openmp_library": None}, None)
    assert "off (thread limit from OMP_NUM_THREADS only)" in off and "threadpoolctl missing" in off


def _setup_openmp_flags():
    """setup.py's OPENMP_FLAGS and openmp_flags, without running setup()."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    keep = [n for n in tree.body
            if (isinstance(n, ast.Import) and n.names[0].name in ("os", "shlex", "subprocess",
                                                                   "tempfile"))
            or (isinstance(n, ast.Assign) and n.targets[0].id == "OPENMP_FLAGS")
            or (isinstance(n, ast.FunctionDef) and n.name == "openmp_flags")]
    ns = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "setup.py", "exec"), ns)
    return ns["openmp_flags"]


def _stub_compiler(tmp_path, name, script):
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.mark.skipif(sys.platform == "win32", reason="shell-script stub compilers")
def test_setup_asks_each_compiler_for_openmp_its_own_way(tmp_path, monkeypatch):
    openmp_flags = _setup_openmp_flags()
    for var in ("CPUATTN_NO_OPENMP", "CPPFLAGS", "CFLAGS", "LDFLAGS"):
        monkeypatch.delenv(var, raising=False)
    # GCC / LLVM clang: -fopenmp alone
    gcc_like = _stub_compiler(tmp_path, "gcc_like", 'case " $* " in *" -fopenmp "*) exit 0;; esac; exit 1\n')
    assert openmp_flags([gcc_like]) == (["-fopenmp"], ["-fopenmp"])
    # Apple clang: refuses the driver flag, takes the preprocessor's and -lomp,
    # with the environment's flags (Homebrew's libomp) passed along
    apple = _stub_compiler(
        tmp_path, "apple_clang",
        'case " $* " in *" -Xpreprocessor -fopenmp "*) ;; *) exit 1;; esac\n'
        'case " $* " in *" -I/opt/libomp/include "*" -L/opt/libomp/lib -lomp "*) exit 0;; esac\n'
        'exit 1\n')
    monkeypatch.setenv("CPPFLAGS", "-I/opt/libomp/include")
    monkeypatch.setenv("LDFLAGS", "-L/opt/libomp/lib")
    assert openmp_flags([apple]) == (["-Xpreprocessor", "-fopenmp"], ["-lomp"])
    # no OpenMP at all (Apple clang without libomp), or switched off
    nothing = _stub_compiler(tmp_path, "no_openmp", "exit 1\n")
    assert openmp_flags([nothing]) is None
    assert openmp_flags([str(tmp_path / "missing-compiler")]) is None
    monkeypatch.setenv("CPUATTN_NO_OPENMP", "1")
    assert openmp_flags([gcc_like]) is None
