#!/usr/bin/env bash
# The GPU check: GPU tests, the one-shot tuner, both benchmark suites and the report, in one go, on one GPU.
#
#   benchmarks/gpu_check.sh OUTDIR [--quick] [--dry-run]
#
# Full run < 10 minutes on one H100/H200 at worst, compiles included (--quick: about 6 minutes); the plan
# prints its worst case. The tuner (python -m benchmarks.tune) runs after the GPU tests and before the
# model benchmarks, which then read its table through FASTRES_CONFIG_DIR. Uses only the machine's python3 with its
# own torch (>= 2.11) and triton (>= 3.6); installs nothing, needs no network. fastres is imported
# from this source tree: the benchmark scripts call benchmarks/_bootstrap.py, which registers
# repo/kernels as fastres.kernels when fastres is not installed, and pytest loads the same module as
# a plugin (-p benchmarks._bootstrap). Every step has a time budget and a hard timeout; a step that
# times out still writes what it measured.
#
# OUTDIR receives few files (a GPU machine returns at most 8): gpu_check.log (everything printed),
# results.json (all runs combined), report.md, kernels_speedup.png, models_throughput.png,
# roofline.png, host_overhead_cuda_gpu.json (host work, batch-1 latency plain and graphed) and the tuned
# table <arch>.json (8 files, the most a GPU machine returns; each well under 16 MiB; the table is copied
# after every benchmark step too, so a killed run still returns what the tuner wrote); results.json is
# rewritten after every benchmark step. The last thing printed is a short summary table.
# --dry-run: print the plan (the tuner's included) and check that everything imports, on the CPU; runs no
# benchmark.
set -uo pipefail

usage() { echo "usage: $0 OUTDIR [--quick] [--dry-run]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
QUICK=0; DRY=0
for a in "$@"; do
  case $a in --quick) QUICK=1 ;; --dry-run) DRY=1 ;; *) usage ;; esac
done
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
TUNED=$WORK/configs  # the tuner's table: its own folder, as report.py reads every JSON in $WORK
trap 'rm -rf "$WORK"' EXIT
LOG=$OUT/gpu_check.log
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
if git -C "$REPO" rev-parse HEAD >/dev/null 2>&1; then
  export FASTRES_GIT_SHA=$(git -C "$REPO" rev-parse HEAD)
fi

# Budgets in seconds. Each python step gets a hard `timeout -k KILL_S` (TERM, then KILL after KILL_S
# s: a process stuck in a CUDA call never runs its TERM handler) of budget + slack; the benchmark
# scripts rewrite their JSON after every group, so a killed step still leaves its data, and results.json
# is recombined after every step. Worst case, every step at its hard timeout plus KILL_S, is printed
# below and must stay under 600 s (tests/test_bench_smoke.py checks the dry run). The count behind
# each number is in benchmarks/README.md ("Budget of the GPU check").
KILL_S=10; T_REPORT=20; T_START=10
if [ $QUICK = 1 ]; then
  T_TESTS=60; TEST_SEL=(tests/test_gpu.py -m gpu)
  B_TUNE=40; S_TUNE=10; TUNE_ARGS=(--models resnet50 --batches 1,32 --dtypes fp16)
  B_KERN=25; S_KERN=15; B_MODEL=70; S_MODEL=20; T_COLD=0; T_ROOF=20; T_HOST=35
  ROOF_ARGS=(--models resnet50 --batches 1,32)
  KERN_ARGS=(--models resnet50 --batches 32 --dtypes fp16 --providers fastres,eager,cudnn_fused --rep-ms 40)
  MODEL_ARGS=(--models resnet50 --batches 1,32 --dtypes fp16 --rep-ms 100)
