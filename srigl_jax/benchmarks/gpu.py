r"""Device time of the condensed kernels on a GPU, against honest baselines and the floor.

    python -m srigl_jax.benchmarks.gpu --json gpu_bench.json

The paper's layer, 3072 -> 768 (the ViT-B/16 MLP's second Dense) at 80, 90,
95 and 99% constant fan-in sparsity with part of the neurons ablated
(`condensed.DEFAULT_ABLATION`), batch 1, 16, 256 and 2048, fp32 and bf16.

Timing. A kernel is timed by device time, not by one jitted call per
dispatch: `timing.chained_calls` builds a program of N calls, each on its
own argument set (a fresh random input and a fresh copy of the weights) and
behind an optimization barrier that also takes the previous call's output,
so XLA can neither hoist, merge, fuse across nor drop a call, and every
output is returned. The device time of one call is ``(t_N - t_base) / (N -
n_base)`` (`timing.per_call_seconds`), ``t_base`` being the same program
with ``n_base`` calls (``--base-calls``, default 0) and the same arguments:
the dispatch, launch and synchronisation both pay once cancel. Medians over
interleaved repeats; the 25th and 75th percentiles of the per-round
estimates show the spread. The calls are independent in data, and XLA's
GPU command buffers overlap independent kernels by default, so the
benchmark serialises them (`serialize_command_buffers`, before the backend
starts; ``meta.command_buffers_serialized`` says whether it took). N makes
the program run about ``--target-ms``, within ``--min-calls`` and
``--max-calls``, and where it can, N sets total at least ``--cold-factor``
times the L2 (the CPU's last-level cache) so that the cache is not what is
measured; a record says whether they exceeded it once (``cache_cold``; the
smallest sets, batch 1 at high sparsity, stay in L2). For the first sparsity
(``--profile``) a profiler trace of one run of the long program gives the
device's own account: ``profiler_busy_us`` per call (kernels only, no launch
gaps) and ``profiler_overlap`` (1.0 when no two kernels ran at once).
Beside all this, ``e2e_us`` is the usual wall time of one jitted call per
dispatch over the same sets (median, waited for), which on a GPU is mostly
launch overhead at small sizes.

Correctness first. Every kernel is checked on two fresh random inputs
against a float64 product of the very values it computes with (the weights
and input rounded to its dtype): ``rel_err = |out - ref| / |ref|``
(Frobenius norms), within 2e-5 for fp32, 2e-3 for TF32 and 1e-2 for bf16
(METHOD.md's ranges; NaN fails). Before each check, freed device memory is
filled with NaN where the output and the kernel's temporaries will most
likely land (`_poison`), so an element the kernel leaves unwritten shows up
as NaN or as a value of an earlier input, and fails. A record also names the
precision its error points to (``precision_seen``): an fp32 dot at default
precision that lands near 3e-4 ran on TF32.

Baselines, each labelled with its precision: dense ``x @ W`` on the full
random kernel at ``precision=HIGHEST`` (true fp32), at default precision
(TF32 on Ampere and newer GPUs) and in bf16; structured (the masked kernel
of the active neurons only, a dense matmul, placed into the full width) in
the same three variants; BCSR (`jax.experimental.sparse`, fp32). Sparse
kernels: condensed Pallas (``impl='pallas'``; interpreted on CPU) and XLA
(``impl='xla'``, its fp32 einsum at float32 precision), fp32 and bf16. The
dense baselines do not depend on the sparsity and are timed once per batch.

The floor of each record: its FLOPs (``2 * MACs * batch``; MACs ``in * out``
for dense, ``in * n_active`` for structured, the stored non-zeros for
sparse kernels) over the rate of the unit that does them (``unit``: fp32 on
the CUDA cores, which is what the gather kernels use in both dtypes; tf32 or
bf16 on the tensor cores for the dense products), and the bytes it must move
(its weights, indices and bias, the input and the output, each once) over
the memory bandwidth. The larger is the floor (``floor_kind`` says which);
``fraction_of_floor = floor / device_time``. Rates and bandwidth are
measured in the same run (a large device-to-device copy, bytes read plus
written; large fp32-HIGHEST, default-precision and bf16 matrix products on
random data); `DEVICE_TABLE` holds the values seen on this workplace's
H100/H200 and the datasheet rates, used where a ceiling was not measured.

Adding a kernel: `register(Impl(...))` with a builder ``(kernel, mask, bias,
dtype) -> Built`` (see `Impl`); it is then checked, timed, floored, tabled
and exported for CUDA by tests/test_gpu_lowering.py like the others.

``--tiny``: small sizes and few calls for a CPU (the test runs it); on a CPU
"device time" is the same loop method on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.experimental import sparse

from srigl_jax import condensed as C
from srigl_jax import timing
from srigl_jax.benchmarks.condensed import DEFAULT_ABLATION, llc_bytes, make_layer

__all__ = [
    "DEVICE_TABLE",
    "IMPLS",
    "REL_ERR_BOUNDS",
    "Built",
    "DevicePeaks",
    "Impl",
    "case_counts",
    "floor_seconds",
    "main",
    "plan_calls",
    "register",
    "rel_err",
]

# Relative error bounds by precision (METHOD.md: fp32 far under 1e-3, TF32
# near 3e-4, bf16 operands between 1e-3 and 1e-2). The fp32 bound sits well
# under TF32's error, so a "fp32" kernel that ran on TF32 fails its check.
REL_ERR_BOUNDS = {"fp32": 2e-5, "tf32": 2e-3, "bf16": 1e-2}


# ------------------------------------------------------------------ ceilings


@dataclasses.dataclass(frozen=True)
class DevicePeaks:
  """What a device can do at best: the denominators of the floor.

  Attributes:
    bandwidth: bytes/s of a device-to-device copy, bytes read plus written.
    rates: unit ('fp32', 'tf32', 'bf16') -> FLOP/s.
    l2_bytes: the last cache level the rotation must exceed.
    source: where the numbers come from.
  """

  bandwidth: float
  rates: dict[str, float]
  l2_bytes: int
  source: str


# Keyed by a substring of `jax.Device.device_kind` ('NVIDIA H200', 'NVIDIA
# H100 80GB HBM3'). Copy bandwidth and bf16 rate as measured on this
# workplace's machines (.library/device/KINDS.md: H200 4.3 TB/s and 769-798
# TFLOP/s, 2026-10-28/11-04; H100 3.0 TB/s and 798 TFLOP/s, 2026-11-13);
# fp32 (CUDA cores) and dense TF32 from the SXM datasheet; L2 as PyTorch
# reported it there.
DEVICE_TABLE = {
    "H200": DevicePeaks(
        bandwidth=4.3e12,
        rates={"fp32": 67e12, "tf32": 495e12, "bf16": 790e12},
        l2_bytes=60 * 2**20,
        source="KINDS.md measured copy and bf16 matmul; datasheet fp32/tf32",
    ),
    "H100": DevicePeaks(
        bandwidth=3.0e12,
        rates={"fp32": 67e12, "tf32": 495e12, "bf16": 798e12},
        l2_bytes=50 * 2**20,
        source="KINDS.md measured copy and bf16 matmul; datasheet fp32/tf32",
    ),
}


def table_peaks(device_kind: str) -> DevicePeaks | None:
  """The `DEVICE_TABLE` entry whose key ``device_kind`` contains, else None."""
  return next((p for k, p in DEVICE_TABLE.items() if k in device_kind), None)


def device_seconds(
    fn: Callable,
    xs: tuple,
    params: tuple,
    n: int,
    n_base: int,
    repeats: int,
    budget_s: float,
    extra: dict[str, Callable] | None = None,
) -> tuple[float, list[float], timing.Timings, Callable]:
  """Device seconds per call of ``fn`` by the chained-call method.

  Args:
    fn: ``fn(x, params)``.
    xs, params: the R argument sets the calls rotate over.
    n, n_base: calls of the long and of the base program.
    repeats, budget_s: rounds of `timing.time_interleaved`.
    extra: more functions timed in the same rounds (e.g. the e2e call).

  Returns:
    (seconds per call from the medians, the per-round estimates, the raw
    timings, the program of ``n`` calls).
  """
  long_program = timing.chained_calls(fn, n)
  base_program = timing.chained_calls(fn, n_base)
  res = timing.time_interleaved(
      {
          "n": lambda: long_program(xs, params),
          "base": lambda: base_program(xs, params),
          **(extra or {}),
      },
      budget_s=budget_s,
      max_rounds=repeats,
      min_rounds=min(3, repeats),
      warmup=1,
  )
  t_n, t_b = (float(np.median(res.seconds[k])) for k in ("n", "base"))
  rounds = [
      timing.per_call_seconds(a, b, n, n_base)
      for a, b in zip(res.seconds["n"], res.seconds["base"])
  ]
  return timing.per_call_seconds(t_n, t_b, n, n_base), rounds, res, long_program


def measure_ceilings(copy_mib: int, matmul_n: int, repeats: int) -> dict[str, Any]:
  """Copy bandwidth and matrix-product rates, measured here on random data.

  A copy ``y = a * s`` of ``copy_mib`` MiB of float32 counts bytes read plus
  written; ``matmul_n``-cubed products count ``2 n^3`` FLOPs: float32 at
  HIGHEST (the 'fp32' unit), float32 at default precision ('tf32' on a GPU:
  TF32 tensor cores on Ampere and newer; 'fp32' elsewhere) and bf16. Each is
  timed by the chained-call method (3 calls against 1).

  Returns:
    ``{'bandwidth': bytes/s, 'rates': {unit: FLOP/s}}``.
  """
  rng = np.random.default_rng(1)
  key = jax.random.key(1)
  a = jax.random.normal(key, (copy_mib * 2**18,), jnp.float32)
  s = jnp.float32(1.0 + rng.random())

  def seconds(fn, x, p):
    # A copy of the arguments for each of the 3 calls (see `timing.chained_calls`).
    xs, ps = _copies(x, 3), _copies(p, 3)
    per, _, _, _ = device_seconds(fn, tuple(xs), tuple(ps), 3, 1, repeats, budget_s=0.0)
    return per

  out = {"bandwidth": 2 * a.nbytes / seconds(lambda x, p: x * p, a, s), "rates": {}}
  del a
  n = matmul_n
  m32 = jax.random.normal(key, (n, n), jnp.float32)
  variants = [
      ("fp32", jnp.float32, jax.lax.Precision.HIGHEST),
      (_resolve("fp32_default"), jnp.float32, None),
      ("bf16", jnp.bfloat16, None),
  ]
  for unit, dtype, precision in variants:
    if unit in out["rates"]:
      continue  # The default-precision product is plain fp32 off GPUs: measured already.
    m = m32.astype(dtype)
    t = seconds(lambda x, p, precision=precision: jnp.dot(x, p, precision=precision), m, m)
    out["rates"][unit] = 2 * n**3 / t
  return out


# ------------------------------------------------------------------ impls


@dataclasses.dataclass(frozen=True)
class Built:
  """A kernel ready to time.

  Attributes:
    fn: ``fn(x, params) -> (batch, out)``; jitted and chained by the caller.
    params: the pytree of device arrays one call reads (weights, indices,
      bias); copies of it are what the calls rotate over.
    weight: ``(in, out)`` float64, the kernel ``fn`` computes with (after
      rounding to its dtype), for the reference.
    bias: ``(out,)`` float64, likewise.
  """

  fn: Callable[[jax.Array, Any], jax.Array]
  params: Any
  weight: np.ndarray
  bias: np.ndarray


@dataclasses.dataclass(frozen=True)
class Impl:
  """One timed kernel: its builder and what it is counted against.

  Attributes:
    name: the record's ``impl``.
    dtype: 'float32' or 'bfloat16': input, weights and output.
    precision: label of the arithmetic: 'fp32', 'bf16', or 'fp32_default'
      (an fp32 dot at default precision: 'tf32' on a GPU, 'fp32' elsewhere).
    unit: the rate its FLOPs are counted at for the floor ('fp32', 'tf32',
      'bf16' or 'fp32_default', resolved like ``precision``).
    work: 'dense' (``in * out`` MACs per row), 'active' (``in * n_active``)
      or 'nnz' (the stored non-zeros): which MACs the floor counts.
    baseline: a reference point (dense, structured, BCSR) rather than a
      kernel under test; the table's ``best`` is the fastest non-baseline.
    build: ``build(kernel, mask, bias, dtype) -> Built`` from numpy float32
      ``kernel (in, out)``, bool ``mask (in, out)``, float32 ``bias (out,)``
      and the jnp dtype. 'dense' builders use the full kernel, the others
      the masked one.
    platforms: backends it runs on.
    grouped: the kernel needs a group-shared mask (G consecutive neurons
      sharing one index set): it runs only with ``--group-size`` G > 1, and
      its builder also gets ``group_size=G``.
  """

  name: str
  dtype: str
  precision: str
  unit: str
  work: str
  baseline: bool
  build: Callable[..., Built]
  platforms: tuple[str, ...] = ("cpu", "gpu")
  grouped: bool = False


IMPLS: dict[str, Impl] = {}


def register(impl: Impl) -> Impl:
  """Adds ``impl`` to `IMPLS` (the benchmark's default list, in registration order)."""
  if impl.name in IMPLS:
    raise ValueError(f"impl {impl.name!r} is registered already")
  if impl.work not in ("dense", "active", "nnz"):
    raise ValueError(f"impl {impl.name!r}: work must be dense, active or nnz, got {impl.work!r}")
  IMPLS[impl.name] = impl
  return impl


def _resolve(label: str, backend: str | None = None) -> str:
  """'fp32_default' -> 'tf32' on a GPU (JAX's default fp32 dot there), else 'fp32'."""
  if label != "fp32_default":
    return label
  return "tf32" if (backend or jax.default_backend()) == "gpu" else "fp32"


def _f64(a) -> np.ndarray:
  return np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64)


