"""Whole-model inference latency: masked dense vs structured vs condensed.

    python -m srigl_jax.benchmarks.model --model=resnet50,resnet18,vit_s16 \\
        --sparsity=0.9 --batch-sizes=1,64 --json=out.json --plot=out.png

Without ``--workdir`` each model is built at its paper input size (224x224 for
the ImageNet models, 32x32 for CIFAR, 28x28 for Fashion-MNIST) with random
weights and BatchNorm statistics. Masks come from the real optimizer's init
(ERK for CNNs, uniform for ViT, depthwise convs dense, as the configs say);
then ``--ablation`` of the neurons of every sparse layer but the head are
ablated and each remaining neuron gets the layer's budget spread over fewer
neurons (``k' = budget // active``), as SRigL's update does. With
``--workdir`` the trained run's newest checkpoint is benchmarked instead.

``--group-size=1,8,16`` (default 1) adds group-shared fan-in: for each G the
masks come from the optimizer's own init with ``group_size=G`` (layers whose
width G divides are grouped, the others stay per-neuron, as training does),
redrawn with whole groups ablated, and the model is converted with those
groups. The converted models of every G are timed in the same rounds as the
dense and structured ones of the first G (whose speed does not depend on the
mask); the condensed impl of G > 1 is named ``condensed@g<G>``. Every record
carries its ``group_size``.

Impls, all timed round-robin in every repeat so that machine load hits them
alike: ``dense`` (the masked model under XLA), ``structured`` (ablated neurons
removed, dense kernels) and ``condensed`` (the fastest condensed kernels).
Each record has the median, the paired ratio to dense (median over repeats of
the two calls' ratio) and the largest error against dense on the same input.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import srigl_jax
from srigl_jax import condensed as C
from srigl_jax import timing
from srigl_jax.models import get_model

# name -> (input shape without batch, classes, distribution, dense layer regexes)
MODELS = {
    "resnet50": ((224, 224, 3), 1000, "erk", ()),
    "resnet18": ((32, 32, 3), 10, "erk", ()),
    "wrn22": ((32, 32, 3), 10, "erk", ()),
    "vit_ti16": ((224, 224, 3), 1000, "uniform", ()),
    "vit_s16": ((224, 224, 3), 1000, "uniform", ()),
    "vit_b16": ((224, 224, 3), 1000, "uniform", ()),
    "mobilenet_v3_large": ((224, 224, 3), 1000, "erk", ("depthwise",)),
    "mobilenet_v3_small": ((224, 224, 3), 1000, "erk", ("depthwise",)),
    "mlp": ((28, 28, 1), 10, "erk", ()),
    "cnn": ((28, 28, 1), 10, "erk", ()),
}
IMPLS = ("dense", "structured", "condensed")
# Fraction of neurons ablated per layer at each sparsity (the layer benchmark's
# assumption standing in for a trained model); override with --ablation.
DEFAULT_ABLATION = {0.8: 0.05, 0.9: 0.1, 0.95: 0.2, 0.99: 0.4}


def synthetic_model(name, sparsity, ablation, seed=0, group_size=1, **model_kwargs):
  """(model, variables, masks, input shape) with SRigL-like masks, random weights.

  With ``group_size`` G > 1 the optimizer groups the layers whose width G
  divides; their redrawn masks keep G consecutive neurons on one shared set
  of inputs and ablate whole groups.
  """
  shape, classes, dist, dense_layers = MODELS[name]
  model = get_model(name, classes, **model_kwargs)
  rng = np.random.default_rng(seed)
  x = jnp.zeros((1, *shape), jnp.float32)
  variables = jax.jit(model.init)(jax.random.key(seed), x)
  tx = srigl_jax.srigl(
      optax.sgd(0.1),
      sparsity=sparsity,
      distribution=dist,
      update_every=100,
      stop_step=1000,
      dense_layers=dense_layers,
      group_size=group_size,
      key=jax.random.key(seed + 1),
  )
  params = variables["params"]

  # The optimizer decides which layers are sparse and their density (ERK);
  # the redraw keeps each layer's density and adds the ablation.
  tx_masks = srigl_jax.get_masks(tx.init(params))
  dens = jax.tree.map(
      lambda m: None if m is None else float(np.mean(m)), tx_masks, is_leaf=lambda m: m is None
  )

  def layer_mask(path, m, p, d):
    if m is None:
      return None
    return _redraw_density(rng, path, p, d, ablation, _mask_group_size(path, m, group_size))

  masks = jax.tree_util.tree_map_with_path(
      layer_mask, tx_masks, params, dens, is_leaf=lambda m: m is None
  )

  def perturb(path, a):
    leaf = jax.tree_util.keystr(path)
    if "batch_stats" in leaf and "var" in leaf:
      return jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype)
    if "batch_stats" in leaf and "mean" in leaf:
      return jnp.asarray(rng.normal(0, 0.2, a.shape), a.dtype)
    if "'bias'" in leaf or "'scale'" in leaf:
      return jnp.asarray(a + rng.normal(0, 0.1, a.shape), a.dtype)
    return a

  variables = jax.tree_util.tree_map_with_path(perturb, dict(variables))
  return model, variables, masks, shape


def _fan_axes(path, shape) -> int:
  """How many leading axes of a kernel are its fan-in."""
  # Attention kernels: query/key/value (embed, heads, head_dim) have fan-in
  # axis 0; out (heads, head_dim, embed) has fan-in axes (0, 1).
  return 1 if len(shape) == 3 and "'out'" not in jax.tree_util.keystr(path) else len(shape) - 1


def _mask_group_size(path, mask, group_size: int) -> int:
  """``group_size`` when the optimizer's mask of this layer is grouped by it, else 1."""
  shape = np.shape(mask)
  n_fan = _fan_axes(path, shape)
  m2 = np.asarray(mask).reshape(int(np.prod(shape[:n_fan])), -1)
  if group_size == 1 or m2.shape[1] % group_size:
    return 1
  cols = m2.reshape(m2.shape[0], -1, group_size)
  return group_size if (cols == cols[:, :, :1]).all() else 1