else
  T_TESTS=100; TEST_SEL=(tests -m "gpu or cuda_ok")
  # The tuner: ResNet-50's 24 launch shapes by FLOP share, b1/32/256, fp16 then bf16, every tactic.
  B_TUNE=135; S_TUNE=15; TUNE_ARGS=(--models resnet50 --batches 1,32,256 --dtypes fp16,bf16)
  # Per-layer kernels shrank to fastres/eager/cuDNN first (the tuner's table has every tactic's and
  # cuDNN's time per layer); the cold start left the 10 minutes for the tuner (run it on its own).
  B_KERN=30; S_KERN=15; B_MODEL=135; S_MODEL=20; T_COLD=0; T_ROOF=15
  # Host work and batch-1 latency, plain vs CUDA-graphed (issue 10): kernels cached by the steps before.
  T_HOST=35
  ROOF_ARGS=(--models resnet18,resnet50,resnet101,resnet152 --batches 1,32,256)
  KERN_ARGS=(--models resnet50,resnet18,resnet101 --batches 32,256 --dtypes fp16,bf16,tf32 --rep-ms 50)
  # First ResNet-50 fp16 at batch 1/32/256 with every provider; wider groups only with budget left.
  MODEL_ARGS=(--models resnet50,resnet18,resnet101,resnet152 --batches 1,32,256 --dtypes fp16,bf16 --rep-ms 100)
fi
WORST=$((T_START + T_TESTS + KILL_S + B_TUNE + S_TUNE + KILL_S + B_MODEL + S_MODEL + KILL_S
         + B_KERN + S_KERN + KILL_S + T_HOST + KILL_S + T_ROOF + KILL_S + T_REPORT + 4 * 2))
[ $T_COLD -gt 0 ] && WORST=$((WORST + T_COLD + KILL_S))
# pytest-xdist (on the GPU machine): 8 workers compile in parallel; serial otherwise.
if "$PY" -c "import xdist" 2>/dev/null; then XDIST=(-n 8); else XDIST=(); fi

step() { echo; echo "== $* =="; }
run() {  # run CMD..., echo it first; in --dry-run only echo it
  echo "+ $*"
  [ $DRY = 1 ] && return 0
  "$@"
}

