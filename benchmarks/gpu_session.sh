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
# GPU_SESSION_PARTS picks what runs (below: the parts, each with the files it writes; the script refuses a selection
# that would write more than the 8 files the device tool brings back). The default, the benchmark plan, writes
# env.txt, tests.log, op_speed.log, op_speed-cuda.json, layer_speed.log, layer_speed-cuda.json, op_precision.log (the
# kernels at TF32 dot precisions, MNEMOS_TRITON_DOT_PRECISION: speed and accuracy) and triton_precision-cuda.json.
# The grid plan, for a session whose kernels were already measured at the same code,
#
#     run(command='GPU_SESSION_PARTS="precision grid chunks" bash benchmarks/gpu_session.sh', carry=[".whl"], timeout_s=600)
#
# spends most of the call on issue 12's stability grid (grid.tar.gz: unpack into results/stability-grid-gpu/ and
# re-run benchmarks/stability_grid.py there with the same arguments, which resumes it and writes its table).
# Within a plan the parts come in order of priority: what the 600 s call limit cuts is the last (fla's delta rule).
# Copy the JSON files to benchmarks/results/ and the tables into docs/PERFORMANCE.md with this command line.
#
# The rules part (issue 14: the memory rule's presets on the torch path, Atlas on both its paths) is in no plan yet:
# GPU_SESSION_PARTS="tests rules" for a session that only needs it.
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
  CHUNK64=() CHUNK4=(--chunk-size 4)  # the tiny shape keeps its chunk of 8 but for chunk 4's step
  LIMIT_TESTS=900 LIMIT_BENCH=300 LIMIT_LAYER=300 LIMIT_PREC=300 LIMIT_ACC=300 LIMIT_CHUNK=300 LIMIT_FLA=300
  RULES_SHAPE=(--batch 1 --seq-len 64 --dim 32 --heads 2 --chunk 8 --repeats 1) LIMIT_RULES=300
  GRID_JOBS=2 GRID_GRACE=30 GRID_ARGS=(--quick --presets mqar --steps 10 --device cpu)  # 8 runs of 10 steps
else
  DEVICE=cuda
  SHAPE=()  # the GPU shape of docs/PERFORMANCE.md: B 4, T 4096, 8 heads of 64, depth 2, chunk 16
  ACC_SHAPE=() ACC_ENV=()  # the GPU shape, compiled
  CHUNK64=(--chunk-size 64) CHUNK4=(--chunk-size 4)
  LIMIT_TESTS=150 LIMIT_BENCH=125 LIMIT_LAYER=120 LIMIT_PREC=45 LIMIT_ACC=75 LIMIT_CHUNK=40 LIMIT_FLA=90
  RULES_SHAPE=() LIMIT_RULES=240  # issue 14's shape: B 2, T 2048, dim 256, depth 2, chunk 16
  # the grid: 15 trainings at a time on the 16 cores and the GPU
  GRID_JOBS=15 GRID_GRACE=45 GRID_ARGS=(--lrs 0.01 0.001 0.003 --seeds 0 1 2 3 4 --device cuda)
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=$PYTHONPATH:/tmp/site || echo "gpu_session: the wheels in .whl/ did not install"
  fi
fi

# The parts, in the order they run; GPU_SESSION_PARTS picks some (default: every part but the grid, the benchmark plan).
# Each part's files under $OUT are declared here, and a selection that would write more than the device tool brings
# back (8, env.txt included) is refused before anything runs. The grid plan of a session with the benchmarks already
# measured at the commit's kernels: GPU_SESSION_PARTS="precision grid chunks".
declare -A FILES=(
  [tests]="tests.log" [op_speed]="op_speed.log op_speed-$DEVICE.json" [layer]="layer_speed.log layer_speed-$DEVICE.json"
  [tf32speed]="op_precision.log" [precision]="op_precision.log triton_precision-$DEVICE.json"
  [grid]="grid.log grid.tar.gz" [chunks]="op_speed.log" [fla]="op_speed.log"
  [rules]="memory_rules_speed.log memory_rules_speed-$DEVICE.json"
)
ORDER=(tests op_speed layer tf32speed precision grid chunks fla rules)
PARTS=${GPU_SESSION_PARTS:-tests op_speed layer tf32speed precision chunks fla}
declare -A WANT=()
files=(env.txt)
for part in $PARTS; do
  if [ -z "${FILES[$part]+x}" ]; then echo "gpu_session: unknown part '$part' in GPU_SESSION_PARTS (parts: ${ORDER[*]})" >&2; exit 2; fi
  WANT[$part]=1
  files+=(${FILES[$part]})