def _dense_builder(precision):
  def build(kernel, mask, bias, dtype):
    del mask  # The dense baseline is the unpruned layer: a full random kernel.
    w, b = jnp.asarray(kernel, dtype), jnp.asarray(bias, dtype)
    fn = lambda x, p: jnp.dot(x, p["w"], precision=precision) + p["b"]
    return Built(fn, {"w": w, "b": b}, _f64(w), _f64(b))

  return build


def _structured_builder(precision):
  def build(kernel, mask, bias, dtype):
    masked = jnp.asarray(np.where(mask, kernel, 0), dtype)
    s = C.structured_from_mask(np.asarray(masked), mask, np.asarray(jnp.asarray(bias, dtype)))

    def fn(x, p):
      y = jnp.dot(x, p["kernel"], precision=precision) + p["bias"][p["ids"]]
      full = jnp.broadcast_to(p["bias"], (x.shape[0], p["bias"].shape[0]))
      return full.at[:, p["ids"]].set(y, unique_indices=True, indices_are_sorted=True)

    params = {"kernel": s.kernel, "ids": s.neuron_ids, "bias": s.bias}
    return Built(fn, params, _f64(masked), _f64(s.bias))

  return build


def _bcsr_build(kernel, mask, bias, dtype):
  masked = jnp.asarray(np.where(mask, kernel, 0), dtype)
  m = sparse.BCSR.fromdense(masked.T)  # (out, in): a row per neuron
  b = jnp.asarray(bias, dtype)
  fn = lambda x, p: (p["m"] @ x.T).T + p["b"]
  return Built(fn, {"m": m, "b": b}, _f64(masked), _f64(b))


