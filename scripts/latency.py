"""Online-inference latency of trained runs: masked dense, structured and condensed.

For each training workdir, restores its newest checkpoint, converts it both
ways (`format='condensed'`, the kernels users get, and `format='structured'`,
ablated neurons removed with dense kernels) and times the three models with
`srigl_jax.timing.time_interleaved` at each batch size, in one process with
synchronous CPU dispatch (set before JAX starts, as `load_inference_model`
does for serving). Writes one JSON record per model and batch: medians in
microseconds per call, and paired ratios against masked dense and against
structured.

  python scripts/latency.py --out=docs/benchmarks/latency_cpu.json \
      default=WORKDIR mlp95=WORKDIR cnn95=WORKDIR

``--base_config`` (a config file) fills in fields that a workdir's saved
config predates, for a workdir whose own config no longer builds.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform

import jax
from absl import app, flags

# JAX reads this when it creates its CPU client: before any array exists.
jax.config.update("jax_cpu_enable_async_dispatch", False)

import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from srigl_jax import condensed as C  # noqa: E402
from srigl_jax import data, export, sparsity, timing  # noqa: E402


def _config(workdir: str, base: str | None):
  saved = export.load_run_config(workdir)
  if base is None:
    return saved
  spec = importlib.util.spec_from_file_location("base_config", base)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config()

  def merge(dst, src):
    for k, v in src.items():
      if isinstance(v, ml_collections.ConfigDict) and k in dst:
        merge(dst[k], v)
      else:
        with dst.ignore_type():
          dst[k] = v

  merge(cfg, saved)
  return cfg


def models_of(workdir: str, base: str | None):
  """(input shape, {'dense', 'structured', 'condensed': f(x)}, condensed plan)."""
  try:
    config, model, state, _ = export.restore_run(workdir)
  except (AttributeError, KeyError, ValueError):
    if base is None:
      raise
    config, model, state, _ = export.restore_run(workdir, _config(workdir, base))
  masks = sparsity.get_masks(state.opt_state)
  params = jax.tree.map(np.asarray, sparsity.apply_masks(state.params, masks))
  masked = {"params": params}
  if state.batch_stats:
    masked["batch_stats"] = jax.tree.map(np.asarray, state.batch_stats)
  shape = tuple(data.input_geometry(config.input)[0])
  sample = np.zeros((1, *shape), np.float32)
  fns = {"dense": jax.jit(lambda v, x: model.apply(v, x, train=False))}
  variables = {"dense": masked}
  plan = None
  for fmt in ("structured", "condensed"):
    conv = C.convert_model(model, masked, masks, sample, format=fmt, on_unsupported="structured")
    fns[fmt] = jax.jit(lambda v, x, plan=conv.plan: C.ConvertedModel(model, v, plan).apply(x))
    variables[fmt] = conv.variables
    plan = conv.plan
  return shape, fns, variables, plan


_OUT = flags.DEFINE_string("out", None, "Where the JSON records go.", required=True)
_BATCHES = flags.DEFINE_list("batches", ["1", "8", "128"], "Batch sizes.")
_BUDGET_S = flags.DEFINE_float("budget_s", 8.0, "Timing budget per model and batch size (s).")
_BASE_CONFIG = flags.DEFINE_string(
    "base_config", None, "A config file whose fields fill in what a workdir's config predates."
)


def main(argv):
  runs = argv[1:]
  if not runs:
    raise app.UsageError("Pass one or more NAME=WORKDIR.")
  records = []
  for run in runs:
    name, workdir = run.split("=", 1)
    shape, fns, variables, plan = models_of(workdir, _BASE_CONFIG.value)
    rng = np.random.default_rng(0)
    for batch in (int(b) for b in _BATCHES.value):
      x = jnp.asarray(rng.standard_normal((batch, *shape)), jnp.float32)
      want = np.asarray(fns["dense"](variables["dense"], x), np.float64)
      for fmt, f in fns.items():
        got = np.asarray(f(variables[fmt], x), np.float64)
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), fmt
      calls = {fmt: (lambda f=f, v=variables[fmt]: f(v, x)) for fmt, f in fns.items()}
      t = timing.time_interleaved(calls, budget_s=_BUDGET_S.value, max_rounds=20000, min_rounds=20)
      med = t.medians_us()
      rec = {
          "model": name,
          "workdir": os.path.abspath(workdir),
          "batch": batch,
          "rounds": t.rounds,
          "dense_us": med["dense"],
          "structured_us": med["structured"],
          "condensed_us": med["condensed"],
          "condensed_vs_dense": t.paired_ratio("dense", "condensed"),
          "condensed_vs_structured": t.paired_ratio("structured", "condensed"),
          "structured_vs_dense": t.paired_ratio("dense", "structured"),
          "layers": {
              p: {k: e[k] for k in ("format", "neurons", "active_neurons", "fan_in")}
              for p, e in plan["layers"].items()
          },
          "cpu": timing.cpu_model(),
          "native_isa": C.native_isas().get("auto"),
          "async_dispatch": bool(jax.config.values["jax_cpu_enable_async_dispatch"]),
          "jax": jax.__version__,
          "machine": platform.machine(),
      }
      records.append(rec)
      print(
          f"{name:>8s} b={batch:<4d} dense {rec['dense_us']:9.1f} us  structured "
          f"{rec['structured_us']:9.1f} us  condensed {rec['condensed_us']:9.1f} us  "
          f"x{rec['condensed_vs_dense']:.2f} vs dense, x{rec['condensed_vs_structured']:.2f} "
          "vs structured",
          flush=True,
      )
  os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(records, f, indent=1)


if __name__ == "__main__":
  app.run(main)
