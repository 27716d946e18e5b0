#!/usr/bin/env bash
# Everything a session lent a GPU should run, as one command that fits the device time (15 minutes a session, the
# machine's start included): the Triton kernels' tests on the GPU, then the operator and layer benchmarks of
# docs/PERFORMANCE.md ("GPU"), each under its own time limit so that one hanging part cannot eat the others' time.
# Run from the repository root on the device machine, whose python3 already holds torch, triton and pytest:
#
#     bash benchmarks/gpu_session.sh            # results under $OUT (the device tool's folder), else ./gpu_out
#
# The peers (titans-pytorch, flash-linear-attention) are not on that machine: they travel as wheels in .whl/ (ignored
# by git through .git/info/exclude; the device tool's `carry`), fetched here once with
#
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
#       titans-pytorch==0.5.5 assoc-scan axial-positional-embedding einx hyper-connections rotary-embedding-torch \
#       tensordict x-transformers accelerated-scan frozendict torch-einops-utils pyvers loguru \
#       flash-linear-attention==0.6.0 fla-core==0.6.0
#
# and installed there into /tmp/site; without .whl/ their rows are reported unavailable. Device tool call:
# run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=600).
#
# Writes eight files (the most the device tool brings back): env.txt, tests.log, op_speed.log, op_speed-cuda.json,
# layer_speed.log, layer_speed-cuda.json, and the kernels at TF32 dot precisions (MNEMOS_TRITON_DOT_PRECISION):
# op_precision.log (their speed, tf32x3 and tf32, and their accuracy) and triton_precision-cuda.json (the accuracy).
# The steps come in order of priority: what the 600 s call limit cuts is the last (fla's delta rule). Copy the JSON files to benchmarks/results/ and
# the tables into docs/PERFORMANCE.md with this command line.
#
# GPU_SESSION_DRY=1 checks the script itself on a CPU machine: the same steps on the CPU at tiny shapes, the tests
# under Triton's interpreter (what CI does), a few minutes; the wheels are not installed there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if [ "${GPU_SESSION_DRY:-0}" = 1 ]; then
  DEVICE=cpu
  SHAPE=(--batch 1 --seq-len 32 --dim 32 --heads 2 --chunk-size 8 --warmup 1 --repeats 1 --no-cpu-memory)
  ACC_SHAPE=(--batch 1 --seq-len 40 --heads 2 --head-dim 16 --expansion 2 --depth 2 --dtype float32)
  ACC_ENV=(env TRITON_INTERPRET=1)  # the accuracy step runs the kernels: interpreted on a CPU
  CHUNK64=() CHUNK32=()  # the tiny shape keeps its chunk of 8
  LIMIT_TESTS=900 LIMIT_BENCH=300 LIMIT_LAYER=300 LIMIT_PREC=300 LIMIT_ACC=300 LIMIT_CHUNK=300 LIMIT_FLA=300
else
  DEVICE=cuda
  SHAPE=()  # the GPU shape of docs/PERFORMANCE.md: B 4, T 4096, 8 heads of 64, depth 2, chunk 16
  ACC_SHAPE=() ACC_ENV=()  # the GPU shape, compiled
  CHUNK64=(--chunk-size 64) CHUNK32=(--chunk-size 32)
  LIMIT_TESTS=150 LIMIT_BENCH=125 LIMIT_LAYER=120 LIMIT_PREC=45 LIMIT_ACC=75 LIMIT_CHUNK=40 LIMIT_FLA=90
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=$PYTHONPATH:/tmp/site || echo "gpu_session: the wheels in .whl/ did not install"
  fi
fi

{
  date -u
  git log -1 --format='commit %H' 2>/dev/null
  nvidia-smi 2>&1 | head -15
  "$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__); print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")' 2>&1
  "$PY" -m pip list 2>/dev/null | grep -i -E "^(titans|flash-linear|fla-core|einops|tensordict) " || true
} > "$OUT/env.txt"
cat "$OUT/env.txt"

