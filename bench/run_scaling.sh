#!/usr/bin/env bash
# Thread-scaling run of the cpuattn benchmark suite, for a many-core machine.
#
#   bench/run_scaling.sh [OUT.json] [extra bench options...]
#
# Runs every case at 1, 2, 4, 8 and 16 threads (override: THREADS=1,2,3,4,6,8,12,16)
# and writes all results to OUT.json (default bench/scaling-<host>-<date>.json),
# plus a PNG next to it when matplotlib is installed. Run from the repository
# root after `python3 setup.py build_ext --inplace` (or with cpuattn installed).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${THREADS:-1,2,4,8,16}"
OUT="${1:-bench/scaling-$(hostname -s)-$(date +%Y%m%d-%H%M).json}"
shift || true
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
# The suite sets the thread count of each run; OpenMP must allow the largest.
export OMP_NUM_THREADS="$(tr ',' '\n' <<<"$THREADS" | sort -n | tail -1)"
PLOT=()
if python3 -c "import matplotlib" 2>/dev/null; then PLOT=(--plot "${OUT%.json}.png"); fi
python3 -m cpuattn info
python3 -m cpuattn bench --threads "$THREADS" --json "$OUT" ${PLOT[@]+"${PLOT[@]}"} "$@" \
    | tee "${OUT%.json}.txt"
