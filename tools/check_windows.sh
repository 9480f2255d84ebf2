#!/bin/sh
# Cross-compile the C engine for 64-bit Windows with mingw-w64 (the toolchain
# of cpuattn's Windows wheels, see README "Platforms") and run the native
# checks under wine: the attention kernels on every SIMD path of this CPU
# (tests/native/attn_check.c) and the OS-facing code, the worker pool on
# winpthreads and the page pool's SRW lock (tests/native/os_check.c).
#
# Needs mingw-w64 and wine, e.g. on Debian/Ubuntu:
#   apt-get install -y --no-install-recommends gcc-mingw-w64-x86-64 wine64
# Overridable: CC (x86_64-w64-mingw32-gcc-posix), WINE (wine64 or wine on
# PATH, else /usr/lib/wine/wine64, where Debian's wine64 package puts it),
# WINEPREFIX (a scratch prefix, created on first use, ~20 s).
set -eu
cd "$(dirname "$0")/.."
CC=${CC:-x86_64-w64-mingw32-gcc-posix}
if [ -z "${WINE:-}" ]; then
    WINE=$(command -v wine64 || command -v wine || echo /usr/lib/wine/wine64)
fi
CSRC=src/cpuattn/csrc
# the flags setup.py uses, plus -Werror: a warning on Windows is a finding.
# -muse-unaligned-vector-move: GCC cannot align the stack beyond 16 bytes on
# Windows (GCC bug 54412), so a 32/64-byte aligned spill would fault; the
# assembler makes every aligned vector move an unaligned one (same speed).
FLAGS="-O3 -std=gnu11 -fno-strict-aliasing -Wall -Werror -Wno-unused-function -Wno-unknown-pragmas -fopenmp -Wa,-muse-unaligned-vector-move -I$CSRC"
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
export WINEPREFIX=${WINEPREFIX:-$OUT/wine} WINEDEBUG=${WINEDEBUG:--all}

for f in forward backward pool platform quant workers; do
    $CC $FLAGS -c "$CSRC/$f.c" -o "$OUT/$f.o"
done
echo "compiled forward.c backward.c pool.c platform.c quant.c workers.c for Windows ($CC $($CC -dumpversion))"
# -static: libgomp and winpthreads inside the .exe, as a wheel links them
$CC $FLAGS tests/native/os_check.c "$OUT/workers.o" "$OUT/pool.o" "$OUT/platform.o" -static -o "$OUT/os_check.exe"
$CC $FLAGS tests/native/attn_check.c "$OUT/forward.o" "$OUT/platform.o" "$OUT/quant.o" -static \
    -o "$OUT/attn_check.exe"
"$WINE" "$OUT/os_check.exe"
"$WINE" "$OUT/attn_check.exe"