done
nfiles=$(printf '%s\n' "${files[@]}" | sort -u | wc -l)
if [ "$nfiles" -gt 8 ]; then
  echo "gpu_session: GPU_SESSION_PARTS='$PARTS' would write $nfiles files under \$OUT; the device tool brings back 8" >&2
  exit 2
fi
echo "gpu_session: parts: $PARTS ($nfiles files)"
[ "${GPU_SESSION_CHECK_ONLY:-0}" = 1 ] && exit 0
want() { [ -n "${WANT[$1]+x}" ]; }
# seconds this script may take in all (the grid sizes itself to what is left): the device call's 600 s less a margin;
# a dry run's interpreted steps take longer than the GPU's, so it gets more
BUDGET=${GPU_SESSION_BUDGET:-$([ "${GPU_SESSION_DRY:-0}" = 1 ] && echo 3000 || echo 570)}

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
want tests && step tests "$LIMIT_TESTS" "$PY" -m pytest -q --maxfail=3 -p no:cacheprovider tests/ops/test_triton.py
# 2. operators: the memory rule on the kernels and on the torch path, the delta rule (mnemos, fla), SDPA, against the
#    device's measured ceilings
want op_speed && step op_speed "$LIMIT_BENCH" "$PY" benchmarks/op_speed.py --device "$DEVICE" "${SHAPE[@]}" \
  --only op-triton-d2 op-torch-d2 op-triton-d1 op-delta sdpa --out "$OUT/op_speed-$DEVICE.json"
# 3. the layer: mnemos (auto: the kernels on a GPU, as mnemos-triton would) beside titans-pytorch's default
want layer && step layer_speed "$LIMIT_LAYER" "$PY" benchmarks/layer_speed.py --device "$DEVICE" "${SHAPE[@]}" \
  --only mnemos titans-default --out "$OUT/layer_speed-$DEVICE.json"  # titans-paper: 36x slower, NaN grads (2026-12-04)
# 4. the kernels with TF32 tensor-core products instead of exact float32 ones (speed)
if want tf32speed; then
  APPEND=1 step op_precision "$LIMIT_PREC" env MNEMOS_TRITON_DOT_PRECISION=tf32x3 "$PY" benchmarks/op_speed.py \
    --device "$DEVICE" "${SHAPE[@]}" --only op-triton-d2 op-triton-d1 --out "${TMPDIR:-/tmp}/op_speed-tf32x3-$DEVICE.json"
  APPEND=1 step op_precision "$LIMIT_PREC" env MNEMOS_TRITON_DOT_PRECISION=tf32 "$PY" benchmarks/op_speed.py \
    --device "$DEVICE" "${SHAPE[@]}" --only op-triton-d2 op-triton-d1 --out "${TMPDIR:-/tmp}/op_speed-tf32-$DEVICE.json"
fi
# 5. what the TF32 precisions cost in accuracy: each against the torch path in float64 (into op_precision.log)
want precision && APPEND=1 step op_precision "$LIMIT_ACC" "${ACC_ENV[@]}" "$PY" benchmarks/triton_precision.py \
  --device "$DEVICE" "${ACC_SHAPE[@]}" --out "$OUT/triton_precision-$DEVICE.json"