# Whether the Pallas kernels run in the interpreter; None: unless the default
# backend is a GPU. Read when a call is traced (tests/test_gpu_lowering.py sets
# False to export the GPU programs from a CPU).
PALLAS_INTERPRET: bool | None = None


def _pallas_interpret() -> bool:
  return jax.default_backend() != "gpu" if PALLAS_INTERPRET is None else PALLAS_INTERPRET


def _condensed_builder(impl: str):
  def build(kernel, mask, bias, dtype):
    masked = np.where(mask, kernel, 0).astype(dtype)
    layer = C.condense_dense(masked, mask, np.asarray(bias).astype(dtype))
    if impl == "pallas":

      def fn(x, l):
        if _pallas_interpret():
          # The Pallas interpreter: the same kernel, run by XLA on the CPU.
          return C.condensed_matmul_pallas(x, l.for_input(x.shape), interpret=True)
        return C.condensed_matmul(x, l, impl="pallas")

    elif impl == "xla" and jnp.dtype(dtype) == jnp.float32:

      def fn(x, l):
        # Its einsum would run on TF32 at default precision on a GPU.
        with jax.default_matmul_precision("float32"):
          return C.condensed_matmul(x, l, impl="xla")

    else:
      fn = lambda x, l: C.condensed_matmul(x, l, impl=impl)
    return Built(fn, layer, _f64(masked), _f64(layer.bias))

  return build


