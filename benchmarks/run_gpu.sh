#!/usr/bin/env bash
# On a CUDA machine, from the repo root: the whole test suite on CUDA tensors, then every benchmark.
# Uses the installed torch/triton (the GPU image has no network: nothing is installed).
#   bash benchmarks/run_gpu.sh [OUT_DIR] [--quick]
# Writes OUT_DIR/pytest-cuda.log, OUT_DIR/bench-<family>.log and the results files
# benchmarks/results/<gpu>.{json,md} (also copied to OUT_DIR).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
quick=${2:-}
mkdir -p "$out"
export PYTHONPATH=.
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" \
  | tee -a "$out/gpu.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$out/gpu.txt"
python -m pytest -q -n 8 -p no:cacheprovider 2>&1 | tee "$out/pytest-cuda.log" | tail -40
status=${PIPESTATUS[0]}
# The harness scripts, each run as a module from the repository root (PYTHONPATH=. above finds scratchops).
for script in $(grep -l "benchmarks.harness" benchmarks/bench_*.py); do
  family=$(basename "$script" .py)
  python -m "benchmarks.$family" $quick 2>&1 | tee "$out/$family.log" | tail -5
done
cp benchmarks/results/*.json benchmarks/results/*.md "$out/" 2>/dev/null
exit "$status"
