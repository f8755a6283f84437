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

Impls, all timed round-robin in every repeat so that machine load hits them
alike: ``dense`` (the masked model under XLA), ``structured`` (ablated neurons
removed, dense kernels) and ``condensed`` (the fastest condensed kernels).
Each record has the median, the paired ratio to dense (median over repeats of
the two calls' ratio) and the largest error against dense on the same input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import srigl_jax
from srigl_jax import condensed as C
from srigl_jax import timing
from srigl_jax.benchmarks.condensed import cpu_model
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


def _floats(s):
  return [float(v) for v in s.split(",") if v]


def _ints(s):
  return [int(v) for v in s.split(",") if v]


def synthetic_model(name, sparsity, ablation, seed=0, **model_kwargs):
  """(model, variables, masks, input shape) with SRigL-like masks, random weights."""
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
    return _redraw_density(rng, path, p, d, ablation)

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


def _redraw_density(rng, path, p, density, ablation):
  shape = np.shape(p)
  name = jax.tree_util.keystr(path)
  # Attention kernels: query/key/value (embed, heads, head_dim) have fan-in
  # axis 0; out (heads, head_dim, embed) has fan-in axes (0, 1).
  n_fan = 1 if len(shape) == 3 and "'out'" not in name else len(shape) - 1
  fan = int(np.prod(shape[:n_fan]))
  n = int(np.prod(shape[n_fan:]))
  budget = max(1, int(round(fan * n * density)))
  ablate = 0 if "head" in jax.tree_util.keystr(path) else int(n * ablation)
  active = rng.choice(n, n - ablate, replace=False)
  k = max(1, min(fan, budget // len(active)))
  # Random k-subsets per neuron without a Python loop: argsort of noise.
  picks = np.argsort(rng.random((len(active), fan)), axis=1)[:, :k]
  mask = np.zeros((fan, n), bool)
  mask[picks, np.broadcast_to(active[:, None], picks.shape)] = True
  return mask.reshape(shape)


def trained_model(workdir):
  """(model, variables, masks, input shape) of a run's newest checkpoint."""
  from srigl_jax import export  # pylint: disable=g-import-not-at-top

  config, model, state, _ = export.restore_run(workdir)
  variables = {"params": state.params}
  if getattr(state, "batch_stats", None):
    variables["batch_stats"] = state.batch_stats
  masks = srigl_jax.get_masks(state.opt_state)
  shape, _ = export.checks.input_geometry(config.input)
  return model, variables, masks, tuple(shape)


def time_interleaved(fns, x, repeats, budget_s):
  """Per-impl lists of seconds, every impl called once per repeat."""
  for f in fns.values():
    jax.block_until_ready(f(x))
  times = {k: [] for k in fns}
  start = time.perf_counter()
  for r in range(repeats):
    for k, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(x))
      times[k].append(time.perf_counter() - t0)
    if r >= 2 and time.perf_counter() - start > budget_s:
      break
  return times


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
):
  """Records of one model at every batch size."""
  rng = np.random.default_rng(0)
  sample = jnp.asarray(rng.standard_normal((2, *shape)), jnp.float32)
  params = jax.tree.map(
      lambda p, m: p if m is None else p * m,
      variables["params"],
      masks,
      is_leaf=lambda m: m is None,
  )
  masked = {**variables, "params": params}
  fns = {}
  t0 = time.perf_counter()
  if "dense" in impls:
    fns["dense"] = jax.jit(lambda x: model.apply(masked, x))
  converted = {}
  for impl, fmt in (("structured", "structured"), ("condensed", "condensed")):
    if impl in impls:
      converted[impl] = C.convert_model(model, variables, masks, sample, format=fmt, check=False)
      fns[impl] = jax.jit(converted[impl].apply)
  log(f"{name}: converted in {time.perf_counter() - t0:.1f} s")
  plan = converted.get("condensed", converted.get("structured"))
  layers = plan.plan["layers"] if plan else {}
  records = []
  for batch in batches:
    x = jnp.asarray(rng.standard_normal((batch, *shape)), jnp.float32)
    want = np.asarray(fns["dense"](x), np.float64) if "dense" in fns else None
    times = time_interleaved(fns, x, repeats, budget_s)
    for impl, t in times.items():
      err = None
      if want is not None:
        got = np.asarray(fns[impl](x), np.float64)
        err = float(np.abs(got - want).max() / max(1e-12, np.abs(want).max()))
      paired = None
      if "dense" in times and impl != "dense":
        paired = float(np.median(np.asarray(times["dense"]) / np.asarray(t)))
      rec = {
          "model": name,
          "sparsity": sparsity,
          "batch": batch,
          "impl": impl,
          "median_us": float(np.median(t)) * 1e6,
          "repeats": len(t),
          "paired_speedup_vs_dense": paired,
          "max_rel_err": err,
      }
      records.append(rec)
    dense_us = np.median(times["dense"]) * 1e6 if "dense" in times else None
    line = f"{name:>20s} s={sparsity:.2f} b={batch:<4d}"
    for impl, t in times.items():
      us = np.median(t) * 1e6
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
  impls = [i for i in IMPLS if any(r["impl"] == i for r in records)]
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


def _run(args, names, impls, batches):
  """Records of every model (or of the trained run) at every batch size."""
  if args.workdir:
    model, variables, masks, shape = trained_model(args.workdir)
    sp = float(1 - np.mean([np.mean(m) for m in jax.tree.leaves(masks)]))
    return bench_model(
        args.workdir,
        model,
        variables,
        masks,
        shape,
        sp,
        batches,
        args.repeats,
        args.budget_s,
        impls,
    )
  records = []
  for name in names:
    for s in _floats(args.sparsity):
      abl = args.ablation if args.ablation is not None else DEFAULT_ABLATION.get(s, 0.1)
      model, variables, masks, shape = synthetic_model(
          name, s, abl, **json.loads(args.model_kwargs)
      )
      recs = bench_model(
          name, model, variables, masks, shape, s, batches, args.repeats, args.budget_s, impls
      )
      for r in recs:
        r["ablation"] = abl
      records += recs
  return records


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", default="resnet50,resnet18,vit_s16")
  ap.add_argument("--sparsity", default="0.9")
  ap.add_argument("--batch-sizes", default="1,64")
  ap.add_argument(
      "--ablation",
      type=float,
      default=None,
      help="fraction of neurons ablated per layer (default: by sparsity)",
  )
  ap.add_argument("--impls", default=",".join(IMPLS))
  ap.add_argument("--repeats", type=int, default=15)
  ap.add_argument("--budget-s", type=float, default=30.0, help="time budget per point")
  ap.add_argument("--workdir", default=None, help="benchmark a trained run instead")
  ap.add_argument("--model-kwargs", default="{}", help="JSON overrides, e.g. '{\"width\": 8}'")
  ap.add_argument("--json", default=None)
  ap.add_argument("--plot", default=None)
  args = ap.parse_args(argv)
  impls = tuple(i for i in args.impls.split(",") if i)
  bad = set(impls) - set(IMPLS)
  if bad:
    ap.error(f"unknown impls {sorted(bad)}; choose from {IMPLS}")
  names = [m for m in args.model.split(",") if m]
  unknown = [n for n in names if n not in MODELS]
  if unknown and not args.workdir:
    ap.error(f"unknown models {unknown}; choose from {sorted(MODELS)}")
  with timing.sync_cpu_dispatch():
    records = _run(args, names, impls, _ints(args.batch_sizes))
  meta = {
      "cpu": cpu_model(),
      "native_isa": C.native_isas().get("auto", "unavailable"),
      "backend": jax.default_backend(),
      "jax": jax.__version__,
      "async_dispatch": False,
  }
  for r in records:
    r.update(meta)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(records, f, indent=1)
  if args.plot:
    plot(records, args.plot)
  return records


if __name__ == "__main__":
  main(sys.argv[1:])
