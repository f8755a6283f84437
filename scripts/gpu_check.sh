#!/usr/bin/env bash
# One call on a GPU machine: kernel tests compiled for the GPU, the condensed
# kernels' device time against labelled baselines and the floor, whole-model
# latency, and training throughput (the mask update's cost on the device,
# steps/s of real runs).
#
# Usage: scripts/gpu_check.sh OUT_DIR
#
# Sized for one device call of under 8 minutes on one H100 or H200. Every
# stage has a time limit and is cut to what is left before the deadline
# (GPU_CHECK_DEADLINE_S, default 450 s after the start; a stage with under
# 15 s left is skipped); the benchmarks also stop starting new work inside
# their limit, so a stage ends with its JSON written. Estimated times on one
# GPU (this version has not run on one yet: from the previous run's log,
# docs/benchmarks/gpu/gpu_check.log, and the compile counts below):
#   preflight  ~10 s  imports, the GPU backend, nvidia-smi's clocks
#   tests      ~40 s  (limit 60) kernel-vs-reference tests with the Pallas
#                     kernels compiled for the GPU (73 s last time together
#                     with test_convert.py, now opt-in, and the CUDA lowering
#                     tests, which export on the CPU: CI runs them)
#   bench     ~140 s  (limit 150; no new case after limit - 30 s)
#                     srigl_jax.benchmarks.gpu: ceilings (~5 s), then 3072 ->
#                     768 at 90, 99, 80, 95% in that order, batch 1, 16, 256,
#                     2048, fp32 and bf16: 11 impls per batch at the first
#                     sparsity, 8 after (dense once per batch), ~1.5 s each
#                     (a one-call and a 24-call compile, ~0.3 s of timing,
#                     a profiler trace at the first sparsity): ~70 s for 90%,
#                     ~50 s per later sparsity, so the limit covers 90% and
#                     most of 99%; what it cuts is listed in the JSON
#                     (meta.skipped_cases). The rest in a second call:
#                     GPU_CHECK_STAGES=bench GPU_CHECK_LIMIT_BENCH=300
#                     GPU_CHECK_BENCH_ARGS=--sparsities=0.8,0.95
#   grouped   ~50 s  (limit 60) the same benchmark with group-shared fan-in
#                     (G = 16): 3072 -> 768 at 90% and 99%, batch 256 then 1,
#                     the grouped Pallas (TF32, bf16) and XLA kernels against
#                     dense fp32 HIGHEST / TF32 / bf16, structured bf16 and the
#                     per-neuron Pallas bf16 kernel (gpu_bench_grouped.json)
#   model      ~40 s  (limit 50) ResNet-18, then ViT-S/16, at batch 1 and 256:
#                     masked dense vs structured vs condensed (the JSON is
#                     written after each model; ResNet-50's conversion alone
#                     took 19 s last time, so it is left out)
#   profile    ~90 s  (limit 100; no new model/method after limit - 40 s)
#                     train step with and without the mask update: ResNet-18
#                     and ViT-S/16, dense and srigl first, then rigl; ~15-30 s
#                     of compiling each, ~10 s of steps; a profiler trace of
#                     5 steps. If ViT-S is cut, a second call:
#                     GPU_CHECK_STAGES="profile train" GPU_CHECK_TRAIN_MODELS=vit_s16
#   train      rest   (limit 120) trainer runs of 300 steps: dense and srigl
#                     at delta 100 first, then rigl, then delta 20; ~30-45 s
#                     each (the persistent compilation cache shares the
#                     profile's train-step compiles at delta 100)
#   collect    ~5 s   train.json from the profile and the finished runs
# The limits add up to 490 s against the 450 s deadline: the trainer runs get
# what the stages before them leave (about 80 s if the estimates hold: dense
# and srigl at delta 100 for ResNet-18).
# Without a GPU (auto-detected, or GPU_CHECK_TINY=1) the same stages run at
# toy sizes on the CPU (Pallas interpreted; ViT-tiny for training).
#
# Writes into OUT_DIR, at most 8 files (what the device tool brings back):
#   gpu_bench.json  model.json  train.json  status.json  gpu_check.log
#   logs.tar.gz   pytest log and junit XML, each stage's log, profile.json,
#                 the trainer runs' summary.json, metrics.jsonl and logs
#   trace.tar.gz  jax.profiler trace of a few train steps, one with the
#                 mask update (dropped with a warning if over 15 MiB)
# and prints the kernel and training tables last. Exits non-zero if a stage
# failed; later stages still run.
#
# Knobs (environment): PYTHON; GPU_CHECK_STAGES (default "preflight tests bench
# grouped model profile train"; collect always runs); GPU_CHECK_TINY;
# GPU_CHECK_DEADLINE_S; GPU_CHECK_LIMIT_{TESTS,BENCH,GROUPED,MODEL,PROFILE,TRAIN}
# (seconds; the defaults above, x4 at toy sizes);
# GPU_CHECK_WORK (scratch folder, default a temporary one removed at the end);
# GPU_CHECK_EXTRA_TESTS (e.g. tests/test_convert.py); GPU_CHECK_BENCH_ARGS
# (appended to the kernel benchmark's flags); GPU_CHECK_MODELS (model stage);
# GPU_CHECK_TRAIN_MODELS, GPU_CHECK_METHODS, GPU_CHECK_DELTAS (training).
set -u -o pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

