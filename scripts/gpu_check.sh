#!/usr/bin/env bash
# One-shot GPU check: kernel tests, condensed benchmark, short training runs.
#
# Usage: scripts/gpu_check.sh OUT_DIR
#
# On a GPU machine (about 6-7 minutes on one GPU):
#   1. pytest of the kernel-vs-reference tests, the Pallas kernel compiled
#      for the GPU (not interpreted), and of the CUDA lowering tests;
#   2. the condensed layer benchmark (3072 -> 768), fp32 and bf16: condensed
#      Pallas/XLA against dense at default precision, BCSR and structured,
#      with the weights cycled through copies larger than the GPU's L2;
#   3. whole models (ResNet-50, ViT-S/16, ResNet-18 at batch 1/64/256):
#      masked dense vs structured vs condensed (model.json);
#   4. ResNet-18 on synthetic CIFAR-shaped data, a few hundred steps with a
#      mask update every GPU_CHECK_UPDATE_EVERY steps, for srigl, rigl and
#      dense; steps/s from each run's summary.json.
# Without a GPU (auto-detected, or GPU_CHECK_TINY=1) it runs the same stages
# on the CPU with tiny sizes: Pallas in interpret mode, a small benchmark, and
# the Fashion-MNIST MLP for a few steps instead of ResNet-18.
#
# Writes into OUT_DIR: pytest.log, pytest.xml, condensed_fp32.json,
# condensed_bf16.json (+ .log), model.json, train_<method>/ workdirs, train.json
# (steps/s per method) and status.json (exit status of every stage). Exits
# non-zero if any stage failed; later stages still run.
#
# Knobs (environment): PYTHON, GPU_CHECK_STAGES (default "tests bench model train";
# "collect" alone only rebuilds train.json from existing runs),
# GPU_CHECK_TINY, GPU_CHECK_DTYPES (default "float32 bfloat16"),
# GPU_CHECK_STEPS, GPU_CHECK_UPDATE_EVERY, GPU_CHECK_MODELS, GPU_CHECK_EXTRA_TESTS
# (default tests/test_convert.py), and per-stage time limits in seconds
# GPU_CHECK_LIMIT_{TESTS,BENCH,MODEL,TRAIN}.
set -u -o pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
fi
STAGES=${GPU_CHECK_STAGES:-"tests bench model train"}

BACKEND=$("$PYTHON" -c "import jax; print(jax.default_backend())" 2>/dev/null || echo none)
if [[ -z "${GPU_CHECK_TINY:-}" ]]; then
  if [[ "$BACKEND" == gpu ]]; then GPU_CHECK_TINY=0; else GPU_CHECK_TINY=1; fi
fi
echo "gpu_check: backend=$BACKEND tiny=$GPU_CHECK_TINY stages='$STAGES' out=$OUT"

declare -A STATUS=()
run_stage() {  # name, timeout seconds, command...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  STATUS[$name]=$rc
  echo "gpu_check: stage $name rc=$rc in $((SECONDS - t0)) s"
}

if [[ " $STAGES " == *" tests "* ]]; then
  # The kernel tests pick interpret mode only where there is no GPU.
  run_stage tests "${GPU_CHECK_LIMIT_TESTS:-240}" bash -c "\"$PYTHON\" -m pytest -q -p no:cacheprovider \
    tests/test_condensed.py tests/test_conv_pallas.py tests/test_conv_layer.py \
    ${GPU_CHECK_EXTRA_TESTS-tests/test_convert.py} tests/test_gpu_lowering.py \
    --junitxml=\"$OUT/pytest.xml\" 2>&1 | tee \"$OUT/pytest.log\""
fi

