r"""Cost of the sparse optimizer: one mask update, and the amortised overhead.

    python -m srigl_jax.benchmarks.sparse_update --json sparse_update.json

1. On ResNet-50-shaped kernels (25.6M parameters, ERK 90%), the time of one
   jitted `tx.update` that updates the masks, next to one plain step of the
   inner optimizer (SGD with momentum: update + apply) and one SRigL step that
   does not update the masks; optionally (--train_batch > 0) next to a full
   ResNet-50 training step at that batch size.
2. On a small CNN (Fashion-MNIST shapes, batch 128), full training steps with
   SRigL against the plain inner optimizer; the amortised overhead at delta =
   `--delta` is ((delta - 1) * t_plain_srigl + t_update) / (delta * t_dense) - 1.

All timings are medians of interleaved repeats, so both sides see the same
machine load.
"""

from __future__ import annotations

import functools
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

import srigl_jax
from srigl_jax import models, timing


def define_flags(fv: flags.FlagValues) -> flags.FlagValues:
  """Defines this benchmark's command-line flags on ``fv``; returns it."""
  flags.DEFINE_string("json", None, "Write the results to this JSON file.", flag_values=fv)
  flags.DEFINE_integer("repeats", 7, "Timed repeats per measurement.", flag_values=fv)
  flags.DEFINE_integer("delta", 100, "Mask update period for the overhead.", flag_values=fv)
  flags.DEFINE_float("sparsity", 0.9, "Global sparsity (ERK).", flag_values=fv)
  flags.DEFINE_integer(
      "train_batch",
      0,
      "If > 0, also time a full ResNet-50 training step at this batch.",
      flag_values=fv,
  )
  flags.DEFINE_bool("skip_resnet50", False, "Only run the CNN part.", flag_values=fv)
  return fv


def _median_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
  """Median seconds per call of each fn over ``repeats`` interleaved rounds."""
  res = timing.time_interleaved(
      fns, budget_s=float("inf"), max_rounds=repeats, min_rounds=repeats, warmup=1
  )
  return {name: us * 1e-6 for name, us in res.medians_us().items()}


def _random_params(shapes, seed=0):
  leaves, treedef = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(
      treedef,
      [jnp.asarray(rng.normal(size=s.shape).astype(np.float32) * 0.05) for s in leaves],
  )