STAGES=${GPU_CHECK_STAGES:-"preflight tests bench grouped model profile train"}
if [[ -n "${GPU_CHECK_WORK:-}" ]]; then
  WORK=$(mkdir -p "$GPU_CHECK_WORK" && cd "$GPU_CHECK_WORK" && pwd)
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
  trap 'rm -rf "$WORK"' EXIT
fi
# Compiles shared between stages and processes (and XLA's autotuning results).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$WORK/jax_cache}

BACKEND=$("$PYTHON" -c "import jax; print(jax.default_backend())" 2>/dev/null || echo none)
if [[ -z "${GPU_CHECK_TINY:-}" ]]; then
  if [[ "$BACKEND" == gpu ]]; then GPU_CHECK_TINY=0; else GPU_CHECK_TINY=1; fi
fi
# A CPU compiles the toy sizes slower than a GPU the real ones: default
# limits x4 and an hour's deadline there.
if [[ "$GPU_CHECK_TINY" == 1 ]]; then SCALE=4; else SCALE=1; fi
DEADLINE=${GPU_CHECK_DEADLINE_S:-$((GPU_CHECK_TINY == 1 ? 3600 : 450))}
echo "gpu_check: backend=$BACKEND tiny=$GPU_CHECK_TINY stages='$STAGES' deadline=${DEADLINE}s out=$OUT work=$WORK"

declare -A STATUS=()
left() { echo $((DEADLINE - SECONDS)); }

# Prints the seconds a stage may take: its limit, cut to what is left before
# the deadline; 0 when under 15 s are left (the stage is then skipped).
stage_limit() {
  local limit=$1 rest
  rest=$(($(left) - 5))
  ((rest < limit)) && limit=$rest
  ((limit < 15)) && limit=0
  echo "$limit"
}

run_stage() {  # name, seconds, command...
  local name=$1 limit=$2
  shift 2
  if [[ "$limit" == 0 ]]; then
    STATUS[$name]='"skipped: deadline"'
    echo "gpu_check: stage $name skipped ($(left) s left)"
    return
  fi
  local t0=$SECONDS
  # timeout runs the command in its own process group and signals all of it.
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  STATUS[$name]=$rc
  echo "gpu_check: stage $name rc=$rc in $((SECONDS - t0)) s (limit $limit s)"
}

has_stage() { [[ " $STAGES " == *" $1 "* ]]; }

if has_stage preflight; then
  # Fails fast, before any GPU time is spent, when the image lacks a package
  # the stages import (carry it as a wheel: .library/device/README.md).
  run_stage preflight 120 "$PYTHON" - <<'PY'
import importlib, sys
missing = []
for name in ("jax", "flax", "optax", "orbax.checkpoint", "ml_collections", "absl", "grain",
             "tensorboardX", "matplotlib", "pytest", "srigl_jax"):
  try:
    importlib.import_module(name)
  except Exception as e:  # pylint: disable=broad-except
    missing.append(f"{name} ({type(e).__name__}: {e})")
if missing:
  print("gpu_check: missing packages:\n  " + "\n  ".join(missing))
  sys.exit(3)