if [[ " $STAGES " == *" bench "* ]]; then
  if [[ "$GPU_CHECK_TINY" == 1 ]]; then
    BENCH_ARGS=(--in-features 96 --out-features 40 --sparsities 0.9 --batch-sizes 1,16 --cache-bytes 65536
                --repeats 3 --budget 0 --impls dense,bcsr,structured,condensed_xla,condensed_native)
  else
    # 64 MiB of weight copies per impl is more than any current GPU's L2.
    BENCH_ARGS=(--repeats 50 --budget 1.5 --cache-bytes 67108864)
  fi
  for dtype in ${GPU_CHECK_DTYPES:-float32 bfloat16}; do
    short=${dtype/float32/fp32}
    short=${short/bfloat16/bf16}
    run_stage "bench_$short" "${GPU_CHECK_LIMIT_BENCH:-150}" bash -c "\"$PYTHON\" -m srigl_jax.benchmarks.condensed \
      --dtype $dtype ${BENCH_ARGS[*]} --json \"$OUT/condensed_$short.json\" \
      2>&1 | tee \"$OUT/condensed_$short.log\""
  done
fi

if [[ " $STAGES " == *" model "* ]]; then
  # Whole models: masked dense vs structured vs condensed (Pallas on a GPU).
  if [[ "$GPU_CHECK_TINY" == 1 ]]; then
    MODEL_ARGS=(--model=cnn --batch-sizes=1,8 --repeats=3 --budget-s=2)
  else
    MODEL_ARGS=(--model="${GPU_CHECK_MODELS:-resnet50,vit_s16,resnet18}" --batch-sizes=1,64,256 --repeats=20 --budget-s=10)
  fi
  run_stage model "${GPU_CHECK_LIMIT_MODEL:-200}" bash -c "\"$PYTHON\" -m srigl_jax.benchmarks.model ${MODEL_ARGS[*]} \
    --json \"$OUT/model.json\" 2>&1 | tee \"$OUT/model.log\""
fi

if [[ " $STAGES " == *" train "* ]]; then
  if [[ "$GPU_CHECK_TINY" == 1 ]]; then
    CONFIG=configs/fashion_mnist.py
    STEPS=${GPU_CHECK_STEPS:-20}
    EVERY=${GPU_CHECK_UPDATE_EVERY:-5}
    EXTRA=(--config.input.num_train_examples=512)
  else
    CONFIG=configs/cifar10_resnet18.py
    STEPS=${GPU_CHECK_STEPS:-200}
    EVERY=${GPU_CHECK_UPDATE_EVERY:-40}
    EXTRA=(--config.input.num_train_examples=4096)
  fi
  for method in srigl rigl dense; do
    run_stage "train_$method" "${GPU_CHECK_LIMIT_TRAIN:-150}" "$PYTHON" -m srigl_jax.main \
      --config="$CONFIG:method=$method" --workdir="$OUT/train_$method" \
      --config.input.name=synthetic "${EXTRA[@]}" \
      --config.input.num_eval_examples=128 --config.eval_batch_size=128 \
      --config.num_train_steps="$STEPS" --config.sparsity.update_every="$EVERY" \
      --config.log_every="$EVERY" --config.write_plots=False --config.export=False \
      >"$OUT/train_$method.log" 2>&1
  done
  STAGES="$STAGES collect"
fi

if [[ " $STAGES " == *" collect "* ]]; then
  # train.json: steps/s of every train_<method>/summary.json under OUT_DIR.
  run_stage collect 60 "$PYTHON" - "$OUT" "$BACKEND" <<'PY'
import json, pathlib, sys

out, backend = pathlib.Path(sys.argv[1]), sys.argv[2]
runs = {}
for summary in sorted(out.glob("train_*/summary.json")):
  s = json.loads(summary.read_text())
  runs[summary.parent.name[len("train_"):]] = {
      k: s.get(k) for k in ("steps_per_sec", "final_step", "model", "method",
                            "global_sparsity", "eval_accuracy", "global_batch_size")}
missing = [m for m in ("srigl", "rigl", "dense") if (out / f"train_{m}").exists() and m not in runs]
(out / "train.json").write_text(json.dumps({"backend": backend, "runs": runs}, indent=1))
for m, r in runs.items():
  print(f"train {m}: {r['steps_per_sec']} steps/s ({r['model']}, {r['final_step']} steps)")
sys.exit(1 if missing else 0)
PY
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
cat "$OUT/status.json"
for rc in "${STATUS[@]}"; do
  [[ "$rc" == 0 ]] || exit 1
done
exit 0