status=0
step() {  # step NAME LIMIT_S COMMAND...: run it under the limit, its output to OUT/NAME.log and the terminal
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s): $*"
  timeout "$limit" "$@" 2>&1 | tee ${APPEND:+-a} "$OUT/$name.log"  # APPEND=1: add to the log
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc"
  [ "$rc" = 0 ] || status=1
}

# 1. the Triton kernels against the torch reference, compiled for this GPU (on a CPU: interpreted)
step tests "$LIMIT_TESTS" "$PY" -m pytest -q --maxfail=3 -p no:cacheprovider tests/ops/test_triton.py
# 2. operators: the memory rule on the kernels and on the torch path, the delta rule (mnemos, fla), SDPA, against the
#    device's measured ceilings
step op_speed "$LIMIT_BENCH" "$PY" benchmarks/op_speed.py --device "$DEVICE" "${SHAPE[@]}" \
  --only op-triton-d2 op-torch-d2 op-triton-d1 op-delta sdpa --out "$OUT/op_speed-$DEVICE.json"
# 3. the layer: mnemos (auto: the kernels on a GPU, as mnemos-triton would) beside titans-pytorch's default
step layer_speed "$LIMIT_LAYER" "$PY" benchmarks/layer_speed.py --device "$DEVICE" "${SHAPE[@]}" \
  --only mnemos titans-default --out "$OUT/layer_speed-$DEVICE.json"  # titans-paper: 36x slower, NaN grads (2026-12-04)
# 4. the kernels with TF32 tensor-core products instead of exact float32 ones (speed only; accuracy: a later check)
step op_precision "$LIMIT_PREC" env MNEMOS_TRITON_DOT_PRECISION=tf32x3 "$PY" benchmarks/op_speed.py --device "$DEVICE" \
  "${SHAPE[@]}" --only op-triton-d2 op-triton-d1 --out "${TMPDIR:-/tmp}/op_speed-tf32x3-$DEVICE.json"
APPEND=1 step op_precision "$LIMIT_PREC" env MNEMOS_TRITON_DOT_PRECISION=tf32 "$PY" benchmarks/op_speed.py \
  --device "$DEVICE" "${SHAPE[@]}" --only op-triton-d2 op-triton-d1 --out "${TMPDIR:-/tmp}/op_speed-tf32-$DEVICE.json"
# 5. what the TF32 precisions cost in accuracy: each against the torch path in float64 (into op_precision.log)
APPEND=1 step op_precision "$LIMIT_ACC" "${ACC_ENV[@]}" "$PY" benchmarks/triton_precision.py --device "$DEVICE" "${ACC_SHAPE[@]}" \
  --out "$OUT/triton_precision-$DEVICE.json"
# 6. the kernels at chunk 32 and 64 (fewer, larger sequential steps: how much of the time is per-chunk latency), into
#    op_speed.log
APPEND=1 step op_speed "$LIMIT_CHUNK" "$PY" benchmarks/op_speed.py --device "$DEVICE" "${SHAPE[@]}" "${CHUNK64[@]}" \
  --only op-triton-d2 op-triton-d1 --out "${TMPDIR:-/tmp}/op_speed-c64-$DEVICE.json"
APPEND=1 step op_speed "$LIMIT_CHUNK" "$PY" benchmarks/op_speed.py --device "$DEVICE" "${SHAPE[@]}" "${CHUNK32[@]}" \
  --only op-triton-d2 op-triton-d1 --out "${TMPDIR:-/tmp}/op_speed-c32-$DEVICE.json"
# 7. fla's chunked delta rule beside mnemos's (last and on its own: its autotuning outlasted a 125 s step once),
#    into op_speed.log
APPEND=1 step op_speed "$LIMIT_FLA" "$PY" benchmarks/op_speed.py --device "$DEVICE" "${SHAPE[@]}" \
  --only op-delta fla-delta --out "${TMPDIR:-/tmp}/op_speed-fla-$DEVICE.json"
echo "gpu_session: $([ $status = 0 ] && echo 'every step passed' || echo 'a step failed: see its log') ($OUT)"
exit $status