import jax
d = jax.devices()[0]
print(f"gpu_check: jax {jax.__version__}, {jax.device_count()} x {d.device_kind} ({d.platform})")
PY
  if [[ "${STATUS[preflight]}" == 3 ]]; then
    echo '{"preflight": 3}' >"$OUT/status.json"
    exit 3
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,clocks.max.sm,temperature.gpu,power.draw \
      --format=csv || true
  fi
fi

if has_stage tests; then
  # The kernel tests pick interpret mode only where there is no GPU.
  run_stage tests "$(stage_limit "${GPU_CHECK_LIMIT_TESTS:-$((60 * SCALE))}")" bash -c "\"$PYTHON\" -m pytest -q -p no:cacheprovider \
    tests/test_condensed.py tests/test_conv_pallas.py tests/test_conv_layer.py \
    ${GPU_CHECK_EXTRA_TESTS:-} --junitxml=\"$WORK/pytest.xml\" 2>&1 | tee \"$WORK/pytest.log\""
fi

if has_stage bench; then
  lim=$(stage_limit "${GPU_CHECK_LIMIT_BENCH:-$((150 * SCALE))}")
  if [[ "$GPU_CHECK_TINY" == 1 ]]; then
    BENCH_ARGS=(--tiny --profile=none --noserialize
                --impls=dense_fp32_highest,structured_fp32_highest,bcsr_fp32,condensed_xla_fp32,condensed_pallas_bf16)
  else
    BENCH_ARGS=(--time-budget-s=$((lim > 60 ? lim - 30 : lim / 2)))
  fi
  run_stage bench "$lim" bash -c "\"$PYTHON\" -m srigl_jax.benchmarks.gpu ${BENCH_ARGS[*]} \
    --json=\"$OUT/gpu_bench.json\" ${GPU_CHECK_BENCH_ARGS:-} 2>&1 | tee \"$WORK/gpu_bench.log\""
fi

if has_stage grouped; then
  # Group-shared fan-in (G = 16) against the same dense baselines, on the
  # tensor cores: 3072 -> 768 at 90% and 99%, batch 256 then 1.
  lim=$(stage_limit "${GPU_CHECK_LIMIT_GROUPED:-$((60 * SCALE))}")
  GROUPED_IMPLS=dense_fp32_highest,dense_fp32_default,dense_bf16,structured_bf16,condensed_pallas_bf16,grouped_pallas_tf32,grouped_pallas_bf16,grouped_xla_fp32,grouped_xla_bf16
  if [[ "$GPU_CHECK_TINY" == 1 ]]; then
    GROUPED_ARGS=(--tiny --profile=none --noserialize --group-size=4
                  --impls=dense_fp32_highest,grouped_xla_fp32,grouped_pallas_bf16)
  else
    GROUPED_ARGS=(--group-size=16 --sparsities=0.9,0.99 --batch-sizes=256,1 --profile=none
                  --impls=$GROUPED_IMPLS --time-budget-s=$((lim > 40 ? lim - 20 : lim / 2)))
  fi
  run_stage grouped "$lim" bash -c "\"$PYTHON\" -m srigl_jax.benchmarks.gpu ${GROUPED_ARGS[*]} \
    --json=\"$OUT/gpu_bench_grouped.json\" 2>&1 | tee \"$WORK/gpu_bench_grouped.log\""
fi

if has_stage model; then
  # Whole models: masked dense vs structured vs condensed (Pallas on a GPU).
  if [[ "$GPU_CHECK_TINY" == 1 ]]; then
    MODEL_ARGS=(--model=cnn --batch-sizes=1,8 --repeats=3 --budget-s=2)
  else
    MODEL_ARGS=(--model="${GPU_CHECK_MODELS:-resnet18,vit_s16}" --batch-sizes=1,256 --repeats=10 --budget-s=3)
  fi
  run_stage model "$(stage_limit "${GPU_CHECK_LIMIT_MODEL:-$((50 * SCALE))}")" bash -c "\"$PYTHON\" -m srigl_jax.benchmarks.model \
    ${MODEL_ARGS[*]} --json \"$OUT/model.json\" 2>&1 | tee \"$WORK/model.log\""
