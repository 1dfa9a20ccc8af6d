#!/usr/bin/env bash
# Run the speed and memory benchmarks with their defaults (12.5 minutes on 2 shared CPU cores; see
# benchmarks/RESULTS.md). The UltraMNIST accuracy benchmark is separate: python -m benchmarks.ultramnist.
# Usage: benchmarks/run_all.sh [FLAGS...]   e.g. --device cuda; FLAGS go to every benchmark.
# Results (JSON, PNG) go to $OUT (default benchmarks/results); PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-benchmarks/results}
export HF_HUB_OFFLINE=1  # random weights only: nothing may reach a model hub
for name in fill step memory inference; do
    echo "== $name"
    start=$SECONDS
    "$PYTHON" -m "benchmarks.$name" --out "$OUT" "$@"
    echo "($name took $((SECONDS - start)) s)"
done