step "gpu_check $(date -u +%FT%TZ) quick=$QUICK dry_run=$DRY out=$OUT"
"$PY" - <<'PYEOF'
import torch, triton
print(f"python3 torch {torch.__version__} triton {triton.__version__} cuda {torch.version.cuda} "
      f"gpu {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
PYEOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

if [ $DRY = 1 ]; then
  step "dry run: import check (CPU, interpreter)"
  TRITON_INTERPRET=1 "$PY" - <<'PYEOF' || exit 1
from benchmarks._bootstrap import ensure_fastres
how = ensure_fastres()
import fastres, fastres.ops, fastres.kernels.conv, fastres.kernels.tuning, fastres.tuning  # noqa: E401,F401
from benchmarks import bench_kernels, bench_models, cold_start, kernel_report, report, roofline, shapes, smoke, tune  # noqa: F401,E501
print(f"imports OK (fastres {how}: {fastres.__file__})")
PYEOF
  TRITON_INTERPRET=1 "$PY" -m pytest -p benchmarks._bootstrap "${TEST_SEL[@]}" --collect-only -q 2>&1 | tail -2
  step "dry run: the tuner's plan (budget ${B_TUNE}s)"
  "$PY" -m benchmarks.tune "${TUNE_ARGS[@]}" --budget-s "$B_TUNE" --dry-run || exit 1
fi
echo "plan: worst case ${WORST} s (every step at its hard timeout + ${KILL_S} s kill grace; limit 600 s)"
echo "pytest workers: ${XDIST[*]:-serial (no pytest-xdist)}"

# results.json from whatever the steps have written so far (cheap: no plots); the tuned table beside it.
combine() {
  [ $DRY = 1 ] && return 0
  cp "$TUNED"/*.json "$OUT"/ 2>/dev/null
  INPUTS=$(ls "$WORK"/*.json 2>/dev/null) || return 0
  # shellcheck disable=SC2086
  timeout -k 2 2 "$PY" -m benchmarks.report $INPUTS --combine "$OUT/results.json" --no-render >/dev/null 2>&1
}

STATUS=0
step "GPU tests (timeout ${T_TESTS}s)"
run timeout -k "$KILL_S" -s TERM "$T_TESTS" "$PY" -m pytest -p benchmarks._bootstrap "${TEST_SEL[@]}" \
  "${XDIST[@]}" -q -rfE -p no:cacheprovider --durations=15
TESTS_RC=$?
[ $DRY = 1 ] || echo "GPU tests exit code: $TESTS_RC"

# The model and kernel benchmarks read the tuned table through FASTRES_CONFIG_DIR, before the shipped one.
step "one-shot tuner (budget ${B_TUNE}s)"
run timeout -k "$KILL_S" -s TERM $((B_TUNE + S_TUNE)) "$PY" -m benchmarks.tune "${TUNE_ARGS[@]}" \
  --budget-s "$B_TUNE" --out "$TUNED" || STATUS=1
if [ $DRY = 1 ] || ls "$TUNED"/*.json >/dev/null 2>&1; then
  export FASTRES_CONFIG_DIR=$TUNED
  echo "FASTRES_CONFIG_DIR=$TUNED: the benchmarks below use the tuned table"
  combine
else
  echo "the tuner wrote no table: the benchmarks below use the shipped one"
fi

step "whole models (budget ${B_MODEL}s)"
run timeout -k "$KILL_S" -s TERM $((B_MODEL + S_MODEL)) "$PY" -m benchmarks.bench_models "${MODEL_ARGS[@]}" \
  --budget "$B_MODEL" --out "$WORK/models.json" || STATUS=1
combine

step "host work and batch-1 latency (timeout ${T_HOST}s)"
# ResNet-50 fp16 batch 1, 224²: enqueue µs per forward, latency plain and graphed (goal: plain <= 1.3x).
run timeout -k "$KILL_S" -s TERM "$T_HOST" "$PY" benchmarks/host_overhead.py --cuda --label gpu \
  --out "$OUT" || STATUS=1

step "per-layer kernels (budget ${B_KERN}s)"
run timeout -k "$KILL_S" -s TERM $((B_KERN + S_KERN)) "$PY" -m benchmarks.bench_kernels "${KERN_ARGS[@]}" \
  --budget "$B_KERN" --out "$WORK/kernels.json" || STATUS=1
combine

if [ $T_COLD -gt 0 ]; then
  # Empty Triton cache, then the cache it filled: convert → first correct output, ResNet-50 b32 fp16.
  # torch.compile's first compile on this fresh machine is in the model suite's cold_start_s.
  step "cold and warm start (timeout ${T_COLD}s)"
  run timeout -k "$KILL_S" -s TERM "$T_COLD" "$PY" -m benchmarks.cold_start --arch resnet50 --batch 32 \
    --dtype fp16 --providers fastres --timeout 32 --out "$WORK/cold_start.json" || STATUS=1
  combine
fi

step "launch-and-bytes model"
run timeout -k "$KILL_S" -s TERM "$T_ROOF" "$PY" -m benchmarks.roofline "${ROOF_ARGS[@]}" \
  --out "$WORK/roofline.json" || STATUS=1

step "report"
if [ $DRY = 1 ]; then
  run "$PY" -m benchmarks.report "$WORK"/*.json --combine "$OUT/results.json" --out-dir "$OUT" --summary
  echo "dry run done: nothing measured"
  exit 0
fi
INPUTS=$(ls "$WORK"/*.json 2>/dev/null)
if [ -z "$INPUTS" ]; then
  echo "no benchmark JSON was written"; exit 1
fi
# shellcheck disable=SC2086
timeout -k 5 -s TERM "$T_REPORT" "$PY" -m benchmarks.report $INPUTS --combine "$OUT/results.json" \
  --out-dir "$OUT" --summary || STATUS=1
echo "GPU tests: $([ $TESTS_RC = 0 ] && echo passed || echo "FAILED (exit $TESTS_RC)")"
ls -1 "$OUT"
[ $TESTS_RC = 0 ] || STATUS=1
exit $STATUS
