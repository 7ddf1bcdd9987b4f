#!/usr/bin/env bash
# On a CUDA machine, from anywhere: the tests on CUDA tensors, then the benchmarks.
# Uses the installed torch/triton (the GPU image has no network: nothing is installed).
#   bash benchmarks/run_gpu.sh [--quick] [OUT_DIR]
# Full: the whole test suite, then every benchmark script.
# --quick (fits a short GPU lease): a CUDA smoke tier (the contract test: every op on both backends,
# compiled kernels, opcheck, torch.compile), then every benchmark script's --quick cases.
# Writes OUT_DIR/gpu.txt, OUT_DIR/pytest-cuda.log, OUT_DIR/bench_<family>.log and the results files
# benchmarks/results/<gpu>.{json,md}, copied to OUT_DIR after each script (a lease that ends early
# still leaves what was measured). OUT_DIR defaults to benchmarks/results.
set -uo pipefail
cd "$(dirname "$0")/.."
quick=""
out=benchmarks/results
for arg in "$@"; do
  case "$arg" in
    --quick) quick=--quick ;;
    -*) echo "usage: bash benchmarks/run_gpu.sh [--quick] [OUT_DIR]" >&2; exit 2 ;;
    *) out=$arg ;;
  esac
done
mkdir -p "$out" benchmarks/results
export PYTHONPATH=.
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" \
  | tee -a "$out/gpu.txt"
git rev-parse HEAD 2>/dev/null | tee -a "$out/gpu.txt"
if [ -n "$quick" ]; then
  tests=(tests/test_contract.py)
else
  tests=()
fi
python -m pytest -q -n 8 -p no:cacheprovider "${tests[@]}" 2>&1 | tee "$out/pytest-cuda.log" | tail -40
status=${PIPESTATUS[0]}
# The harness scripts, each run as a module from the repository root (PYTHONPATH=. finds scratchops).
for script in $(grep -l "benchmarks.harness" benchmarks/bench_*.py); do
  family=$(basename "$script" .py)
  python -m "benchmarks.$family" $quick 2>&1 | tee "$out/$family.log" | tail -5
  if [ "$out" != benchmarks/results ]; then
    cp benchmarks/results/*.json benchmarks/results/*.md "$out/" 2>/dev/null
  fi
done
exit "$status"