def bench_resnet50(repeats: int, sparsity: float, train_batch: int) -> dict:
  model = models.get_model("resnet50", num_classes=1000)
  x_spec = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x_spec)
  params = _random_params(variables["params"])
  n_params = sum(p.size for p in jax.tree.leaves(params))
  grads = _random_params(variables["params"], seed=1)
  delta = 100
  inner = optax.sgd(0.1, momentum=0.9)
  tx = srigl_jax.srigl(
      inner,
      sparsity=sparsity,
      key=jax.random.key(0),
      stop_step=10**6,
      update_every=delta,
      distribution="erk",
  )
  state = tx.init(params)
  params = srigl_jax.apply_masks(params, state)
  # count = delta - 1 makes the next call a mask-update step; count = 0 not.
  upd_state = state._replace(count=jnp.int32(delta - 1))
  plain_state = inner.init(params)

  sparse_step = jax.jit(lambda g, s, p: optax.apply_updates(p, tx.update(g, s, p)[0]))
  sparse_full = jax.jit(tx.update)
  dense_step = jax.jit(lambda g, s, p: optax.apply_updates(p, inner.update(g, s, p)[0]))

  t0 = time.perf_counter()
  sparse_full.lower(grads, upd_state, params).compile()
  compile_s = time.perf_counter() - t0
  fns = {
      "mask_update_step": lambda: sparse_step(grads, upd_state, params),
      "srigl_step_no_update": lambda: sparse_step(grads, state, params),
      "plain_optimizer_step": lambda: dense_step(grads, plain_state, params),
  }
  if train_batch > 0:
    xb = jnp.asarray(np.random.default_rng(0).normal(size=(train_batch, 224, 224, 3)), jnp.float32)
    yb = jnp.zeros((train_batch,), jnp.int32)
    bstats = jax.tree.map(jnp.zeros_like, variables["batch_stats"])

    @jax.jit
    def train_step(p, s):
      def loss_fn(p):
        logits, _ = model.apply(
            {"params": p, "batch_stats": bstats}, xb, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

      g = jax.grad(loss_fn)(p)
      u, s = inner.update(g, s, p)
      return optax.apply_updates(p, u)

    fns["resnet50_train_step"] = lambda: train_step(params, plain_state)
  t = _median_seconds(fns, repeats)
  stats = srigl_jax.layer_stats(sparse_full(grads, upd_state, params)[1])
  out = {
      "n_params": int(n_params),
      "n_sparse_layers": len(stats),
      "sparsity": sparsity,
      "update_compile_s": compile_s,
      **{f"{k}_ms": v * 1e3 for k, v in t.items()},
      "mask_update_over_plain_steps": t["mask_update_step"] / t["plain_optimizer_step"],
  }
  if "resnet50_train_step" in t:
    out["mask_update_over_train_steps"] = t["mask_update_step"] / t["resnet50_train_step"]
  return out


def bench_cnn_overhead(repeats: int, sparsity: float, delta: int) -> dict:
  model = models.get_model("cnn", num_classes=10)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(128, 28, 28, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, size=(128,)), jnp.int32)
  params = model.init(jax.random.key(0), x[:1])["params"]
  inner = optax.sgd(0.05, momentum=0.9)
  tx = srigl_jax.srigl(
      inner, sparsity=sparsity, key=jax.random.key(1), stop_step=10**6, update_every=delta
  )

  def make_step(opt):
    @jax.jit
    def step(p, s):
      def loss_fn(p):
        return optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": p}, x), y
        ).mean()

      g = jax.grad(loss_fn)(p)
      u, s = opt.update(g, s, p)
      return optax.apply_updates(p, u), s

    return step

  sp_step, dense_step = make_step(tx), make_step(inner)
  s_state = tx.init(params)
  s_params = srigl_jax.apply_masks(params, s_state)
  u_state = s_state._replace(count=jnp.int32(delta - 1))
  d_state = inner.init(params)
  t = _median_seconds(
      {
          "dense_train_step": lambda: dense_step(params, d_state),
          "srigl_train_step": lambda: sp_step(s_params, s_state),
          "srigl_update_train_step": lambda: sp_step(s_params, u_state),
      },
      repeats * 5,
  )
  amortised = ((delta - 1) * t["srigl_train_step"] + t["srigl_update_train_step"]) / delta
  return {
      "delta": delta,
      "sparsity": sparsity,
      **{f"{k}_ms": v * 1e3 for k, v in t.items()},
      "amortised_srigl_step_ms": amortised * 1e3,
      "amortised_overhead": amortised / t["dense_train_step"] - 1.0,
  }


def _main(argv: Sequence[str], fv: flags.FlagValues) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  result = {
      "device": f"{jax.devices()[0].platform}:{platform.processor() or platform.machine()}",
      "jax": jax.__version__,
      "cnn": bench_cnn_overhead(fv.repeats, fv.sparsity, fv.delta),
  }
  print(json.dumps(result["cnn"], indent=2))
  if not fv.skip_resnet50:
    result["resnet50"] = bench_resnet50(fv.repeats, fv.sparsity, fv.train_batch)
    print(json.dumps(result["resnet50"], indent=2))
  if fv.json:
    with open(fv.json, "w") as f:
      json.dump(result, f, indent=2)


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the benchmark with the command-line flags ``argv`` (default ``sys.argv[1:]``)."""
  fv = define_flags(flags.FlagValues())
  _main(fv([__name__, *(sys.argv[1:] if argv is None else argv)]), fv)


if __name__ == "__main__":
  app.run(functools.partial(_main, fv=define_flags(flags.FLAGS)))