_HIGHEST = jax.lax.Precision.HIGHEST
for _kind, _builder, _work in (
    ("dense", _dense_builder, "dense"),
    ("structured", _structured_builder, "active"),
):
  register(
      Impl(f"{_kind}_fp32_highest", "float32", "fp32", "fp32", _work, True, _builder(_HIGHEST))
  )
  register(
      Impl(
          f"{_kind}_fp32_default",
          "float32",
          "fp32_default",
          "fp32_default",
          _work,
          True,
          _builder(None),
      )
  )
  register(Impl(f"{_kind}_bf16", "bfloat16", "bf16", "bf16", _work, True, _builder(None)))
register(Impl("bcsr_fp32", "float32", "fp32", "fp32", "nnz", True, _bcsr_build))
# The gather kernels multiply and add in float32 on the CUDA cores in both
# dtypes (bf16 values are widened), hence unit 'fp32'.
for _impl in ("pallas", "xla"):
  for _dtype, _precision in (("float32", "fp32"), ("bfloat16", "bf16")):
    register(
        Impl(
            f"condensed_{_impl}_{_precision}",
            _dtype,
            _precision,
            "fp32",
            "nnz",
            False,
            _condensed_builder(_impl),
        )
    )


def _grouped_builder(impl: str):
  def build(kernel, mask, bias, dtype, group_size):
    masked = np.where(mask, kernel, 0).astype(dtype)
    layer = C.condense_grouped_dense(
        masked, mask, np.asarray(bias).astype(dtype), group_size=group_size
    )
    if impl == "pallas":

      def fn(x, l):
        if _pallas_interpret():
          return C.grouped_matmul_pallas(x, l.for_input(x.shape), interpret=True)
        return C.condensed_matmul(x, l, impl="pallas")

    elif jnp.dtype(dtype) == jnp.float32:

      def fn(x, l):
        # Its batched dot would run on TF32 at default precision on a GPU.
        with jax.default_matmul_precision("float32"):
          return C.condensed_matmul(x, l, impl="xla")

    else:
      fn = lambda x, l: C.condensed_matmul(x, l, impl="xla")
    return Built(fn, layer, _f64(masked), _f64(layer.bias))

  return build


# Grouped kernels (G consecutive neurons sharing one index set): a small
# dense (batch x k) @ (k x G) product per group, which the Pallas kernel runs
# on the tensor cores (fp32 as TF32, its default). They run with
# --group-size G > 1, every impl then on the same group-shared layer.
for _impl, _dtype, _precision, _unit in (
    ("pallas", "float32", "fp32_default", "fp32_default"),
    ("pallas", "bfloat16", "bf16", "bf16"),
    ("xla", "float32", "fp32", "fp32"),
    ("xla", "bfloat16", "bf16", "bf16"),
):
  _label = "tf32" if _precision == "fp32_default" else _precision
  register(
      Impl(
          f"grouped_{_impl}_{_label}",
          _dtype,
          _precision,
          _unit,
          "nnz",
          False,
          _grouped_builder(_impl),
          grouped=True,
      )
  )


# ------------------------------------------------------------------ counting


def tree_nbytes(tree) -> int:
  """Bytes of every array leaf of ``tree``."""
  return int(sum(a.nbytes for a in jax.tree.leaves(tree) if hasattr(a, "nbytes")))


def case_counts(work: str, mask: np.ndarray, params: Any, batch: int, dtype) -> tuple[int, int]:
  """FLOPs and the fewest bytes one call must move.

  Args:
    work: the impl's `Impl.work`.
    mask: ``(in, out)`` bool mask of the layer.
    params: the arrays the call reads (all counted once).
    batch: rows of the input.
    dtype: dtype of the input and output.

  Returns:
    ``(flops, bytes)``: ``2 * MACs * batch``, and the params' bytes plus the
    input's and the output's.
  """
  fan_in, out = mask.shape
  if work == "dense":
    macs = fan_in * out
  elif work == "active":
    macs = fan_in * int(mask.any(axis=0).sum())
  else:
    macs = int(mask.sum())
  itemsize = jnp.dtype(dtype).itemsize
  return 2 * macs * batch, tree_nbytes(params) + batch * (fan_in + out) * itemsize


def floor_seconds(flops: int, nbytes: int, rate: float, bandwidth: float) -> tuple[float, str]:
  """The larger of FLOPs over the unit's rate and bytes over bandwidth, and which it is."""
  t_flops, t_bytes = flops / rate, nbytes / bandwidth
  return (t_flops, "flops") if t_flops >= t_bytes else (t_bytes, "bytes")


def plan_calls(
    e2e_s: float,
    set_bytes: int,
    cold_bytes: int,
    target_s: float,
    min_calls: int,
    max_calls: int,
) -> int:
  """Calls N of the long program, one argument set each.

  N makes the program run about ``target_s`` (from the e2e time, an upper
  bound of the device time) and is at least the sets needed to exceed
  ``cold_bytes``, within ``[min_calls, max_calls]``.

  Returns:
    N.
  """
  want = max(1, math.ceil(cold_bytes / max(1, set_bytes)))
  n = max(round(target_s / max(e2e_s, 1e-9)), want)
  return int(min(max(n, min_calls), max_calls))


