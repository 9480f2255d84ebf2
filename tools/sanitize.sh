#!/usr/bin/env bash
# Build cpuattn with AddressSanitizer + UndefinedBehaviorSanitizer in a scratch
# copy of this checkout and run the test suite under them.
#
#   tools/sanitize.sh                  # whole suite
#   tools/sanitize.sh tests/test_pool.py -k hammer   # pytest arguments
#
# Environment:
#   CPUATTN_SAN_DIR   scratch directory (default: a fresh mktemp -d, removed
#                     at the end unless CPUATTN_SAN_KEEP=1)
#   CPUATTN_SAN_JOBS  parallel compile jobs (default 2)
#   PYTHON            interpreter (default python3)
#
# The build never touches this checkout's in-place extensions: the tracked
# and untracked (non-ignored) files are copied to the scratch directory and
# built there with CPUATTN_SANITIZE=address (setup.py adds
# -fsanitize=address,undefined -fno-omit-frame-pointer -g). CPython itself is
# not instrumented, so libasan is LD_PRELOADed and leak detection is off
# (CPython keeps objects alive until exit by design); allocator_may_return_null
# lets the tests that ask for absurd pool sizes see MemoryError, as without
# ASan. Every ASan or UBSan report goes to a log file; the script prints them
# and fails if there is any, or if pytest fails. Both halt on the first error.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
JOBS="${CPUATTN_SAN_JOBS:-2}"
CC_CMD="${CC:-gcc}"

if [[ -n "${CPUATTN_SAN_DIR:-}" ]]; then
    WORK="$CPUATTN_SAN_DIR"
    mkdir -p "$WORK"
else
    WORK="$(mktemp -d "${TMPDIR:-/tmp}/cpuattn-san.XXXXXX")"
    if [[ "${CPUATTN_SAN_KEEP:-0}" != 1 ]]; then
        trap 'rm -rf "$WORK"' EXIT
    fi
fi

LIBASAN="$("$CC_CMD" -print-file-name=libasan.so)"
if [[ ! -e "$LIBASAN" ]]; then
    echo "sanitize.sh: $CC_CMD has no libasan.so (install libasan / gcc's sanitizer runtime)" >&2
    exit 2
fi

echo "sanitize.sh: scratch copy in $WORK"
mkdir -p "$WORK/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard) \
    | (cd "$ROOT" && xargs -0 cp --parents -f -t "$WORK")
cd "$WORK"

echo "sanitize.sh: building with CPUATTN_SANITIZE=address (log: $WORK/build.log)"
if ! CC="$CC_CMD" CPUATTN_SANITIZE=address "$PYTHON" setup.py build_ext --inplace -j "$JOBS" \
        >"$WORK/build.log" 2>&1; then
    tail -n 40 "$WORK/build.log" >&2
    echo "sanitize.sh: build failed" >&2
    exit 2
fi
for so in src/cpuattn/_*.so; do
    if ! nm -D "$so" | grep __asan_init >/dev/null; then
        echo "sanitize.sh: $so is not instrumented" >&2
        exit 2
    fi
done

LOGS="$WORK/san-logs"
rm -rf "$LOGS"
mkdir -p "$LOGS"
# libstdc++ beside libasan: ASan intercepts __cxa_throw, and finds the real
# one only if libstdc++ is loaded when it starts (torch, imported later by the
# integration tests, throws C++ exceptions through Python callbacks).
LIBSTDCXX="$("$CC_CMD" -print-file-name=libstdc++.so.6)"
[[ -e "$LIBSTDCXX" ]] && LIBASAN="$LIBASAN:$LIBSTDCXX"
export LD_PRELOAD="$LIBASAN${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=0:halt_on_error=1:detect_stack_use_after_return=0:log_path=$LOGS/asan${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$LOGS/ubsan${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export PYTHONPATH="$WORK/src"
export PYTHONDONTWRITEBYTECODE=1

echo "sanitize.sh: running pytest under ASan + UBSan"
set +e
"$PYTHON" -m pytest -q -p no:cacheprovider "${@:-tests}"
rc=$?
set -e

reports=0
shopt -s nullglob
for f in "$LOGS"/*; do
    echo "===== $f" >&2
    cat "$f" >&2
    reports=$((reports + $(grep -cE "ERROR: AddressSanitizer|runtime error:" "$f" || true)))
done
echo "sanitize.sh: pytest exit status $rc, sanitizer reports: $reports"
if [[ $reports -ne 0 || $rc -ne 0 ]]; then
    exit 1
fi
