r"""Training throughput: the mask update's cost on the device, and steps/s of real runs.

    python -m srigl_jax.benchmarks.train_step --profile --json profile.json
    python -m srigl_jax.benchmarks.train_step --runs --workdir=W \
        --profile_json=profile.json --json=train.json

Models and recipes come from configs/gpu_throughput.py (generated data):
ResNet-18 with the CIFAR-10 recipe and ViT-S/16 with the ViT-B/16 ImageNet
recipe, each trained with srigl, rigl and dense.

``--profile``: in this process, the train step the trainer jits (same
shardings, donation), fed device-resident random batches, timed over
``--steps`` back-to-back steps per round (one wait at the end, as the
trainer runs them; median of ``--rounds``): with the mask update not due and
with it due at every step (the optimizer's step count pinned before each
step to a value where ``lax.cond`` takes the update branch, or not). The
step time at update period delta follows: ``((delta - 1) * t_no_update +
t_update) / delta``, against dense's step. On a GPU the same K steps are
also read from a profiler trace (device busy time per step). ``--trace_dir``
keeps a profiler trace of a few steps of the first sparse method, one of
them with the update (for TensorBoard or Perfetto).

``--runs``: ``python -m srigl_jax.main`` as subprocesses (this process never
starts a backend, so the runs have the device to themselves), for each
model: dense, then each method at each delta, in the order of `run_order`,
while ``--time_budget_s`` lasts; steps/s from each run's summary.json. The
trainer's steps/s leaves out evals, checkpoints and its per-update statistics.
``--json`` gets the profile (``--profile_json``) and the runs together, with
SRigL's step time over dense's at the first delta: the target is within 5%.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time
import types
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from srigl_jax import timing
from srigl_jax.sparsity import transform as sparse_transform
from srigl_jax.training import build as build_lib
from srigl_jax.training.steps import make_train_step

CONFIG_FILE = pathlib.Path(__file__).resolve().parents[2] / "configs" / "gpu_throughput.py"
TARGET = 1.05  # SRigL's step time over dense's at the first delta.


def load_config(config_file: str, model: str, method: str, update_every: int):
  """`get_config('model=...,method=...')` of ``config_file``, with delta set."""
  spec = importlib.util.spec_from_file_location("_throughput_config", config_file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(f"model={model},method={method}")
  config.sparsity.update_every = update_every
  return config


def step_time_at(delta: int, no_update: float, update: float) -> float:
  """Mean step time when one step in ``delta`` runs the mask update."""
  return ((delta - 1) * no_update + update) / delta


def _pin_count(state, count: int):
  """The state with the sparse optimizer's step count set to ``count``."""
  is_sparse = lambda x: isinstance(x, sparse_transform.SparseState)
  opt_state = jax.tree.map(
      lambda s: s._replace(count=jnp.asarray(count, s.count.dtype)) if is_sparse(s) else s,
      state.opt_state,
      is_leaf=is_sparse,
  )
  return state.replace(opt_state=opt_state)