def rel_err(out, ref: np.ndarray) -> float:
  """``|out - ref| / |ref|`` in Frobenius norm; inf when ``out`` is not all finite."""
  out = np.asarray(jnp.asarray(out).astype(jnp.float32), np.float64)
  if out.shape != ref.shape or not np.isfinite(out).all():
    return float("inf")
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-300))


def precision_seen(err: float) -> str:
  """The narrowest precision whose bound ``err`` meets ('fp32', 'tf32', 'bf16'), else 'wrong'."""
  return next((p for p, bound in REL_ERR_BOUNDS.items() if err <= bound), "wrong")


# A word that reads as NaN in float32 and as two NaNs in bfloat16.
_NAN_WORD = 0x7FC07FC0
# The large poisoned block: room for a kernel's temporary buffers.
_POISON_BYTES = 64 * 2**20


def _poison(nbytes: int) -> None:
  """Fills freed device memory with NaN where the next outputs are likely to land.

  One block of ``nbytes`` (an output's size) and one large block are
  allocated full of NaN and freed, for the allocator to hand out again. It
  is a likelihood, not a guarantee: the check's real guard is its fresh
  input, for which a stale value left by an earlier call is wrong too.
  """
  blocks = [jnp.full((max(1, n // 4),), _NAN_WORD, jnp.uint32) for n in (nbytes, _POISON_BYTES)]
  jax.block_until_ready(blocks)
  del blocks


def check(jitted: Callable, built: Built, batch: int, dtype, rng) -> float:
  """The larger relative error of two calls on fresh random inputs (see module doc)."""
  worst = 0.0
  for _ in range(2):
    x = jnp.asarray(rng.standard_normal((batch, built.weight.shape[0])), dtype)
    ref = _f64(x) @ built.weight + built.bias
    _poison(ref.size * jnp.dtype(dtype).itemsize)
    worst = max(worst, rel_err(jitted(x, built.params), ref))
  return worst


# ------------------------------------------------------------------ running


def _copies(tree, n: int) -> list:
  """``tree`` and n - 1 copies of it in fresh buffers."""
  return [tree] + [jax.tree.map(lambda a: jnp.array(a, copy=True), tree) for _ in range(n - 1)]


def time_case(
    impl: Impl,
    built: Built,
    mask: np.ndarray,
    batch: int,
    rng,
    opts,
    peaks: DevicePeaks,
    profile: bool = False,
) -> dict:
  """Checks, times and floors one impl at one batch size; its record (see the module doc)."""
  dtype = jnp.dtype(impl.dtype)
  fan_in, _ = built.weight.shape
  jitted = jax.jit(built.fn)
  err = check(jitted, built, batch, dtype, rng)
  flops, nbytes = case_counts(impl.work, mask, built.params, batch, dtype)
  set_bytes = tree_nbytes(built.params) + batch * fan_in * dtype.itemsize
  # A first e2e estimate (an upper bound of the device time) sizes N.
  x0 = jnp.asarray(rng.standard_normal((batch, fan_in)), dtype)
  estimate = timing.time_interleaved(
      {"e2e": lambda: jitted(x0, built.params)}, budget_s=0.0, max_rounds=3, warmup=1
  )
  n = plan_calls(
      estimate.median_us("e2e") * 1e-6,
      set_bytes,
      opts.cold_bytes,
      opts.target_ms * 1e-3,
      opts.min_calls,
      opts.max_calls,
  )
  # One set per call: a fresh random input and a fresh copy of the weights.
  xs = tuple(jnp.asarray(rng.standard_normal((batch, fan_in)), dtype) for _ in range(n))
  params = tuple(_copies(built.params, n))
  turn = iter(range(2**62))

  def e2e_call():
    # One jitted call per dispatch, waited for: the wall time a caller sees,
    # over the same sets.
    i = next(turn) % n
    return jitted(xs[i], params[i])

  per, rounds, res, program = device_seconds(
      built.fn, xs, params, n, opts.base_calls, opts.repeats, opts.budget, {"e2e": e2e_call}
  )
  e2e_s = float(np.median(res.seconds["e2e"]))
  seen = timing.trace_device_time(lambda: program(xs, params), n) if profile else None
  unit = _resolve(impl.unit)
  floor, kind = floor_seconds(flops, nbytes, peaks.rates[unit], peaks.bandwidth)
  return dict(
      impl=impl.name,
      precision=_resolve(impl.precision),
      dtype=impl.dtype,
      unit=unit,
      batch=batch,
      device_time_us=per * 1e6,
      device_time_p25_us=float(np.percentile(rounds, 25)) * 1e6,
      device_time_p75_us=float(np.percentile(rounds, 75)) * 1e6,
      e2e_us=e2e_s * 1e6,
      floor_us=floor * 1e6,
      floor_kind=kind,
      fraction_of_floor=floor / per if per > 0 else float("nan"),
      flops=flops,
      bytes=nbytes,
      rel_err=err,
      rel_err_bound=REL_ERR_BOUNDS[_resolve(impl.precision)],
      precision_seen=precision_seen(err),
      calls=n,
      base_calls=opts.base_calls,
      rotated_bytes=n * set_bytes,
      cache_cold=n * set_bytes >= opts.cache_bytes,
      repeats=len(rounds),
      **{
          f"profiler_{k}": v
          for k, v in (seen or dict(busy_us=None, span_us=None, overlap=None)).items()
      },
  )


def _resolve_peaks(device_kind: str, measured: dict | None, cache_bytes: int) -> DevicePeaks:
  """Measured ceilings where there are some, else the table's; errors if neither."""
  table = table_peaks(device_kind)
  if measured is None and table is None:
    raise ValueError(
        f"no ceilings for {device_kind!r}: run with --measure-ceilings or add it to DEVICE_TABLE"
    )
  rates = dict(table.rates) if table else {}
  if measured:
    rates.update(measured["rates"])
  return DevicePeaks(
      bandwidth=measured["bandwidth"] if measured else table.bandwidth,
      rates=rates,
      l2_bytes=cache_bytes,
      source="measured here" + (f"; else {table.source}" if table else "")
      if measured
      else table.source,
  )


def _short(name: str) -> str:
  for long, short in (
      ("condensed_", "cond_"),
      ("structured_", "struct_"),
      ("_highest", "_hi"),
      ("_default", "_def"),
  ):
    name = name.replace(long, short)
  return name


def print_table(records: list[dict]) -> None:
  """Device time (us) per impl for each (sparsity, batch), one table per dtype.

  ``best`` is the fastest kernel under test (not a baseline), with its share
  of its floor and its speed-up over each baseline of the same precision.
  """
  for dtype in ("float32", "bfloat16"):
    rows = [r for r in records if r["dtype"] == dtype]
    if not rows:
      continue
    names = list(dict.fromkeys(r["impl"] for r in rows))
    kernels = [n for n in names if not IMPLS[n].baseline]
    keys = sorted({(r["sparsity"], r["batch"]) for r in rows if r["sparsity"] is not None})
    labels = ", ".join(
        f"{_short(n)}={r['precision']}" for n, r in {r["impl"]: r for r in rows}.items()
    )
    print(f"\ndevice time per call (us), {dtype} [{labels}]")
    print(f"{'spars':>5} {'batch':>5} " + " ".join(f"{_short(n):>15}" for n in names) + "  best")
    for s, b in keys:
      t = {
          r["impl"]: r
          for r in rows
          if r["batch"] == b and (r["sparsity"] == s or r["sparsity"] is None)
      }
      line = f"{s:>5} {b:>5} " + " ".join(
          f"{t[n]['device_time_us']:>15.2f}" if n in t else f"{'-':>15}" for n in names
      )
      cands = [n for n in kernels if n in t]
      if cands:
        best = min(cands, key=lambda n: t[n]["device_time_us"])
        bt = t[best]
        ratios = [
            f"{_short(n)} {t[n]['device_time_us'] / bt['device_time_us']:.2f}x"
            for n in names
            if n in t and IMPLS[n].baseline and t[n]["precision"] == bt["precision"]
        ]
        line += f"  {_short(best)} ({100 * bt['fraction_of_floor']:.0f}% of floor)"
        line += f" vs {', '.join(ratios)}" if ratios else ""
      print(line)
  bad = [r for r in records if r["rel_err"] > r["rel_err_bound"]]
  for r in bad:
    print(
        f"FAILED CHECK {r['impl']} s={r['sparsity']} b={r['batch']}: rel_err "
        f"{r['rel_err']:.2e} > {r['rel_err_bound']:.0e}"
    )


TINY = dict(
    in_features=96,
    out_features=40,
    sparsities=[0.9],
    batch_sizes=[3],
    repeats=3,
    budget=0.0,
    min_calls=2,
    max_calls=3,
    copy_mib=8,
    matmul_n=128,
)


def define_flags(fv: flags.FlagValues) -> flags.FlagValues:
  """Defines this benchmark's command-line flags on ``fv``; returns it."""
  flags.DEFINE_integer("in-features", 3072, "Input features of the layer.", flag_values=fv)
  flags.DEFINE_integer("out-features", 768, "Output features of the layer.", flag_values=fv)
  flags.DEFINE_list(
      "sparsities", ["0.9", "0.99", "0.8", "0.95"], "Sparsities, in this order.", flag_values=fv
  )
  flags.DEFINE_list("batch-sizes", ["1", "16", "256", "2048"], "Batch sizes.", flag_values=fv)
  flags.DEFINE_list("impls", list(IMPLS), "Impls, of the registry.", flag_values=fv)
  flags.register_validator("impls", lambda v: set(v) <= set(IMPLS), "unknown impls", flag_values=fv)
  flags.DEFINE_integer("repeats", 15, "Most timed rounds per program.", flag_values=fv)
  flags.DEFINE_float(
      "budget", 0.3, "Seconds of timing per impl and batch (at least 3 rounds).", flag_values=fv
  )
  flags.DEFINE_float("target-ms", 3.0, "Aimed length of the N-call program.", flag_values=fv)
  flags.DEFINE_integer("min-calls", 8, "Fewest calls N of the long program.", flag_values=fv)
  # Compiling the long program costs about N times one call's compile (XLA
  # inlines every call), and compiling, not running, bounds the sweep's time.
  flags.DEFINE_integer(
      "max-calls", 24, "Most calls N (and argument sets) of the long program.", flag_values=fv
  )
  flags.DEFINE_enum(
      "base-calls",
      "0",
      ["0", "1"],
      "Calls of the base program (0 compiles no kernel; 1 also cancels the first launch).",
      flag_values=fv,
  )
  flags.DEFINE_float(
      "cold-factor", 2.0, "Rotated sets total at least this many times the cache.", flag_values=fv
  )
  flags.DEFINE_integer(
      "cache-bytes",
      None,
      "The cache to exceed (default: the table's L2, or the CPU's LLC).",
      flag_values=fv,
  )
  flags.DEFINE_bool(
      "measure-ceilings", True, "Measure copy bandwidth and matmul rates first.", flag_values=fv
  )
  flags.DEFINE_integer("copy-mib", 512, "Size of the bandwidth copy.", flag_values=fv)
  flags.DEFINE_integer("matmul-n", 8192, "Side of the rate matrix products.", flag_values=fv)
  flags.DEFINE_float(
      "time-budget-s",
      0.0,
      "Start no new (sparsity, batch) case after this many seconds (0: no limit).",
      flag_values=fv,
  )
  flags.DEFINE_string(
      "trace-dir",
      None,
      "Write a jax.profiler trace of one case (the first sparsity at --trace-batch) here.",
      flag_values=fv,
  )
  flags.DEFINE_integer("trace-batch", 256, "Batch size of the traced case.", flag_values=fv)
  flags.DEFINE_enum(
      "profile",
      "first",
      ["first", "all", "none"],
      "Also read each long program's device busy time from a profiler trace: for the first "
      "sparsity (and the dense baselines), all, or none.",
      flag_values=fv,
  )
  flags.DEFINE_bool(
      "serialize",
      True,
      f"Run XLA's GPU command buffers in order ({SERIALIZE_FLAG}), so that the independent "
      "calls of a chained program cannot overlap.",
      flag_values=fv,
  )
  flags.DEFINE_bool(
      "tiny", False, f"Small sizes for a CPU; overrides {sorted(TINY)}.", flag_values=fv
  )
  flags.DEFINE_integer(
      "group-size",
      1,
      "G > 1: every impl runs on a group-shared layer (G consecutive neurons share one "
      "index set), and the grouped impls run too.",
      lower_bound=1,
      flag_values=fv,
  )
  flags.DEFINE_integer("seed", 0, "Seed of the layers and inputs.", flag_values=fv)
  flags.DEFINE_string(
      "table-from", None, "Only print the table of this JSON file of a run.", flag_values=fv
  )
  flags.DEFINE_string("json", None, "Write the records to this JSON file.", flag_values=fv)
  return fv


def _options(fv: flags.FlagValues) -> types.SimpleNamespace:
  opts = types.SimpleNamespace(**{k.replace("-", "_"): v for k, v in fv.flag_values_dict().items()})
  opts.sparsities = [float(v) for v in opts.sparsities]
  opts.batch_sizes = [int(v) for v in opts.batch_sizes]
  opts.base_calls = int(opts.base_calls)
  if opts.tiny:
    for k, v in TINY.items():
      setattr(opts, k, v)
  return opts


SERIALIZE_FLAG = "--xla_gpu_command_buffer_scheduling_mode=SERIALIZE"


def serialize_command_buffers() -> str:
  """Adds `SERIALIZE_FLAG` to XLA_FLAGS before JAX starts its backends; what happened.

  XLA's GPU command buffers overlap independent kernels by default, and the
  calls of a chained program are independent in data (unlike a model's
  layers). XLA aborts the process on a flag it does not know, so the flag is
  tried first in a CPU-only subprocess (which parses the same flags).

  Returns:
    'set', 'already set', 'too late' (backends started before this call) or
    'unknown to this XLA'.
  """
  current = os.environ.get("XLA_FLAGS", "")
  if "xla_gpu_command_buffer_scheduling_mode" in current:
    return "already set"
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

    started = xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # A JAX without this private helper.
    started = False
  if started:
    return "too late"
  flags_value = f"{current} {SERIALIZE_FLAG}".strip()
  probe = subprocess.run(
      [sys.executable, "-c", "import jax; jax.devices()"],
      env=dict(os.environ, XLA_FLAGS=flags_value, JAX_PLATFORMS="cpu"),
      capture_output=True,
      timeout=120,
      check=False,
  )
  if probe.returncode != 0:
    return "unknown to this XLA"
  os.environ["XLA_FLAGS"] = flags_value
  return "set"


def _main(argv: Sequence[str], fv: flags.FlagValues) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  opts = _options(fv)
  if opts.table_from:
    # Reprint a finished run's table (starts no backend).
    with open(opts.table_from) as f:
      records = json.load(f)["records"]
    print_table(records)
    return int(any(r["rel_err"] > r["rel_err_bound"] for r in records))
  opts.serialized = serialize_command_buffers() if opts.serialize else "not asked"
  with timing.sync_cpu_dispatch():
    return run(opts)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the benchmark with the command-line flags ``argv`` (default ``sys.argv[1:]``)."""
  fv = define_flags(flags.FlagValues())
  return _main(fv([__name__, *(sys.argv[1:] if argv is None else argv)]), fv)


def group_shared_layer(rng, in_features, out_features, sparsity, ablation, group_size):
  """A random constant fan-in layer whose G consecutive neurons share one index set.

  Like `condensed.make_layer` with neurons taken G at a time: whole groups
  are ablated, and each active group draws one set of ``k`` inputs that its
  G neurons share (each neuron keeps its own weights). ``group_size`` 1 is
  `condensed.make_layer`'s layer.

  Returns:
    ``(kernel, mask, bias)`` as numpy arrays.

  Raises:
    ValueError: ``out_features`` is not a multiple of ``group_size``.
  """
  if out_features % group_size:
    raise ValueError(f"--group-size={group_size} does not divide {out_features} outputs")
  groups = out_features // group_size
  kernel, mask, bias = make_layer(rng, in_features, groups, sparsity, ablation, np.float32)
  # Group g's index set is neuron g's of a layer of `groups` neurons, with the
  # same density; fresh weights for every neuron of the group.
  mask = np.repeat(mask, group_size, axis=1)
  kernel = (rng.standard_normal(mask.shape) / np.sqrt(max(1, mask.sum(axis=0).max()))).astype(
      np.float32
  )
  bias = (0.1 * rng.standard_normal(out_features)).astype(np.float32)
  return kernel, mask, bias


def _layers(opts, rng):
  """The dense baselines' layer, then one ``(sparsity, ablation, kernel, mask, bias)`` per sparsity.

  The dense baselines use a full random kernel (the unpruned layer) and are
  timed once per batch; the others the sparsity's masked one (group-shared
  with ``--group-size`` > 1, for every impl alike).
  """
  kernel = rng.standard_normal((opts.in_features, opts.out_features)).astype(np.float32)
  kernel /= np.sqrt(opts.in_features)
  bias = (0.1 * rng.standard_normal(opts.out_features)).astype(np.float32)
  dense = (kernel, np.ones_like(kernel, bool), bias)
  for s in opts.sparsities:
    abl = DEFAULT_ABLATION.get(s, 0.1)
    layer = group_shared_layer(rng, opts.in_features, opts.out_features, s, abl, opts.group_size)
    yield dense, (s, abl, *layer)


def run(opts: types.SimpleNamespace) -> int:
  """The benchmark for parsed options (see `define_flags`); 1 if a check failed."""
  start = time.perf_counter()
  dev = jax.devices()[0]
  backend = jax.default_backend()
  table = table_peaks(dev.device_kind)
  opts.cache_bytes = opts.cache_bytes or (table.l2_bytes if table else llc_bytes())
  opts.cold_bytes = int(opts.cold_factor * opts.cache_bytes)
  measured = None
  if opts.measure_ceilings:
    measured = measure_ceilings(opts.copy_mib, opts.matmul_n, max(3, min(opts.repeats, 5)))
  peaks = _resolve_peaks(dev.device_kind, measured, opts.cache_bytes)
  common = dict(
      device_kind=dev.device_kind,
      platform=dev.platform,
      jax_version=jax.__version__,
      in_features=opts.in_features,
      out_features=opts.out_features,
      group_size=opts.group_size,
  )
  meta = dict(
      common,
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      command_buffers_serialized=getattr(opts, "serialized", "not asked"),
      cache_bytes=opts.cache_bytes,
      cold_bytes=opts.cold_bytes,
      ceilings=dict(
          measured=measured,
          table=dataclasses.asdict(table) if table else None,
          used=dataclasses.asdict(peaks),
      ),
      method=(
          "device time per call = (t_N - t_base) / (N - n_base) of chained-call programs "
          "(srigl_jax.timing.chained_calls), medians over interleaved repeats"
      ),
      skipped_impls={},
      skipped_cases=[],
  )
  print(
      f"{dev.device_kind} ({backend}, jax {jax.__version__}): copy "
      f"{peaks.bandwidth / 1e9:.0f} GB/s, "
      + ", ".join(f"{u} {r / 1e12:.2f} TFLOP/s" for u, r in peaks.rates.items())
      + f"; rotation over >= {opts.cold_bytes / 2**20:.0f} MiB ({peaks.source})",
      flush=True,
  )
  impls = []
  for name in opts.impls:
    if backend not in IMPLS[name].platforms:
      meta["skipped_impls"][name] = f"not on {backend}"
    elif IMPLS[name].grouped and opts.group_size == 1:
      meta["skipped_impls"][name] = "needs --group-size > 1"
    else:
      impls.append(IMPLS[name])
  records: list[dict] = []

  def write():
    if opts.json:
      with open(opts.json, "w") as f:
        json.dump({"meta": meta, "records": records}, f, indent=1)

  rng = np.random.default_rng(opts.seed)
  dense_done: set[int] = set()
  for dense_layer, (s, abl, kernel, mask, bias) in _layers(opts, rng):
    built: dict[str, Built] = {}
    layer_info = dict(
        sparsity=s,
        ablation=abl,
        n_active=int(mask.any(axis=0).sum()),
        fan_in=int(mask.sum(axis=0).max()),
    )
    dense_info = dict(
        sparsity=None, ablation=None, n_active=opts.out_features, fan_in=opts.in_features
    )
    for batch in opts.batch_sizes:
      if opts.time_budget_s and time.perf_counter() - start > opts.time_budget_s:
        meta["skipped_cases"].append(dict(sparsity=s, batch=batch, why="time budget"))
        continue
      traced = opts.trace_dir and s == opts.sparsities[0] and batch == opts.trace_batch
      with jax.profiler.trace(opts.trace_dir) if traced else contextlib.nullcontext():
        for impl in impls:
          dense = impl.work == "dense"
          if dense and batch in dense_done:
            continue
          layer = dense_layer if dense else (kernel, mask, bias)
          if impl.name not in built:
            extra = {"group_size": opts.group_size} if impl.grouped else {}
            built[impl.name] = impl.build(*layer, jnp.dtype(impl.dtype), **extra)
          profile = opts.profile == "all" or (opts.profile == "first" and s == opts.sparsities[0])
          rec = time_case(impl, built[impl.name], layer[1], batch, rng, opts, peaks, profile)
          rec.update(dense_info if dense else layer_info, **common)
          records.append(rec)
          write()
          print(
              f"  s={s} batch={batch} {impl.name}: {rec['device_time_us']:.2f} us device, "
              f"{rec['e2e_us']:.1f} us e2e, floor {rec['floor_us']:.2f} us "
              f"({rec['floor_kind']}), rel_err {rec['rel_err']:.1e}, "
              f"N={rec['calls']}, profiler busy {rec['profiler_busy_us']} us",
              file=sys.stderr,
              flush=True,
          )
      dense_done.add(batch)
  write()
  print_table(records)
  if meta["skipped_cases"]:
    print(f"skipped for time: {[(c['sparsity'], c['batch']) for c in meta['skipped_cases']]}")
  return int(any(r["rel_err"] > r["rel_err_bound"] for r in records))


if __name__ == "__main__":
  app.run(functools.partial(_main, fv=define_flags(flags.FLAGS)))
