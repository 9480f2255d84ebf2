"""Build the cpuattn extensions.

Every extension is compiled for the baseline ISA of the target (no
-march=native): the hot loops carry their own per-function ISA targets and
are chosen at import from CPUID/XGETBV (see csrc/platform.c). The kernels run
on cpuattn's own worker pool (csrc/workers.c, pthreads); OpenMP is linked only
to read its thread limit (OMP_NUM_THREADS, threadpoolctl). Without OpenMP the
build goes on with serial kernels and ``cpuattn.info()["openmp"]`` says so.

Environment switches (for development, never needed by users):
  CPUATTN_NO_OPENMP=1         build without OpenMP
  CPUATTN_SANITIZE=address    build with -fsanitize=address,undefined
"""
import glob
import os
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


def compiler_has_openmp(compiler_cmd):
    """Compile and link a tiny OpenMP program with the build's compiler."""
    if os.environ.get("CPUATTN_NO_OPENMP"):
        return False
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "t.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void){return omp_get_max_threads() < 1;}\n")
        try:
            r = subprocess.run(compiler_cmd + ["-fopenmp", src, "-o", os.path.join(tmp, "t")],
                               capture_output=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return r.returncode == 0


class BuildExt(build_ext):
    def build_extensions(self):
        cc = list(self.compiler.compiler_so[:1])
        openmp = compiler_has_openmp(cc)
        if not openmp:
            warnings.warn("cpuattn: the compiler has no OpenMP; building serial kernels "
                          "(cpuattn.info() will report openmp=False)")
        sanitize = os.environ.get("CPUATTN_SANITIZE", "")
        for ext in self.extensions:
            ext.extra_compile_args += ["-O3", "-std=gnu11", "-fno-strict-aliasing", "-pthread",
                                       "-Wno-unused-function", "-Wno-unknown-pragmas"]
            ext.extra_link_args.append("-pthread")
            if openmp:
                ext.extra_compile_args.append("-fopenmp")
                ext.extra_link_args.append("-fopenmp")
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
