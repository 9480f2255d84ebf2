#!/usr/bin/env bash
# Build cpuattn with clang and LLVM's OpenMP runtime (libomp): the toolchain
# of the macOS wheels, here on Linux (Debian: apt-get install clang
# libomp-dev), in a scratch copy of this checkout, and run pytest against it.
#
#   tools/check_clang.sh                         # whole suite
#   tools/check_clang.sh tests/test_dense.py -k causal   # pytest arguments
#
# Fails unless the build really is clang's and reads its thread limit from
# libomp (cpuattn.info()["compiler"], ["openmp_library"]): a silent fallback
# to GCC or to a build without OpenMP would test nothing new. With
# CPUATTN_NO_OPENMP=1 it builds and tests clang without OpenMP instead (what
# Apple clang without libomp builds) and fails if OpenMP is on.
# Environment: CC (clang), PYTHON (python3), CPUATTN_CLANG_JOBS (2),
# CPUATTN_CLANG_DIR (scratch directory; default a fresh one, removed at exit).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
export CC="${CC:-clang}"
if [[ -n "${CPUATTN_CLANG_DIR:-}" ]]; then
    WORK="$CPUATTN_CLANG_DIR"
    mkdir -p "$WORK"
else
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/cpuattn-clang.XXXXXX")"
    trap 'rm -rf "$WORK"' EXIT
fi

(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard) \
    | (cd "$ROOT" && xargs -0 cp --parents -f -t "$WORK")
cd "$WORK"
echo "check_clang.sh: building with CC=$CC in $WORK"
start=$(date +%s)
if ! "$PYTHON" setup.py build_ext --inplace -j "${CPUATTN_CLANG_JOBS:-2}" >build.log 2>&1; then
    tail -n 40 build.log >&2
    echo "check_clang.sh: build failed" >&2
    exit 2
fi
echo "check_clang.sh: built in $(( $(date +%s) - start )) s"
export PYTHONPATH="$WORK/src" PYTHONDONTWRITEBYTECODE=1
"$PYTHON" - <<'EOF'
import os
import cpuattn
i = cpuattn.info()
print(f"check_clang.sh: compiler {i['compiler']}, OpenMP {i['openmp_version']} from {i['openmp_library']}")
assert i["compiler"].startswith("clang"), i["compiler"]
if os.environ.get("CPUATTN_NO_OPENMP"):
    assert not i["openmp"] and (i["num_threads"] > 1 or i["usable_cpus"] == 1), i
else:
    assert i["openmp"] and "libomp" in (i["openmp_library"] or ""), i
EOF
"$PYTHON" -m pytest -q -p no:cacheprovider "${@:-tests}"
