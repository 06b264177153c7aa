#!/usr/bin/env bash
# On a machine with a CUDA GPU, torch and Triton installed, and no network: build the
# extension for this GPU, run the GPU tests, then benchmark and print the tables (the
# benchmark against torch, then the grid-size sweep of the CUDA kernels).
#   bash bench/gpu_suite.sh [LOG_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
log_dir="${1:-gpu-suite-logs}"
mkdir -p "$log_dir"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

cap=$($python -c "import torch; print('.'.join(map(str, torch.cuda.get_device_capability())))")
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$cap}"
echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
FASTOPT_CUDA=1 MAX_JOBS="${MAX_JOBS:-8}" $python -m pip install -q --no-build-isolation --no-deps --no-index -e . \
  2>&1 | tee "$log_dir/build.log"
$python -m fastopt info | tee "$log_dir/info.txt"

echo "== GPU tests (the CPU-only ones run in CI)"
$python -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$log_dir/tests.log"

echo "== benchmark"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv \
  | tee "$log_dir/gpu.txt"
$python -m fastopt bench ${FASTOPT_BENCH_ARGS:-} 2>&1 | tee "$log_dir/bench.txt"

echo "== grid-size sweep of the CUDA kernels"
$python bench/sweep_grid.py ${FASTOPT_SWEEP_ARGS:-} 2>&1 | tee "$log_dir/sweep_grid.txt"