def profile_method(config, steps: int, rounds: int, trace_dir: str | None = None) -> dict[str, Any]:
  """Times the train step of one config with the mask update not due and due.

  Returns:
    ``no_update_ms`` and, for a dynamic sparse method, ``update_ms`` (per
    step, medians of the rounds), the profiler's busy times where there is a
    device plane, the batch size and the update period.
  """
  run = build_lib.build(config, n_devices=1, open_dataset=False)
  run.learning_rate.set_steps_per_epoch(
      max(1, config.input.num_train_examples // config.batch_size)
  )
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  state_sharding = jax.tree.map(lambda _: replicated, run.abstract_state)
  # As the trainer jits it (training.loop.Trainer.create).
  train_step = jax.jit(
      make_train_step(run.model, config, run.dropout_key, batch_sharding),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, replicated),
      donate_argnums=(0,),
  )
  state = jax.jit(run.init, out_shardings=state_sharding)(run.init_key)
  rng = np.random.default_rng(0)
  b = int(config.batch_size)
  batches = [
      jax.device_put(
          {
              "image": rng.standard_normal((b, *run.image_shape)).astype(np.float32),
              "label": rng.integers(0, run.num_classes, b).astype(np.int32),
          },
          batch_sharding,
      )
      for _ in range(2)
  ]
  dynamic = config.sparsity.method in ("srigl", "rigl", "set", "srigl_noablation")
  delta = int(config.sparsity.update_every)
  # step = count + 1 runs the update when step % delta == 0 (and step < T_end).
  counts = {"no_update": 1 if delta > 2 else None}
  if dynamic:
    counts["update"] = delta - 1
  holder = [state]

  def k_steps(count, k):
    for i in range(k):
      s = holder[0] if count is None else _pin_count(holder[0], count)
      holder[0], _ = train_step(s, batches[i % 2])
    return holder[0].step

  fns = {name: functools.partial(k_steps, count, steps) for name, count in counts.items()}
  res = timing.time_interleaved(fns, budget_s=0.0, max_rounds=rounds, min_rounds=rounds, warmup=1)
  out: dict[str, Any] = {
      "batch_size": b,
      "update_every": delta,
      "params": run.num_params,
      "steps_per_round": steps,
      "rounds": res.rounds,
  }
  for name in counts:
    out[f"{name}_ms"] = res.median_us(name) / steps / 1e3
    seen = timing.trace_device_time(fns[name], steps)
    out[f"{name}_device_busy_ms"] = seen and seen["busy_us"] / 1e3
  if trace_dir and dynamic:
    # A few steps, the third with the mask update, for a trace viewer.
    with jax.profiler.trace(trace_dir):
      for i, count in enumerate((1, 1, delta - 1, 1, 1)):
        with jax.profiler.StepTraceAnnotation("train_step", step_num=i):
          holder[0], _ = train_step(_pin_count(holder[0], count), batches[i % 2])
      jax.block_until_ready(holder[0].step)
  return out


def derive(profile: dict[str, dict[str, dict]], deltas: Sequence[int]) -> dict:
  """Per model and method: step time and steps/s at each delta, and the ratio to dense."""
  out = {}
  for model, methods in profile.items():
    dense = methods.get("dense", {}).get("no_update_ms")
    out[model] = {}
    for method, p in methods.items():
      for delta in deltas if "update_ms" in p else [None]:
        t = (
            p["no_update_ms"]
            if delta is None
            else step_time_at(delta, p["no_update_ms"], p["update_ms"])
        )
        key = method if delta is None else f"{method}_d{delta}"
        out[model][key] = {
            "step_ms": t,
            "steps_per_sec": 1e3 / t,
            "vs_dense": t / dense if dense else None,
        }
  return out


def run_order(models: Sequence[str], methods: Sequence[str], deltas: Sequence[int]) -> list:
  """The trainer runs, most wanted first: ``(model, method, delta or None)``.

  Dense and SRigL at the first delta for every model, then RigL there, then
  the other deltas.
  """
  tiers: list[list] = [[], [], []]
  for model in models:
    for method in methods:
      if method == "dense":
        tiers[0].append((model, method, None))
        continue
      for i, delta in enumerate(deltas):
        tier = 2 if i else (0 if method == "srigl" else 1)
        tiers[tier].append((model, method, delta))
  return [r for tier in tiers for r in tier]


def run_name(model: str, method: str, delta: int | None) -> str:
  """The workdir name of one trainer run."""
  return f"train_{model}_{method}" + ("" if delta is None else f"_d{delta}")


