"""Condensed vs dense convolution latency on ResNet-style layers.

Each layer (3x3 stride 1/2, 1x1, the 7x7 stride-2 stem, at ResNet-50 and
CIFAR ResNet-18 sizes) gets a random constant fan-in mask at each sparsity,
with part of the output channels ablated, and is timed with:

  dense           `lax.conv_general_dilated` on the masked kernel (+ bias)
  structured      the same with the ablated channels removed, their bias
                  placed back into the full output
  condensed_xla   `condensed_conv_xla`
  condensed_native `condensed_conv_native` (CPU)

Each layer is condensed for its input size (`condense_conv(..., input_hw=)`).

All impls of one (layer, sparsity, batch) point run round-robin in one
process, so that background load on a shared machine hits them alike; the
table gives medians and the dense / impl ratio of medians. JAX's asynchronous
CPU dispatch is off while timing (every call is waited for anyway).

    python -m srigl_jax.benchmarks.conv --json out.json
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from srigl_jax import condensed as C
from srigl_jax import timing

ALL_IMPLS = ("dense", "structured", "condensed_xla", "condensed_native")

# name: (h, w, cin, cout, kernel, stride, padding)
LAYERS = {
    "stem7x7s2": (224, 224, 3, 64, 7, 2, ((3, 3), (3, 3))),
    "r50_56_3x3": (56, 56, 64, 64, 3, 1, "SAME"),
    "r50_56_1x1": (56, 56, 64, 256, 1, 1, "VALID"),
    "r50_56_3x3s2": (56, 56, 128, 128, 3, 2, ((1, 1), (1, 1))),
    "r50_28_3x3": (28, 28, 128, 128, 3, 1, "SAME"),
    "r50_14_3x3": (14, 14, 256, 256, 3, 1, "SAME"),
    "r50_7_3x3": (7, 7, 512, 512, 3, 1, "SAME"),
    "c18_32_3x3": (32, 32, 64, 64, 3, 1, "SAME"),
}
# Fraction of output channels ablated at each sparsity (as in condensed.py).
DEFAULT_ABLATION = {0.8: 0.05, 0.9: 0.1, 0.95: 0.2, 0.99: 0.4}


def make_conv(rng, cin, cout, ksize, sparsity, ablation):
  """A random constant fan-in conv: (kernel, mask, bias) numpy arrays."""
  fan = ksize * ksize * cin
  n_active = max(1, round(cout * (1 - ablation)))
  k = max(1, min(fan, int(fan * cout * (1 - sparsity)) // n_active))
  mask = np.zeros((fan, cout), bool)
  for j in np.sort(rng.choice(cout, n_active, replace=False)):
    mask[rng.choice(fan, k, replace=False), j] = True
  shape = (ksize, ksize, cin, cout)
  kernel = (rng.standard_normal(shape) / np.sqrt(k)).astype(np.float32)
  bias = (0.1 * rng.standard_normal(cout)).astype(np.float32)
  return kernel, mask.reshape(shape), bias


def build_impls(impls, kernel, mask, bias, stride, padding, x_shape):
  """name -> jitted fn(x) for one layer."""
  layer = C.condense_conv(
      kernel, mask, bias, strides=(stride, stride), padding=padding, input_hw=x_shape[1:3]
  )
  conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (stride, stride), layer.geometry.pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  masked = jnp.asarray(np.where(mask, kernel, 0))
  b = jnp.asarray(bias)
  ids = np.asarray(layer.neuron_ids)
  out = {}
  for name in impls:
    if name == "dense":
      out[name] = jax.jit(lambda x, w=masked: conv(x, w) + b)
    elif name == "structured":
      ws = masked[..., ids]
      out[name] = jax.jit(lambda x, w=ws: layer.finish(conv(x, w)))
    elif name == "condensed_xla":
      out[name] = jax.jit(lambda x: C.condensed_conv_xla(x, layer))
    elif name == "condensed_native":
      if not C.native_available():
        continue
      out[name] = jax.jit(lambda x: C.condensed_conv_native(x, layer))
    else:
      raise ValueError(f"unknown impl {name!r}; choose from {ALL_IMPLS}")
  return out


def run(layers, sparsities, batches, impls, repeats, budget_s, seed=0, log=print):
  rng = np.random.default_rng(seed)
  records = []
  for name in layers:
    h, w, cin, cout, ks, stride, padding = LAYERS[name]
    for sp in sparsities:
      kernel, mask, bias = make_conv(rng, cin, cout, ks, sp, DEFAULT_ABLATION.get(sp, 0.1))
      for batch in batches:
        x = jnp.asarray(rng.standard_normal((batch, h, w, cin)), jnp.float32)
        fns = build_impls(impls, kernel, mask, bias, stride, padding, x.shape)
        calls = {n: functools.partial(f, x) for n, f in fns.items()}
        res = timing.time_interleaved(calls, budget_s=budget_s, max_rounds=repeats, warmup=1)
        us = res.medians_us()
        rec = dict(layer=name, sparsity=sp, batch=batch, us={n: round(t, 1) for n, t in us.items()})
        rec["round_us"] = {n: [t * 1e6 for t in s] for n, s in res.seconds.items()}
        if "dense" in us:
          rec["speedup_vs_dense"] = {n: round(us["dense"] / t, 2) for n, t in us.items()}
        records.append(rec)
        log(json.dumps(rec))
  return records


def format_table(records) -> str:
  impls = [n for n in ALL_IMPLS if any(n in r["us"] for r in records)]
  head = f"{'layer':14s} {'sp':>5s} {'batch':>5s} " + " ".join(f"{n:>16s}" for n in impls)
  lines = [head + "   (us, x = dense/impl)"]
  for r in records:
    cells = []
    for n in impls:
      us = r["us"].get(n)
      ratio = r.get("speedup_vs_dense", {}).get(n)
      cells.append(f"{us:>9.0f} {ratio:>5.2f}x" if us is not None else " " * 16)
    lines.append(f"{r['layer']:14s} {r['sparsity']:5.2f} {r['batch']:5d} " + " ".join(cells))
  return "\n".join(lines)


def define_flags(fv: flags.FlagValues) -> flags.FlagValues:
  """Defines this benchmark's command-line flags on ``fv``; returns it."""
  flags.DEFINE_list("layers", list(LAYERS), f"Layers, of {list(LAYERS)}.", flag_values=fv)
  flags.DEFINE_list("sparsities", ["0.8", "0.9", "0.95"], "Sparsities.", flag_values=fv)
  flags.DEFINE_list("batches", ["1", "64"], "Batch sizes.", flag_values=fv)
  flags.DEFINE_list("impls", list(ALL_IMPLS), f"Impls, of {ALL_IMPLS}.", flag_values=fv)
  flags.DEFINE_integer("repeats", 15, "Most timed rounds per point.", flag_values=fv)
  flags.DEFINE_float(
      "budget", 2.0, "Seconds of timing per point (at least 3 rounds).", flag_values=fv
  )
  flags.DEFINE_string(
      "json", None, "Write the records and machine to this JSON file.", flag_values=fv
  )
  return fv


def _main(argv: Sequence[str], fv: flags.FlagValues) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with timing.sync_cpu_dispatch():
    records = run(
        fv.layers,
        [float(s) for s in fv.sparsities],
        [int(s) for s in fv.batches],
        fv.impls,
        fv.repeats,
        fv.budget,
        log=lambda s: print(s, file=sys.stderr),
    )
  meta = dict(
      cpu=timing.cpu_model(),
      native_isa=C.native_isas("conv").get("auto", "unavailable"),
      devices=len(jax.devices()),
      jax=jax.__version__,
  )
  print(f"# {meta['cpu']}, native kernel: {meta['native_isa']}")
  print(format_table(records))
  if fv.json:
    with open(fv.json, "w") as f:
      json.dump(dict(meta=meta, records=records), f, indent=1)


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the benchmark with the command-line flags ``argv`` (default ``sys.argv[1:]``)."""
  fv = define_flags(flags.FlagValues())
  _main(fv([__name__, *(sys.argv[1:] if argv is None else argv)]), fv)


if __name__ == "__main__":
  app.run(functools.partial(_main, fv=define_flags(flags.FLAGS)))