def _redraw_density(rng, path, p, density, ablation, group_size=1):
  shape = np.shape(p)
  n_fan = _fan_axes(path, shape)
  fan = int(np.prod(shape[:n_fan]))
  n = int(np.prod(shape[n_fan:]))
  g = group_size
  n_units = n // g  # neurons, or groups of G neurons sharing their inputs
  budget = max(1, int(round(fan * n * density)))
  ablate = 0 if "head" in jax.tree_util.keystr(path) else int(n_units * ablation)
  active = rng.choice(n_units, n_units - ablate, replace=False)
  k = max(1, min(fan, budget // (len(active) * g)))
  # Random k-subsets per unit without a Python loop: argsort of noise.
  picks = np.argsort(rng.random((len(active), fan)), axis=1)[:, :k]
  mask = np.zeros((fan, n_units), bool)
  mask[picks, np.broadcast_to(active[:, None], picks.shape)] = True
  return np.repeat(mask, g, axis=1).reshape(shape)


def trained_model(workdir):
  """(model, variables, masks, input shape) of a run's newest checkpoint."""
  from srigl_jax import export  # pylint: disable=g-import-not-at-top
  from srigl_jax.data import input_geometry  # pylint: disable=g-import-not-at-top

  config, model, state, _ = export.restore_run(workdir)
  variables = {"params": state.params}
  if getattr(state, "batch_stats", None):
    variables["batch_stats"] = state.batch_stats
  masks = srigl_jax.get_masks(state.opt_state)
  shape, _ = input_geometry(config.input)
  return model, variables, masks, tuple(shape)


def bench_model(
    name,
    model,
    variables,
    masks,
    shape,
    sparsity,
    batches,
    repeats,
    budget_s,
    impls=IMPLS,
    log=print,
    group_size=1,
    grouped_masks=None,
):
  """Records of one model at every batch size.

  Args:
    name, model, variables, masks, shape, sparsity: the model and its masks
      (trained with ``group_size``).
    batches, repeats, budget_s: the timed batch sizes, the most rounds and
      the seconds of timing per batch size.
    impls: of `IMPLS`.
    log: prints progress.
    group_size: the G ``masks`` were made with.
    grouped_masks: ``{G: masks}`` of other group sizes, whose condensed
      models (``condensed@g<G>``) are timed in the same rounds.

  Returns:
    One record per timed model and batch size.
  """
  rng = np.random.default_rng(0)
  sample = jnp.asarray(rng.standard_normal((2, *shape)), jnp.float32)

  def masked_vars(masks):
    params = jax.tree.map(
        lambda p, m: p if m is None else p * m,
        variables["params"],
        masks,
        is_leaf=lambda m: m is None,
    )
    return {**variables, "params": params}

  masked = masked_vars(masks)
  fns, groups = {}, {}
  t0 = time.perf_counter()
  if "dense" in impls:
    fns["dense"] = jax.jit(lambda x: model.apply(masked, x))
    groups["dense"] = group_size
  converted = {}
  variants = [("structured", "structured", group_size, masks)]
  variants.append(("condensed", "condensed", group_size, masks))
  for g, m in (grouped_masks or {}).items():
    variants.append((f"condensed@g{g}", "condensed", g, m))
  for impl, fmt, g, m in variants:
    if impl.split("@")[0] in impls:
      converted[impl] = C.convert_model(
          model, variables, m, sample, format=fmt, check=False, group_size=None
      )
      fns[impl], groups[impl] = jax.jit(converted[impl].apply), g
  log(f"{name}: converted in {time.perf_counter() - t0:.1f} s")
  # The masked dense reference of a variant with its own masks (not timed).
  reference = jax.jit(model.apply)
  own_masks = {impl: m for impl, _, _, m in variants if m is not masks}
  plan = converted.get("condensed", converted.get("structured"))
  layers = plan.plan["layers"] if plan else {}
  records = []
  for batch in batches:
    x = jnp.asarray(rng.standard_normal((batch, *shape)), jnp.float32)
    want = np.asarray(fns["dense"](x), np.float64) if "dense" in fns else None
    calls = {impl: functools.partial(f, x) for impl, f in fns.items()}
    res = timing.time_interleaved(calls, budget_s=budget_s, max_rounds=repeats, warmup=1)
    us_of = res.medians_us()
    for impl in calls:
      err = None
      ref = want
      if impl in own_masks:
        ref = np.asarray(reference(masked_vars(own_masks[impl]), x), np.float64)
      if ref is not None:
        got = np.asarray(fns[impl](x), np.float64)
        err = float(np.abs(got - ref).max() / max(1e-12, np.abs(ref).max()))
      paired = None
      if "dense" in calls and impl != "dense":
        paired = res.paired_ratio("dense", impl)
      own = converted[impl].plan["layers"] if impl in converted else {}
      rec = {
          "model": name,
          "sparsity": sparsity,
          "batch": batch,
          "impl": impl,
          "group_size": groups[impl],
          "grouped_layers": sum(e.get("group_size", 1) > 1 for e in own.values()),
          "median_us": us_of[impl],
          "repeats": res.rounds,
          "round_us": [t * 1e6 for t in res.seconds[impl]],
          "paired_speedup_vs_dense": paired,
          "max_rel_err": err,
      }
      if impl == "condensed" and "structured" in calls:
        rec["paired_speedup_vs_structured"] = res.paired_ratio("structured", impl)
      records.append(rec)
    dense_us = us_of.get("dense")
    line = f"{name:>20s} s={sparsity:.2f} b={batch:<4d}"
    for impl, us in us_of.items():
      ratio = f" ({dense_us / us:.2f}x)" if dense_us and impl != "dense" else ""
      line += f"  {impl} {us / 1e3:8.2f} ms{ratio}"
    log(line)
  summary = {
      "sparse_layers": len(layers),
      "condensed_layers": sum(e["format"] == "condensed" for e in layers.values()),
      "folded_batchnorms": len(plan.plan["folded_batchnorms"]) if plan else 0,
      "layers_with_folded_inputs": sum(e["folded_inputs"] > 0 for e in layers.values()),
  }
  for r in records:
    r.update(summary)
  return records


def plot(records, path):
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  keys = sorted({(r["model"], r["sparsity"]) for r in records}, key=str)
  batches = sorted({r["batch"] for r in records})
  impls = list(dict.fromkeys(r["impl"] for r in records))
  fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
  for ax, (model, s) in zip(axes[0], keys):
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
      ys = []
      for b in batches:
        rs = [
            r
            for r in records
            if (r["model"], r["sparsity"], r["batch"], r["impl"]) == (model, s, b, impl)
        ]
        dense = [
            r
            for r in records
            if (r["model"], r["sparsity"], r["batch"], r["impl"]) == (model, s, b, "dense")
        ]
        ys.append(dense[0]["median_us"] / rs[0]["median_us"] if rs and dense else 0)
      ax.bar(np.arange(len(batches)) + i * width, ys, width, label=impl)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(
        np.arange(len(batches)) + width * (len(impls) - 1) / 2, [f"b={b}" for b in batches]
    )
    ax.set_title(f"{model}, {int(round(s * 100))}% sparse")
    ax.set_ylabel("speed-up vs dense (x)")
  axes[0][0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def _run(fv: flags.FlagValues, done=lambda records: None):
  """Records of every model (or of the trained run) at every batch size.

  ``done(records)`` gets the records so far after each model, so that a run
  cut short by a time limit keeps the finished models.
  """
  batches = [int(b) for b in fv["batch-sizes"].value]
  budget_s = fv["budget-s"].value
  if fv.workdir:
    model, variables, masks, shape = trained_model(fv.workdir)
    sp = float(1 - np.mean([np.mean(m) for m in jax.tree.leaves(masks)]))
    return bench_model(
        fv.workdir, model, variables, masks, shape, sp, batches, fv.repeats, budget_s, fv.impls
    )
  records = []
  first, *others = [int(g) for g in fv["group-size"].value]
  kwargs = json.loads(fv["model-kwargs"].value)
  for name in fv.model:
    for s in (float(v) for v in fv.sparsity):
      abl = fv.ablation if fv.ablation is not None else DEFAULT_ABLATION.get(s, 0.1)
      model, variables, masks, shape = synthetic_model(name, s, abl, group_size=first, **kwargs)
      # Same weights, the masks of each other group size.
      grouped = {g: synthetic_model(name, s, abl, group_size=g, **kwargs)[2] for g in others}
      recs = bench_model(
          name,
          model,
          variables,
          masks,
          shape,
          s,
          batches,
          fv.repeats,
          budget_s,
          fv.impls,
          group_size=first,
          grouped_masks=grouped,
      )
      for r in recs:
        r["ablation"] = abl
      records += recs
      done(records)
  return records


def define_flags(fv: flags.FlagValues) -> flags.FlagValues:
  """Defines this benchmark's command-line flags on ``fv``; returns it."""
  flags.DEFINE_list(
      "model", ["resnet50", "resnet18", "vit_s16"], f"Models, of {sorted(MODELS)}.", flag_values=fv
  )
  flags.DEFINE_string(
      "workdir", None, "Benchmark this trained run instead (ignores --model).", flag_values=fv
  )
  flags.register_multi_flags_validator(
      ["model", "workdir"],
      lambda f: bool(f["workdir"]) or set(f["model"]) <= set(MODELS),
      f"unknown models; choose from {sorted(MODELS)}",
      flag_values=fv,
  )
  flags.DEFINE_string("json", None, "Write the records to this JSON file.", flag_values=fv)
  flags.DEFINE_string("plot", None, "Write a PNG of the speed-ups to this file.", flag_values=fv)
  flags.DEFINE_list("sparsity", ["0.9"], "Sparsities.", flag_values=fv)
  flags.DEFINE_list("batch-sizes", ["1", "64"], "Batch sizes.", flag_values=fv)
  flags.DEFINE_float(
      "ablation",
      None,
      "Fraction of neurons ablated per layer (default: by sparsity).",
      flag_values=fv,
  )
  flags.DEFINE_list("impls", list(IMPLS), f"Impls, of {IMPLS}.", flag_values=fv)
  flags.DEFINE_list(
      "group-size",
      ["1"],
      "Group sizes G of the masks (group-shared fan-in; 1 = per-neuron). The first one's "
      "models are all timed; the others add their condensed model.",
      flag_values=fv,
  )
  flags.register_validator(
      "group-size",
      lambda v: bool(v) and all(g.isdigit() and int(g) >= 1 for g in v) and len(set(v)) == len(v),
      "group sizes are distinct integers >= 1",
      flag_values=fv,
  )
  known = set(IMPLS)
  flags.register_validator("impls", known.issuperset, "unknown impls", flag_values=fv)
  flags.DEFINE_integer("repeats", 15, "Most timed rounds per point.", flag_values=fv)
  flags.DEFINE_float("budget-s", 30.0, "Seconds of timing per point.", flag_values=fv)
  flags.DEFINE_string(
      "model-kwargs", "{}", "JSON overrides of the models, e.g. '{\"width\": 8}'.", flag_values=fv
  )
  return fv


def _main(argv: Sequence[str], fv: flags.FlagValues) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  meta = {
      "cpu": timing.cpu_model(),
      "native_isa": C.native_isas().get("auto", "unavailable"),
      "backend": jax.default_backend(),
      "jax": jax.__version__,
      "async_dispatch": False,
  }

  def write(records):
    for r in records:
      r.update(meta)
    if fv.json:
      with open(fv.json, "w") as f:
        json.dump(records, f, indent=1)

  with timing.sync_cpu_dispatch():
    records = _run(fv, write)
  write(records)
  if fv.plot:
    plot(records, fv.plot)


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the benchmark with the command-line flags ``argv`` (default ``sys.argv[1:]``)."""
  fv = define_flags(flags.FlagValues())
  _main(fv([__name__, *(sys.argv[1:] if argv is None else argv)]), fv)


if __name__ == "__main__":
  app.run(functools.partial(_main, fv=define_flags(flags.FLAGS)))
