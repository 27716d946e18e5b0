#!/usr/bin/env bash
# Everything a session lent a GPU should run, as one command that fits the device time (15 minutes a session, the
# machine's start included): the Triton kernels' tests on the GPU, then the operator and layer benchmarks of
# docs/PERFORMANCE.md ("GPU"), each under its own time limit so that one hanging part cannot eat the others' time.
# Run from the repository root on the device machine, whose python3 already holds torch, triton and pytest
# (nothing to install; titans-pytorch and fla are not there, so their rows are left out):
#
#     bash benchmarks/gpu_session.sh            # results under $OUT (the device tool's folder), else ./gpu_out
#
# Writes six files (the device tool brings back at most eight): env.txt, tests.log, op_speed.log,
# op_speed-cuda.json, layer_speed.log, layer_speed-cuda.json. Copy the JSON files to benchmarks/results/ and the
# tables into docs/PERFORMANCE.md with this command line.
#
# GPU_SESSION_DRY=1 checks the script itself on a CPU machine: the same steps on the CPU at tiny shapes, the tests
# under Triton's interpreter (what CI does), a few minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if [ "${GPU_SESSION_DRY:-0}" = 1 ]; then
  DEVICE=cpu
  SHAPE=(--batch 1 --seq-len 32 --dim 32 --heads 2 --chunk-size 8 --warmup 1 --repeats 1 --no-cpu-memory)
  LIMIT_TESTS=900 LIMIT_BENCH=300
else
  DEVICE=cuda
  SHAPE=()  # the GPU shape of docs/PERFORMANCE.md: B 4, T 4096, 8 heads of 64, depth 2, chunk 16
  LIMIT_TESTS=240 LIMIT_BENCH=150
fi

{
  date -u
  git log -1 --format='commit %H' 2>/dev/null
  nvidia-smi 2>&1 | head -15
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__); print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")' 2>&1
} > "$OUT/env.txt"
cat "$OUT/env.txt"

status=0
step() {  # step NAME LIMIT_S COMMAND...: run it under the limit, its output to OUT/NAME.log and the terminal
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc"
  [ "$rc" = 0 ] || status=1
}

# 1. the Triton kernels against the torch reference, compiled for this GPU (on a CPU: interpreted)
step tests "$LIMIT_TESTS" "$PY" -m pytest -q -x -p no:cacheprovider tests/ops/test_triton.py
# 2. operators: the memory rule per impl, the delta rule, SDPA, against the device's measured ceilings
step op_speed "$LIMIT_BENCH" "$PY" benchmarks/op_speed.py --device "$DEVICE" "${SHAPE[@]}" \
  --only op-torch-d2 op-triton-d2 op-torch-d1 op-triton-d1 op-delta sdpa --out "$OUT/op_speed-$DEVICE.json"
# 3. the layer per impl (titans-pytorch is not installed there)
step layer_speed "$LIMIT_BENCH" "$PY" benchmarks/layer_speed.py --device "$DEVICE" "${SHAPE[@]}" \
  --only mnemos mnemos-torch mnemos-triton --out "$OUT/layer_speed-$DEVICE.json"
echo "gpu_session: $([ $status = 0 ] && echo 'every step passed' || echo 'a step failed: see its log') ($OUT)"
exit $status