def collect(
    workdir: str | None, profile: dict | None, models: Sequence[str], deltas: Sequence[int]
) -> dict:
  """The profile, its derived step times and every finished run's steps/s, with the target.

  Args:
    workdir: holds the runs' workdirs (`run_name`), or None.
    profile: the result of ``--profile``, or None.
    models: the config's model names the target is computed for.
    deltas: the update periods; the target's is the first.

  Returns:
    ``runs`` (name -> steps/s, steps, ...), the profile's fields with
    ``derived`` (see `derive`), and ``srigl_vs_dense``: per model SRigL's
    step time over dense's at the first delta from the profile
    (``profile_ratio``) and from the runs (``run_ratio``), and whether each
    is within 5%.
  """
  runs = {}
  summaries = sorted(pathlib.Path(workdir).glob("train_*/summary.json")) if workdir else []
  for summary in summaries:
    s = json.loads(summary.read_text())
    runs[summary.parent.name] = {
        k: s.get(k) for k in ("steps_per_sec", "final_step", "model", "method", "global_sparsity")
    }
  result: dict[str, Any] = {"runs": runs}
  target = {}
  if profile:
    result.update(profile)
    derived = derive(profile["models"], deltas)
    result["derived"] = derived
    for model, d in derived.items():
      key = f"srigl_d{deltas[0]}"
      if key in d and d[key]["vs_dense"]:
        target.setdefault(model, {})["profile_ratio"] = d[key]["vs_dense"]
  for model in models:
    dense = runs.get(run_name(model, "dense", None), {}).get("steps_per_sec")
    srigl = runs.get(run_name(model, "srigl", deltas[0]), {}).get("steps_per_sec")
    if dense and srigl:
      target.setdefault(model, {})["run_ratio"] = dense / srigl
  for t in target.values():
    t["within_5pct"] = all(v <= TARGET for k, v in t.items() if k.endswith("ratio"))
  result["srigl_vs_dense"] = {"delta": deltas[0], "target": TARGET, "models": target}
  return result


def print_table(result: dict) -> None:
  """Step times (profile) and steps/s (runs), SRigL against dense last."""
  for model, d in result.get("derived", {}).items():
    p = result["models"][model]
    cells = [f"{k} {v['step_ms']:.2f} ms" for k, v in d.items()]
    print(f"profile {model}: " + ", ".join(cells))
    for method, m in p.items():
      if "update_ms" in m:
        print(
            f"  {method}: step {m['no_update_ms']:.2f} ms, with the mask update "
            f"{m['update_ms']:.2f} ms (device busy {m.get('no_update_device_busy_ms')} / "
            f"{m.get('update_device_busy_ms')} ms)"
        )
  for name, r in result["runs"].items():
    print(f"run {name}: {r['steps_per_sec']} steps/s ({r['final_step']} steps)")
  s = result["srigl_vs_dense"]
  for model, t in s["models"].items():
    ratios = ", ".join(f"{k} {v:.3f}" for k, v in t.items() if k.endswith("ratio"))
    print(
        f"SRigL / dense step time, {model}, delta {s['delta']}: {ratios} "
        f"({'within' if t['within_5pct'] else 'NOT within'} 5%)"
    )


def define_flags(fv: flags.FlagValues) -> flags.FlagValues:
  """Defines this benchmark's command-line flags on ``fv``; returns it."""
  flags.DEFINE_list("models", ["resnet18", "vit_s16"], "Models of the config.", flag_values=fv)
  flags.DEFINE_list("methods", ["dense", "srigl", "rigl"], "Methods.", flag_values=fv)
  flags.DEFINE_list(
      "deltas", ["100", "20"], "Mask update periods; the first is the target's.", flag_values=fv
  )
  flags.DEFINE_string("config_file", str(CONFIG_FILE), "The throughput config.", flag_values=fv)
  flags.DEFINE_bool(
      "profile", False, "Time train steps with and without the update.", flag_values=fv
  )
  flags.DEFINE_integer("steps", 20, "Back-to-back steps per timed round.", flag_values=fv)
  flags.DEFINE_integer("rounds", 5, "Timed rounds (median).", flag_values=fv)
  flags.DEFINE_string(
      "trace_dir", None, "Keep a profiler trace of a few steps here.", flag_values=fv
  )
  flags.DEFINE_bool("runs", False, "Train with srigl_jax.main in subprocesses.", flag_values=fv)
  flags.DEFINE_string(
      "workdir", None, "Where the runs' workdirs go (--runs, --collect).", flag_values=fv
  )
  flags.DEFINE_integer(
      "run_steps", None, "Steps of each run (default: the config's).", flag_values=fv
  )
  flags.DEFINE_float(
      "time_budget_s",
      0.0,
      "Start no new profile or run after this many seconds (0: no limit).",
      flag_values=fv,
  )
  flags.DEFINE_float(
      "run_estimate_s",
      45.0,
      "A run's expected length: none starts with less time left.",
      flag_values=fv,
  )
  flags.DEFINE_string(
      "profile_json", None, "The profile to merge into --json (--runs, --collect).", flag_values=fv
  )
  flags.DEFINE_bool("collect", False, "Only merge the profile and finished runs.", flag_values=fv)
  flags.DEFINE_string("json", None, "Write the result here.", flag_values=fv)
  return fv


