#!/bin/sh
# Compile the C kernels for aarch64 and run the native attention check
# (tests/native/attn_check.c) and the worker/page pool check
# (tests/native/os_check.c) under qemu-user: the baseline (NEON) path that
# aarch64 wheels ship, checked against a float64 reference on an x86 host.
#
# Needs a cross compiler and qemu-user, e.g. on Debian/Ubuntu:
#   apt-get install -y gcc-aarch64-linux-gnu qemu-user
# Overridable: CC (aarch64-linux-gnu-gcc), QEMU (qemu-aarch64),
# SYSROOT (/usr/aarch64-linux-gnu).
set -eu
cd "$(dirname "$0")/.."
CC=${CC:-aarch64-linux-gnu-gcc}
QEMU=${QEMU:-qemu-aarch64}
SYSROOT=${SYSROOT:-/usr/aarch64-linux-gnu}
CSRC=src/cpuattn/csrc
# the flags setup.py uses, plus -Werror: a warning on aarch64 is a finding
FLAGS="-O3 -std=gnu11 -fno-strict-aliasing -Wall -Werror -Wno-unused-function -Wno-unknown-pragmas -I$CSRC"
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

for f in forward backward pool platform quant workers; do
    $CC $FLAGS -c "$CSRC/$f.c" -o "$OUT/$f.o"
done
echo "compiled forward.c backward.c pool.c platform.c quant.c workers.c for aarch64 ($($CC -dumpversion))"
$CC $FLAGS tests/native/attn_check.c "$OUT/forward.o" "$OUT/platform.o" "$OUT/quant.o" -lm -o "$OUT/attn_check"
$CC $FLAGS -pthread tests/native/os_check.c "$OUT/workers.o" "$OUT/pool.o" "$OUT/platform.o" -o "$OUT/os_check"
$QEMU -L "$SYSROOT" "$OUT/os_check"
$QEMU -L "$SYSROOT" "$OUT/attn_check"