# 6. issue 12's stability grid (every Titans variant x depth/chunk x lr x seed, MQAR and LM presets: zero skipped steps,
#    no inner divergence) on the device, GRID_JOBS trainings at a time (one CPU thread each), lr 1e-2's seeds first; it
#    starts runs until what is left of BUDGET is the reserve of the parts after it, and brings every finished run back
#    as grid.tar.gz (metrics and records, no checkpoints) to be unpacked into results/ and resumed (on any machine)
if want grid; then
  GRID_DIR=${TMPDIR:-/tmp}/grid
  reserve=10  # the tarball; then the limits of the parts after the grid
  want chunks && reserve=$(( reserve + 2 * LIMIT_CHUNK + 60 ))
  want fla && reserve=$(( reserve + LIMIT_FLA ))
  deadline=$(( BUDGET - SECONDS - reserve - GRID_GRACE - 20 ))  # SECONDS: since the script began
  [ "$deadline" -lt 10 ] && deadline=10
  step grid $(( deadline + GRID_GRACE + 60 )) "$PY" benchmarks/stability_grid.py --out "$GRID_DIR" --jobs "$GRID_JOBS" \
    --deadline "$deadline" --grace "$GRID_GRACE" --max-crashes 3 "${GRID_ARGS[@]}"
  tar -czf "$OUT/grid.tar.gz" -C "$GRID_DIR" --exclude='*/checkpoint' --exclude='*.png' --exclude='*/metrics.csv' . \
    || status=1
fi
# 7. the kernels at chunk 64 (fewer, larger sequential steps: how much of the time is per-chunk latency) and
#    at the library's default chunk of 4 (padded to the 16-token tile), beside the torch path at chunk 4 (what ran
#    there before session 26), into op_speed.log
if want chunks; then
  APPEND=1 step op_speed "$LIMIT_CHUNK" "$PY" benchmarks/op_speed.py --device "$DEVICE" "${SHAPE[@]}" "${CHUNK64[@]}" \
    --only op-triton-d2 op-triton-d1 --out "${TMPDIR:-/tmp}/op_speed-c64-$DEVICE.json"
  APPEND=1 step op_speed "$LIMIT_CHUNK" "$PY" benchmarks/op_speed.py --device "$DEVICE" "${SHAPE[@]}" "${CHUNK4[@]}" \
    --only op-triton-d2 op-triton-d1 --out "${TMPDIR:-/tmp}/op_speed-c4-$DEVICE.json"
  APPEND=1 step op_speed 60 "$PY" benchmarks/op_speed.py --device "$DEVICE" "${SHAPE[@]}" "${CHUNK4[@]}" \
    --warmup 1 --repeats 3 --only op-torch-d2 --out "${TMPDIR:-/tmp}/op_speed-c4-torch-$DEVICE.json"
fi
# 8. fla's chunked delta rule beside mnemos's (last and on its own: its autotuning outlasted a 125 s step once),
#    into op_speed.log
want fla && APPEND=1 step op_speed "$LIMIT_FLA" "$PY" benchmarks/op_speed.py --device "$DEVICE" "${SHAPE[@]}" \
  --only op-delta fla-delta --out "${TMPDIR:-/tmp}/op_speed-fla-$DEVICE.json"
# 9. issue 14's presets on the chunked torch path on the device (the kernels cover Titans only), Atlas on both of its
#    paths (every momentum formed, what CUDA tensors take; NS in the chunk's row space, the CPU's since session 41):
#    whether the row space should be the GPU's path too. Not in the default plan: GPU_SESSION_PARTS="rules ..."
want rules && step memory_rules_speed "$LIMIT_RULES" "$PY" benchmarks/memory_rules_speed.py --device "$DEVICE" \
  "${RULES_SHAPE[@]}" --rules titans yaad moneta memora atlas-formed atlas-rowspace --out "$OUT/memory_rules_speed-$DEVICE.json"
echo "gpu_session: $([ $status = 0 ] && echo 'every step passed' || echo 'a step failed: see its log') ($OUT)"
exit $status
