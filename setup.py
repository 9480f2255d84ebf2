"""Build the cpuattn extensions.

Every extension is compiled for the baseline ISA of the target (no
-march=native): the hot loops carry their own per-function ISA targets and
are chosen at import from CPUID/XGETBV (see csrc/platform.c). The kernels run
on cpuattn's own worker pool (csrc/workers.c, pthreads); OpenMP is linked only
to read its thread limit (OMP_NUM_THREADS, threadpoolctl). Without OpenMP the
build goes on, the kernels are still threaded (limited by OMP_NUM_THREADS
alone) and ``cpuattn.info()["openmp"]`` says so. Compilers: GCC, LLVM clang
(with libomp), Apple clang (with Homebrew's libomp), mingw-w64 on Windows; see
README "Platforms".

Environment switches (for development, never needed by users):
  CPUATTN_NO_OPENMP=1         build without OpenMP
  CPUATTN_SANITIZE=address    build with -fsanitize=address,undefined
"""
import glob
import os
import shlex
import subprocess
import sys
import tempfile
import warnings

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
PKG = os.path.join("src", "cpuattn")
CSRC = os.path.join(PKG, "csrc")


# How a compiler is asked for OpenMP, (compile flags, link flags): GCC and
# LLVM clang take -fopenmp; Apple clang has no driver flag, only the
# preprocessor's, and LLVM's libomp linked by hand (Homebrew's, found through
# CPPFLAGS/LDFLAGS: README "Platforms").
OPENMP_FLAGS = [(["-fopenmp"], ["-fopenmp"]), (["-Xpreprocessor", "-fopenmp"], ["-lomp"])]


def openmp_flags(compiler_cmd):
    """The first OPENMP_FLAGS entry with which the build's compiler (and the
    environment's CPPFLAGS, CFLAGS, LDFLAGS, as the build uses them) compiles
    and links a tiny OpenMP program; None if none does."""
    if os.environ.get("CPUATTN_NO_OPENMP"):
        return None
    env = [f for v in ("CPPFLAGS", "CFLAGS") for f in shlex.split(os.environ.get(v, ""))]
    ldflags = shlex.split(os.environ.get("LDFLAGS", ""))
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n")
        for cflags, lflags in OPENMP_FLAGS:
            cmd = compiler_cmd + env + cflags + [src, "-o", os.path.join(tmp, "t")] + ldflags + lflags
            try:
                if subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0:
                    return cflags, lflags
            except (OSError, subprocess.TimeoutExpired):
                return None
    return None


class BuildExt(build_ext):
    def initialize_options(self):
        super().initialize_options()
        if sys.platform == "win32":
            # MSVC cannot compile the kernels (GCC vector extensions, target
            # attributes): Windows builds use mingw-w64 (README "Platforms")
            self.compiler = "mingw32"

    def build_extensions(self):
        cc = list(self.compiler.compiler_so[:1])
        openmp = openmp_flags(cc)
        if not openmp:
            warnings.warn("cpuattn: the compiler has no OpenMP; the kernels are threaded all the "
                          "same, limited by OMP_NUM_THREADS only, not threadpoolctl "
                          "(cpuattn.info() will report openmp=False)")
        mingw = self.compiler.compiler_type == "mingw32"
        sanitize = os.environ.get("CPUATTN_SANITIZE", "")
        for ext in self.extensions:
            ext.extra_compile_args += ["-O3", "-std=gnu11", "-fno-strict-aliasing", "-pthread",
                                       "-Wno-unused-function", "-Wno-unknown-pragmas"]
            ext.extra_link_args.append("-pthread")
            if openmp:
                ext.extra_compile_args += openmp[0]
                ext.extra_link_args += openmp[1]
            if mingw:
                # GCC cannot align the Windows stack past 16 bytes (GCC bug
                # 54412): every aligned vector move becomes an unaligned one.
                # MS_WIN64: CPython's pyconfig.h sets it for MSVC only.
                # -static: libgomp, winpthreads and libgcc inside the module,
                # so the wheel needs no mingw DLLs beside it.
                ext.extra_compile_args += ["-Wa,-muse-unaligned-vector-move", "-DMS_WIN64"]
                ext.extra_link_args += ["-static"]
            if sanitize:
                flags = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g"]
                ext.extra_compile_args += flags
                ext.extra_link_args += flags
        super().build_extensions()


def ext(name, *csources, libraries=()):
    return Extension(
        f"cpuattn.{name}",
        [os.path.join(PKG, f"{name}.pyx")] + [os.path.join(CSRC, c) for c in csources],
        include_dirs=[np.get_include(), CSRC],
        depends=sorted(glob.glob(os.path.join(CSRC, "*.h"))),
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        libraries=list(libraries),
    )


# platform.c: CPU features, ISA and dtype tables (the engines' dispatch uses it);
# workers.c: the worker pool, one per process, in _threads (the other modules
# call it through _threads.parallel_for)
extensions = [
    # libdl: dladdr (csrc/portable.h), in libc itself only since glibc 2.34
    ext("_threads", "platform.c", "workers.c",
        libraries=["dl"] if sys.platform.startswith("linux") else []),
    ext("_forward", "forward.c", "platform.c", "quant.c"),
    ext("_plan", "platform.c"),
    ext("_roofline"),
    ext("_pool", "pool.c", "quant.c"),
    ext("_quant", "quant.c"),
    ext("_backward", "backward.c", "platform.c"),
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": 3, "boundscheck": False, "wraparound": False,
                             "cdivision": True, "initializedcheck": False},
    ),
    cmdclass={"build_ext": BuildExt},
)
