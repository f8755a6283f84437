r"""Per-call cost of the native kernels' operand checks: builds of the library side by side.

    python scripts/check_cost.py --lib=unchecked=/tmp/unchecked.so \
        --lib=checked=build/dev/libsrigl_condensed.so [--out=cost.json]

Each ``--lib=NAME=PATH`` is a build of csrc/ (e.g. one from before the
checks, built with ``cmake -S . -B /tmp/b && cmake --build /tmp/b`` in a
checkout of that commit); its FFI handlers are registered under their own
target names, so all of them run in one process on the same operands. Every
round calls each build once per case, in turn (`srigl_jax.timing`), so load
that comes and goes on a shared machine hits them alike; the medians and the
median of the per-round ratios to the first build are printed. The outputs
must agree bit for bit.

Cases: Dense 3072 -> 768 at 90% (fan-in 307) at batch 1 and 256, a small
Dense layer (196 neurons x 420 fan-in) at batch 1, both batch-1 cases also
on one thread, and a 3x3 SAME conv 64 -> 64 on 28x28 at 90% at batch 1 and
32.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import srigl_jax.condensed as C
from srigl_jax import timing
from srigl_jax.condensed import _native_lib

_LIBS = flags.DEFINE_multi_string("lib", [], "NAME=PATH of a build; the first is the baseline.")
_OUT = flags.DEFINE_string("out", "", "Write the results here as JSON.")
_BUDGET = flags.DEFINE_float("budget_s", 10.0, "Seconds of rounds per case (at least 50 rounds).")


def _register(libs: dict[str, str]) -> dict[tuple[str, str], str]:
  targets = {}
  for name, path in libs.items():
    lib = ctypes.cdll.LoadLibrary(path)
    for kind, kernel in _native_lib.KERNELS.items():
      target = f"{kernel.target}_{name}"
      capsule = jax.ffi.pycapsule(getattr(lib, kernel.handler))
      jax.ffi.register_ffi_target(target, capsule, platform="cpu")
      targets[(name, kind)] = target
  return targets


def _mask(rng, fan, n, k):
  mask = np.zeros((fan, n), bool)
  for j in range(n):
    mask[rng.choice(fan, k, replace=False), j] = True
  return mask


def _dense(rng, fan, n, k):
  kernel = rng.standard_normal((fan, n)).astype(np.float32)
  return C.condense_dense(kernel, _mask(rng, fan, n, k), rng.standard_normal(n).astype(np.float32))


def _conv(rng, cin, cout, k):
  kernel = rng.standard_normal((3, 3, cin, cout)).astype(np.float32)
  mask = _mask(rng, 9 * cin, cout, k).reshape(3, 3, cin, cout)
  bias = rng.standard_normal(cout).astype(np.float32)
  return C.condense_conv(kernel, mask, bias, padding="SAME")


def _dense_call(target, layer, batch, threads):
  x = jnp.asarray(np.random.default_rng(1).standard_normal((batch, layer.in_features)), jnp.float32)
  out = jax.ShapeDtypeStruct((batch, layer.out_features), jnp.float32)
  call = jax.ffi.ffi_call(target, out)
  f = jax.jit(
      lambda x: call(
          x,
          layer.indices,
          layer.values,
          layer.neuron_ids,
          layer.bias,
          max_threads=np.int64(threads),
          isa=np.int64(0),
      )
  )
  return lambda: f(x)


def _conv_call(target, layer, batch, hw, threads):
  x = np.random.default_rng(1).standard_normal((batch, hw, hw, layer.in_channels))
  x = jnp.asarray(x, jnp.float32)
  layer = layer.for_input(x.shape)
  geo = layer.geometry
  (pt, pb), (pl, pr) = geo.pads
  out = jax.ShapeDtypeStruct((batch, geo.oh, geo.ow, layer.out_channels), jnp.float32)
  call = jax.ffi.ffi_call(target, out)
  attrs = dict(kh=3, kw=3, sh=1, sw=1, pad_top=pt, pad_bottom=pb, pad_left=pl, pad_right=pr)
  f = jax.jit(
      lambda x: call(
          x,
          layer.taps,
          layer.values,
          layer.neuron_ids,
          layer.bias,
          max_threads=np.int64(threads),
          isa=np.int64(0),
          **{k: np.int64(v) for k, v in attrs.items()},
      )
  )
  return lambda: f(x)


def main(argv: Sequence[str]) -> None:
  del argv
  libs = dict(spec.split("=", 1) for spec in _LIBS.value)
  if len(libs) < 2:
    raise app.UsageError("give at least two --lib=NAME=PATH")
  targets = _register(libs)
  rng = np.random.default_rng(0)
  big, small, conv = (
      _dense(rng, 3072, 768, 307),
      _dense(rng, 4200, 196, 420),
      _conv(rng, 64, 64, 58),
  )
  cases = {
      "dense 3072->768 90% b1": ("dense", lambda t: _dense_call(t, big, 1, 0)),
      "dense 3072->768 90% b1 1 thread": ("dense", lambda t: _dense_call(t, big, 1, 1)),
      "dense 3072->768 90% b256": ("dense", lambda t: _dense_call(t, big, 256, 0)),
      "dense 196x420 b1": ("dense", lambda t: _dense_call(t, small, 1, 0)),
      "dense 196x420 b1 1 thread": ("dense", lambda t: _dense_call(t, small, 1, 1)),
      "conv3x3 28x28 64->64 90% b1": ("conv", lambda t: _conv_call(t, conv, 1, 28, 0)),
      "conv3x3 28x28 64->64 90% b32": ("conv", lambda t: _conv_call(t, conv, 32, 28, 0)),
  }
  base = next(iter(libs))
  results = {"cpu": timing.cpu_model(), "cases": {}}
  print(results["cpu"])
  with timing.sync_cpu_dispatch():
    for case, (kind, make) in cases.items():
      fns = {name: make(targets[(name, kind)]) for name in libs}
      want = np.asarray(fns[base]())
      for name, fn in fns.items():
        np.testing.assert_array_equal(np.asarray(fn()), want, err_msg=name)
      t = timing.time_interleaved(
          fns, budget_s=_BUDGET.value, max_rounds=5000, min_rounds=50, warmup=20
      )
      med = t.medians_us()
      ratios = {name: t.paired_ratio(name, base) for name in libs if name != base}
      results["cases"][case] = {"rounds": t.rounds, "median_us": med, "ratio_to_" + base: ratios}
      line = " ".join(f"{n}={med[n]:.1f}us" for n in libs)
      line += " " + " ".join(f"{n}/{base}={r:.3f}" for n, r in ratios.items())
      print(f"{case:34s} rounds={t.rounds:5d} {line}", flush=True)
  if _OUT.value:
    with open(_OUT.value, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
