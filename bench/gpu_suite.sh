#!/usr/bin/env bash
# On a machine with a CUDA GPU, torch and Triton installed, and no network: build the
# extension for this GPU, run the GPU tests, then benchmark and print the tables (the
# benchmark against torch, the grid-size sweep of the CUDA kernels, then the offload runs of
# bench/gpu_offload.sh).
#   bash bench/gpu_suite.sh [LOG_DIR]
# Every stage runs whatever the one before it did (a failing test must not hide the
# benchmark), each under its own time limit so the whole suite fits in about 10 minutes; the
# exit status is non-zero if any stage failed, and LOG_DIR/summary.txt says which.
set -uo pipefail
cd "$(dirname "$0")/.."
log_dir="${1:-gpu-suite-logs}"
mkdir -p "$log_dir"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
failed=0
: >"$log_dir/summary.txt"

# stage NAME SECONDS LOG COMMAND...: runs COMMAND under a time limit, its output to the
# terminal and to LOG_DIR/LOG, and records its exit status.
stage() {
  local name=$1 seconds=$2 log=$3
  shift 3
  echo "== $name"
  local start=$SECONDS
  timeout --signal=INT --kill-after=20 "$seconds" "$@" 2>&1 | tee "$log_dir/$log"
  local rc=${PIPESTATUS[0]}
  local verdict="ok"
  if [ "$rc" -eq 124 ]; then verdict="TIMED OUT after ${seconds}s"; elif [ "$rc" -ne 0 ]; then verdict="FAILED (exit $rc)"; fi
  [ "$rc" -ne 0 ] && failed=1
  echo "$name: $verdict, $((SECONDS - start)) s" | tee -a "$log_dir/summary.txt"
}

cap=$($python -c "import torch; print('.'.join(map(str, torch.cuda.get_device_capability())))")
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$cap}"
stage "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)" 240 build.log \
  env FASTOPT_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" $python -m pip install -q --no-build-isolation \
  --no-deps --no-index -e .
stage "info" 60 info.txt $python -m fastopt info
stage "GPU tests (the CPU-only ones run in CI)" 180 tests.log \
  $python -m pytest -q -m gpu tests -p no:cacheprovider
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv \
  | tee "$log_dir/gpu.txt"
stage "benchmark" 120 bench.txt $python -m fastopt bench ${FASTOPT_BENCH_ARGS:-}
stage "grid-size sweep of the CUDA kernels" 60 sweep_grid.txt \
  $python bench/sweep_grid.py ${FASTOPT_SWEEP_ARGS:-}
stage "offload: ~1B params, on the GPU, offloaded, overlapped, FSDP2 CPUOffloadPolicy" 240 \
  offload.txt env FASTOPT_OFFLOAD_TESTS=0 bash bench/gpu_offload.sh "$log_dir"
cat "$log_dir/summary.txt"
exit "$failed"