def _profile(opts) -> dict:
  result = {
      "device_kind": jax.devices()[0].device_kind,
      "platform": jax.devices()[0].platform,
      "jax_version": jax.__version__,
      "deltas": opts.deltas,
      "models": {},
  }
  traced = False
  start = time.perf_counter()
  # Dense and SRigL of every model before RigL: the target needs those.
  for model, method, _ in run_order(opts.models, opts.methods, opts.deltas[:1]):
    models = result["models"].setdefault(model, {})
    if opts.time_budget_s and time.perf_counter() - start > opts.time_budget_s:
      result.setdefault("skipped", []).append(f"{model} {method}")
      continue
    config = load_config(opts.config_file, model, method, opts.deltas[0])
    trace = opts.trace_dir if not traced and method != "dense" else None
    traced = traced or bool(trace)
    t0 = time.perf_counter()
    p = profile_method(config, opts.steps, opts.rounds, trace)
    p["wall_s"] = time.perf_counter() - t0
    models[method] = p
    print(f"profile {model} {method}: {p}", file=sys.stderr, flush=True)
    if opts.json:
      pathlib.Path(opts.json).write_text(json.dumps(result, indent=1))
  return result


def _runs(opts, profile: dict | None) -> int:
  start = time.perf_counter()
  failed = []
  for model, method, delta in run_order(opts.models, opts.methods, opts.deltas):
    left = opts.time_budget_s - (time.perf_counter() - start) if opts.time_budget_s else None
    name = run_name(model, method, delta)
    if left is not None and left < opts.run_estimate_s:
      print(f"skipping {name}: {left:.0f} s left", flush=True)
      continue
    cmd = [
        sys.executable,
        "-m",
        "srigl_jax.main",
        f"--config={opts.config_file}:model={model},method={method}",
        f"--workdir={os.path.join(opts.workdir, name)}",
        f"--config.sparsity.update_every={delta or 100}",
    ]
    if opts.run_steps:
      cmd.append(f"--config.num_train_steps={opts.run_steps}")
    t0 = time.perf_counter()
    with open(os.path.join(opts.workdir, f"{name}.log"), "w") as log:
      try:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=left, check=False)
        rc = rc.returncode
      except subprocess.TimeoutExpired:
        rc = "timeout"
    print(f"run {name}: rc={rc} in {time.perf_counter() - t0:.0f} s", flush=True)
    if rc != 0:
      failed.append(name)
    _write(opts, collect(opts.workdir, profile, opts.models, opts.deltas))
  return int(bool(failed))


def _write(opts, result):
  if opts.json:
    pathlib.Path(opts.json).write_text(json.dumps(result, indent=1))


_PROFILE_KEYS = ("device_kind", "platform", "jax_version", "models", "skipped")


def _main(argv: Sequence[str], fv: flags.FlagValues) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  opts = types.SimpleNamespace(**fv.flag_values_dict())
  opts.deltas = [int(d) for d in opts.deltas]
  rc = 0
  if opts.profile:
    profile = _profile(opts)
  elif opts.profile_json and os.path.exists(opts.profile_json):
    saved = json.loads(pathlib.Path(opts.profile_json).read_text())
    profile = {k: saved[k] for k in _PROFILE_KEYS if k in saved}
  else:
    profile = None
  if opts.runs or opts.collect:
    if not opts.workdir:
      raise app.UsageError("--runs and --collect need --workdir")
    os.makedirs(opts.workdir, exist_ok=True)
  if opts.runs:
    rc = _runs(opts, profile)
  result = collect(opts.workdir, profile, opts.models, opts.deltas)
  _write(opts, result)
  print_table(result)
  return rc


def main(argv: Sequence[str] | None = None) -> int:
  """Runs with the command-line flags ``argv`` (default ``sys.argv[1:]``)."""
  fv = define_flags(flags.FlagValues())
  return _main(fv([__name__, *(sys.argv[1:] if argv is None else argv)]), fv)


if __name__ == "__main__":
  app.run(functools.partial(_main, fv=define_flags(flags.FLAGS)))
