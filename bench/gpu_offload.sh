#!/usr/bin/env bash
# On a machine with a CUDA GPU (the extension built, as bench/gpu_suite.sh does first): the
# offload and overlap tests on CUDA, then a bf16 model of about 1B params trained for a few
# steps with the optimizer on the GPU, offloaded, offloaded and overlapped, and FSDP2's
# CPUOffloadPolicy on one rank; the table (iteration and step time, peak GPU and host memory)
# to LOG_DIR/offload.md. Each run is its own process (host memory peaks are per run) under its
# own time limit; a failing one does not stop the others. About 3 minutes.
#   bash bench/gpu_offload.sh [LOG_DIR]      (FASTOPT_OFFLOAD_TESTS=0 skips the tests)
set -uo pipefail
cd "$(dirname "$0")/.."
log_dir="${1:-gpu-offload-logs}"
mkdir -p "$log_dir"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
failed=0
if [ "${FASTOPT_OFFLOAD_TESTS:-1}" != 0 ]; then
  timeout --signal=INT 150 $python -m pytest -q -m gpu tests/test_offload.py tests/test_overlap.py \
    tests/test_backward_norm.py -p no:cacheprovider 2>&1 | tee "$log_dir/offload_tests.log"
  [ "${PIPESTATUS[0]}" -ne 0 ] && failed=1
fi
runs=()
for mode in device offload overlap fsdp2; do
  echo "== offload_train --mode $mode"
  timeout --signal=INT --kill-after=10 100 $python bench/offload_train.py --mode "$mode" \
    --steps 3 --warmup 1 --out "$log_dir/offload_$mode.json" ${FASTOPT_OFFLOAD_ARGS:-} \
    2>&1 | tee "$log_dir/offload_$mode.log"
  if [ "${PIPESTATUS[0]}" -eq 0 ]; then runs+=("$log_dir/offload_$mode.json"); else failed=1; fi
done
if [ "${#runs[@]}" -gt 0 ]; then
  $python bench/offload_train.py --table "${runs[@]}" | tee "$log_dir/offload.md"
fi
exit "$failed"
