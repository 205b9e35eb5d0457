#!/usr/bin/env bash
# The GPU path in one prepared run: trains every method file on the device, repeats the CPU tests'
# checks there and measures throughput against the targets (bench/gpu_check.py says what and why).
#   bash bench/gpu_check.sh                        # on a CUDA machine; the report also goes to $OUT/gpu.md
#   bash bench/gpu_check.sh --device cpu --quick   # the same script at a toy size on a CPU
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/gpu_check.py "$@"
