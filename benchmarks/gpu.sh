#!/usr/bin/env bash
# The prepared GPU check: the Triton kernels' tests, the kernels against their references, per-window
# and per-volume latency (float32 and bf16, with and without window batching), scans per second through
# diagnose() with 0, 2 and 4 DataLoader workers, the text tower, and alignment train steps (official and
# fused, fp32 and bf16, with and without channels-last). About 8 minutes on an H200 (estimated).
#
# The device machine is offline and its image lacks some dependencies, so, from this machine:
#   bash benchmarks/gpu_wheels.sh
#   run(command="VISD_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=590)
# (write the commit into the command: the device gets the working tree, not .git). Each benchmark appends
# its row to benchmarks/README.md there; the file comes back as $OUT/README.md after every step, with the
# log in $OUT/gpu.log: copy the new rows into benchmarks/README.md here.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/visd-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/visd-deps:$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {
  echo "== $*"
  timeout "${STEP_S:-240}" "$@" || echo "!! failed with status $?: $*"
  cp benchmarks/README.md "$OUT/README.md"
}

main() {
  if [ -d .whl ]; then
    $PY -m pip install --quiet --no-index --no-deps --target /tmp/visd-deps .whl/*.whl || return 1
  fi
  $PY -c "import torch, visd; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0), torch.__version__, visd.__version__)" || return 1
  step $PY -m pytest tests/kernels -q -x -p no:cacheprovider
  step $PY benchmarks/bench_kernels.py
  for mode in official fused fused-bf16; do
    step $PY benchmarks/bench_window.py --mode "$mode" --repeat 3
  done
  step $PY benchmarks/bench_volume.py --mode fused --compare
  step $PY benchmarks/bench_volume.py --mode fused-bf16
  step $PY benchmarks/bench_volume.py --mode fused-nobatch
  for precision in fp32 bf16; do  # a train step: channels-last 3D is measured on CPUs only so far
    step $PY benchmarks/bench_train_step.py --stage alignment --numerics official --precision "$precision"
    step $PY benchmarks/bench_train_step.py --stage alignment --numerics fused --precision "$precision"
  done
  step $PY benchmarks/bench_train_step.py --stage alignment --numerics fused --precision bf16 --no-channels-last
  step $PY benchmarks/bench_throughput.py --scans 4 --workers 0 2 4
  step $PY benchmarks/bench_text.py --mode fused
}

main 2>&1 | tee "$OUT/gpu.log"
exit "${PIPESTATUS[0]}"