fi

if [[ "$GPU_CHECK_TINY" == 1 ]]; then
  TRAIN_ARGS=(--models="${GPU_CHECK_TRAIN_MODELS:-vit_tiny}" --methods="${GPU_CHECK_METHODS:-dense,srigl}"
              --deltas="${GPU_CHECK_DELTAS:-10}")
  PROFILE_ARGS=(--steps=2 --rounds=1)
  RUN_ARGS=(--run_estimate_s=0)
else
  TRAIN_ARGS=(--models="${GPU_CHECK_TRAIN_MODELS:-resnet18,vit_s16}"
              --methods="${GPU_CHECK_METHODS:-dense,srigl,rigl}" --deltas="${GPU_CHECK_DELTAS:-100,20}")
  PROFILE_ARGS=(--steps=20 --rounds=5)
  RUN_ARGS=(--run_estimate_s=40)
fi

if has_stage profile; then
  lim=$(stage_limit "${GPU_CHECK_LIMIT_PROFILE:-$((100 * SCALE))}")
  run_stage profile "$lim" bash -c "\"$PYTHON\" -m srigl_jax.benchmarks.train_step --profile \
    ${TRAIN_ARGS[*]} ${PROFILE_ARGS[*]} --time_budget_s=$((lim > 60 ? lim - 40 : lim / 2)) \
    --trace_dir=\"$WORK/trace\" --json=\"$WORK/profile.json\" 2>&1 | tee \"$WORK/profile.log\""
fi

if has_stage train; then
  lim=$(stage_limit "${GPU_CHECK_LIMIT_TRAIN:-$((120 * SCALE))}")
  mkdir -p "$WORK/runs"
  run_stage train "$lim" bash -c "\"$PYTHON\" -m srigl_jax.benchmarks.train_step --runs \
    ${TRAIN_ARGS[*]} ${RUN_ARGS[*]} --time_budget_s=$((lim > 20 ? lim - 10 : lim)) \
    --workdir=\"$WORK/runs\" --profile_json=\"$WORK/profile.json\" --json=\"$OUT/train.json\" \
    2>&1 | tee \"$WORK/train.log\""
fi

# train.json from whatever the profile and the runs left (reads files only).
run_stage collect 60 "$PYTHON" -m srigl_jax.benchmarks.train_step --collect "${TRAIN_ARGS[@]}" \
  --workdir="$WORK/runs" --profile_json="$WORK/profile.json" --json="$OUT/train.json" \
  >"$WORK/collect.log" 2>&1

# Logs (no checkpoints, no compilation cache) and the trace, one archive each.
(cd "$WORK" && find . -path ./jax_cache -prune -o -path ./trace -prune -o -path '*/checkpoints' -prune \
  -o \( -name '*.log' -o -name '*.json' -o -name '*.jsonl' -o -name '*.xml' \) -type f -print0 |
  tar --null -czf "$OUT/logs.tar.gz" -T -)
if [[ -d "$WORK/trace" ]]; then
  tar -czf "$OUT/trace.tar.gz" -C "$WORK" trace
  if (($(stat -c %s "$OUT/trace.tar.gz") > 15 * 1024 * 1024)); then
    echo "gpu_check: WARNING trace.tar.gz is over 15 MiB (the device tool brings back 16); removed"
    rm -f "$OUT/trace.tar.gz"
  fi
fi

{
  echo "{"
  sep=""
  for name in "${!STATUS[@]}"; do
    printf '%s  "%s": %s' "$sep" "$name" "${STATUS[$name]}"
    sep=$',\n'
  done
  printf '\n}\n'
} >"$OUT/status.json"

# The tables last: what the device tool's reply shows.
for table in gpu_bench gpu_bench_grouped; do
  if [[ -f "$OUT/$table.json" ]]; then
    "$PYTHON" -m srigl_jax.benchmarks.gpu --table-from="$OUT/$table.json" 2>/dev/null
  fi
done
cat "$WORK/collect.log"
echo "gpu_check: status $(tr -d '\n ' <"$OUT/status.json") in $SECONDS s"
for rc in "${STATUS[@]}"; do
  [[ "$rc" == 0 || "$rc" == '"skipped: deadline"' ]] || exit 1
done
exit 0
