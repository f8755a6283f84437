"""Condensed vs dense vs sparse-format matmul latency, side by side.

Reproduces the setup of the SRigL paper's inference benchmark: the ViT-B/16
MLP layer 3072 -> 768 (weight 768 x 3072), fp32, constant fan-in sparsity
0.8/0.9/0.95/0.99 with part of the neurons ablated, batch 1..2048, median
wall time. All impls of one (sparsity, batch) point are timed round-robin in
the same process so that background load hits them alike; besides the ratio
of medians, the table gives the "paired" ratio (the median over repeats of the
two calls' ratio within one repeat), which drifting load disturbs least.
JAX's asynchronous CPU dispatch is turned off (``--async-dispatch`` keeps
it): the benchmark waits for every call anyway, and the hand-off to a worker
thread adds the same constant to every impl.

    python -m srigl_jax.benchmarks.condensed --json out.json --plot out.png

Impls: dense (XLA ``x @ W``), bcsr (jax.experimental.sparse), structured
(ablated neurons removed, dense matmul), condensed_xla, condensed_native
(CPU; ``condensed_native_avx2`` / ``_avx512`` / ``_generic`` force one
kernel variant; ``condensed_native_bf16w`` reads bf16-stored weights),
condensed_pallas (GPU). ``--model`` adds whole-model
latency of a ViT MLP block (dense masked vs converted).

``--group-size=8,16`` (a list; default 1) times group-shared fan-in layers:
for each G a grouped random constant fan-in mask (G consecutive neurons share
one set of inputs, whole groups ablated, as `srigl(..., group_size=G)`
trains them) in the grouped format, whose condensed impls run the grouped
kernels. All group sizes of a sparsity are timed in the same rounds; the
impls of G > 1 are named ``<impl>@g<G>`` in the table, and every record
carries its ``group_size``. The dense, bcsr and structured baselines run on
the first group size's layer.

Cache state (``--cache``): ``cold`` (default) gives every impl enough
distinct copies of its weights that together they exceed the last-level
cache, and each call uses the next copy, as inside a real model whose weights
do not fit in cache; ``warm`` is the paper's setup, one layer timed
repeatedly, whose weights stay cached when they fit. The input stays the
same in both (a layer's input was just written by the previous layer). Each
record carries the effective bandwidth (bytes of weights, indices, input and
output, each counted once, per second) and the useful FLOP rate
(2 * nnz * batch per second, the same work for every impl).
"""

from __future__ import annotations

import functools
import json
import sys
import types
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.experimental import sparse

from srigl_jax import condensed as C
from srigl_jax import timing
from srigl_jax.condensed._outputs import finish_outputs

ALL_IMPLS = ("dense", "bcsr", "structured", "condensed_xla", "condensed_native", "condensed_pallas")
# Native kernel variants forced through the FFI call's isa attribute; opt-in.
NATIVE_VARIANTS = tuple(f"condensed_native_{isa}" for isa in ("generic", "avx2", "avx512"))
# The native kernel reading bf16-stored weights (fp32 input, accumulation
# and output); opt-in.
NATIVE_BF16 = "condensed_native_bf16w"
KNOWN_IMPLS = ALL_IMPLS + NATIVE_VARIANTS + (NATIVE_BF16,)
# Used when the last-level cache size cannot be read.
DEFAULT_LLC_BYTES = 64 * 2**20

# Fraction of neurons ablated at each sparsity. An assumption standing in for
# a trained SRigL model (ablation grows with sparsity); override --ablation.
DEFAULT_ABLATION = {0.8: 0.05, 0.9: 0.1, 0.95: 0.2, 0.99: 0.4}


def make_layer(rng, in_features, out_features, sparsity, ablation, dtype, group_size=1):
  """A random constant fan-in layer: (kernel, mask, bias) as numpy arrays.

  With ``group_size`` G > 1 the mask is grouped: G consecutive neurons share
  one random set of k inputs, a fraction ``ablation`` of the groups is
  ablated, and the budget is spread over the active groups' neurons.
  """
  if group_size > 1:
    return _make_grouped_layer(
        rng, in_features, out_features, sparsity, ablation, dtype, group_size
    )
  n_active = max(1, round(out_features * (1 - ablation)))
  budget = int(in_features * out_features * (1 - sparsity))
  k = max(1, min(in_features, budget // n_active))
  mask = np.zeros((in_features, out_features), bool)
  active = np.sort(rng.choice(out_features, n_active, replace=False))
  for j in active:
    mask[rng.choice(in_features, k, replace=False), j] = True
  kernel = (rng.standard_normal((in_features, out_features)) / np.sqrt(k)).astype(dtype)
  bias = (0.1 * rng.standard_normal(out_features)).astype(dtype)
  return kernel, mask, bias


def _make_grouped_layer(rng, in_features, out_features, sparsity, ablation, dtype, g):
  if out_features % g:
    raise ValueError(f"--group-size={g} does not divide --out-features={out_features}")
  n_groups = out_features // g
  n_active = max(1, round(n_groups * (1 - ablation)))
  budget = int(in_features * out_features * (1 - sparsity))
  k = max(1, min(in_features, budget // (n_active * g)))
  active = np.sort(rng.choice(n_groups, n_active, replace=False))
  # k distinct inputs per active group without a Python loop: argsort of noise.
  picks = np.argsort(rng.random((n_active, in_features)), axis=1)[:, :k]
  group_mask = np.zeros((in_features, n_groups), bool)
  group_mask[picks, np.broadcast_to(active[:, None], picks.shape)] = True
  mask = np.repeat(group_mask, g, axis=1)
  kernel = (rng.standard_normal((in_features, out_features)) / np.sqrt(k)).astype(dtype)
  bias = (0.1 * rng.standard_normal(out_features)).astype(dtype)
  return kernel, mask, bias


def llc_bytes() -> int:
  """Size of the largest CPU cache (sysfs, then lscpu; 64 MiB if neither)."""
  import glob
  import re
  import subprocess

  units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}

  def parse(text):
    m = re.match(r"\s*([\d.]+)\s*([KMG]?)", text.upper())
    return int(float(m.group(1)) * units[m.group(2)]) if m else 0

  best = 0
  for d in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
    try:
      with open(f"{d}/size") as f:
        best = max(best, parse(f.read()))
    except OSError:
      pass
  if best:
    return best
  try:
    out = subprocess.run(["lscpu", "-B"], capture_output=True, text=True, timeout=10).stdout
    for line in out.splitlines():
      if line.startswith(("L3 cache:", "L2 cache:")):
        best = max(best, parse(line.split(":", 1)[1]))
  except (OSError, subprocess.SubprocessError):
    pass
  return best or DEFAULT_LLC_BYTES


def tree_nbytes(tree) -> int:
  return int(sum(a.nbytes for a in jax.tree.leaves(tree) if hasattr(a, "nbytes")))


# Condensed impl -> (kernel of the plain format, kernel of the grouped format).
_CONDENSED_KERNELS = {
    "condensed_xla": (C.condensed_matmul_xla, C.grouped_matmul_xla),
    "condensed_native": (C.condensed_matmul_native, C.grouped_matmul_native),
    "condensed_pallas": (C.condensed_matmul_pallas, C.grouped_matmul_pallas),
}


def build_impls(impls, kernel, mask, bias, dtype, cache="warm", cache_bytes=None, group_size=1):
  """``f(x) -> y`` per impl, and the bytes of weights each impl reads.

  With ``group_size`` G > 1 the layer is condensed in the grouped format and
  the condensed impls run its kernels.

  Weights are passed to the jitted function as arguments, as a served model's
  params are, rather than baked into the program as constants (which changes
  how XLA and the FFI call treat them). With ``cache='cold'`` each impl holds
  enough copies of its weights to fill twice ``cache_bytes`` (the LLC), and
  every call takes the next copy, so no call finds its weights in cache.

  Returns:
    (fns, weight_bytes, copies, layer).
  """
  w = jnp.asarray(np.where(mask, kernel, 0), dtype)
  b = jnp.asarray(bias, dtype)
  masked = np.where(mask, kernel, 0).astype(dtype)
  grouped = group_size > 1
  if grouped:
    layer = C.condense_grouped_dense(masked, mask, bias.astype(dtype), group_size=group_size)
  else:
    layer = C.condense_dense(masked, mask, bias.astype(dtype))
  native = _CONDENSED_KERNELS["condensed_native"][grouped]
  fns: dict[str, Callable] = {}
  weight_bytes: dict[str, int] = {}
  copies: dict[str, int] = {}
  budget = 2 * (cache_bytes or llc_bytes())

  def bind(name, fn, *weights):
    jitted = jax.jit(fn)
    nbytes = tree_nbytes(weights)
    weight_bytes[name] = nbytes
    n = 1 if cache == "warm" else int(min(4096, max(2, -(-budget // max(1, nbytes)))))
    copies[name] = n
    # Fresh buffers, so that no two copies share memory.
    sets = [weights] + [
        jax.tree.map(lambda a: jnp.array(a, copy=True), weights) for _ in range(n - 1)
    ]
    if n == 1:
      return lambda x: jitted(x, *weights)
    counter = iter(range(2**62))
    return lambda x: jitted(x, *sets[next(counter) % n])

  for impl in impls:
    if impl == "dense":
      fns[impl] = bind(impl, lambda x, w, b: x @ w + b, w, b)
    elif impl == "bcsr":
      m = sparse.BCSR.fromdense(w.T)  # (out, in): rows are neurons
      fns[impl] = bind(impl, lambda x, m, b: (m @ x.T).T + b, m, b)
    elif impl == "structured":
      s = C.structured_from_mask(np.asarray(w), mask, bias)
      fns[impl] = bind(impl, _structured, s.kernel, s.neuron_ids, b)
    elif impl in _CONDENSED_KERNELS:
      fns[impl] = bind(impl, _CONDENSED_KERNELS[impl][grouped], layer)
    elif impl in NATIVE_VARIANTS:
      isa = impl.rsplit("_", 1)[1]
      fns[impl] = bind(impl, lambda x, l, isa=isa: native(x, l, isa=isa), layer)
    elif impl == NATIVE_BF16:
      lb = layer.replace(values=layer.values.astype(jnp.bfloat16))
      fns[impl] = bind(impl, native, lb)
  return fns, weight_bytes, copies, layer


def _structured(x, kernel, neuron_ids, bias):
  """The kept neurons' matmul, placed into the full width (ablated: bias)."""
  return finish_outputs(x @ kernel, neuron_ids, bias, compact=kernel.shape[-1] == bias.shape[0])


def time_impls(fns, x, repeats, budget_s) -> timing.Timings:
  """Every impl called on ``x`` once per round (`timing.time_interleaved`)."""
  calls = {name: functools.partial(f, x) for name, f in fns.items()}
  return timing.time_interleaved(calls, budget_s=budget_s, max_rounds=repeats)


def available_impls(requested):
  backend = jax.default_backend()
  out, skipped = [], []
  for impl in requested:
    if impl in ("condensed_native", NATIVE_BF16) and (backend != "cpu" or not C.native_available()):
      skipped.append((impl, C.native_error() or f"not on {backend}"))
    elif impl in NATIVE_VARIANTS and (
        backend != "cpu" or impl.rsplit("_", 1)[1] not in C.native_isas()
    ):
      skipped.append((impl, C.native_error() or "that kernel variant is not available here"))
    elif impl == "condensed_pallas" and backend != "gpu":
      skipped.append((impl, "needs a GPU (interpret mode is not a benchmark)"))
    else:
      out.append(impl)
  return out, skipped


def model_latency(args, rng, dtype, device):
  """Whole-model latency: a ViT MLP block, masked dense vs converted."""
  import flax.linen as nn

  class MlpBlock(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.gelu(nn.Dense(args.in_features)(x))
      return nn.Dense(args.out_features)(x)

  model = MlpBlock()
  records = []
  for s in args.sparsities:
    abl = args.ablation if args.ablation is not None else DEFAULT_ABLATION.get(s, 0.1)
    params = model.init(jax.random.key(0), jnp.ones((1, args.out_features), dtype))["params"]
    masks = {}
    for name, (fi, fo) in (
        ("Dense_0", (args.out_features, args.in_features)),
        ("Dense_1", (args.in_features, args.out_features)),
    ):
      kernel, mask, bias = make_layer(rng, fi, fo, s, abl if name == "Dense_0" else 0.0, dtype)
      params[name] = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
      masks[name] = {"kernel": mask, "bias": None}
    masked = {
        n: {"kernel": p["kernel"] * masks[n]["kernel"], "bias": p["bias"]}
        for n, p in params.items()
    }
    converted = C.convert_model(
        model, {"params": params}, masks, jnp.ones((1, args.out_features), dtype)
    )
    dense_fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
    cond_fn = jax.jit(lambda v, x: C.condensed_apply(model, v, converted.plan, x))
    fns = {
        "model_dense": lambda x: dense_fn(masked, x),
        "model_condensed": lambda x: cond_fn(converted.variables, x),
    }
    for batch in (1, 256):
      x = jnp.asarray(rng.standard_normal((batch, args.out_features)), dtype)
      res = time_impls(fns, x, args.repeats, args.budget)
      paired = res.paired_ratio("model_dense", "model_condensed")
      for impl in res.seconds:
        records.append(
            dict(
                impl=impl,
                sparsity=s,
                batch=batch,
                median_us=res.median_us(impl),
                repeats=res.rounds,
                device=device,
                dtype=args.dtype,
                x_vs_dense_paired=paired if impl == "model_condensed" else 1.0,
            )
        )
      d, c = res.median_us("model_dense"), res.median_us("model_condensed")
      print(
          f"model MLP block {args.out_features}->{args.in_features}->{args.out_features} "
          f"s={s} batch={batch}: dense {d:.1f} us, condensed {c:.1f} us "
          f"({d / c:.2f}x, paired {paired:.2f}x)"
      )
  return records


def _name(record) -> str:
  """The timed name of a record (``<impl>@g<G>`` for a grouped layer's kernel)."""
  return record.get("name", record["impl"])


def print_table(records, impls):
  keys = sorted({(r["sparsity"], r["batch"]) for r in records if _name(r) in impls})
  cond = [i for i in impls if i.startswith("condensed")]
  head = f"{'sparsity':>8} {'batch':>6} " + " ".join(f"{i:>16}" for i in impls)
  head += (
      f" {'best_condensed':>16} {'x_vs_dense':>10} {'x_vs_bcsr':>10} {'x_vs_struct':>11}"
      f" {'paired_dense':>12} {'paired_bcsr':>11}"
  )
  print(head)
  for s, b in keys:
    t = {_name(r): r["median_us"] for r in records if r["sparsity"] == s and r["batch"] == b}
    row = f"{s:>8} {b:>6} " + " ".join(f"{t.get(i, float('nan')):>16.1f}" for i in impls)
    best = min((i for i in cond if i in t), key=t.get, default=None)
    if best:
      ratio = lambda ref: f"{t[ref] / t[best]:.2f}" if ref in t else "-"
      rec = next(r for r in records if _name(r) == best and r["sparsity"] == s and r["batch"] == b)
      pr = lambda ref: f"{rec[f'x_vs_{ref}_paired']:.2f}" if f"x_vs_{ref}_paired" in rec else "-"
      row += (
          f" {best:>16} {ratio('dense'):>10} {ratio('bcsr'):>10} {ratio('structured'):>11}"
          f" {pr('dense'):>12} {pr('bcsr'):>11}"
      )
    print(row)


def plot(records, impls, path, title):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  sparsities = sorted({r["sparsity"] for r in records if _name(r) in impls})
  batches = sorted({r["batch"] for r in records if _name(r) in impls})
  fig, axes = plt.subplots(1, len(sparsities), figsize=(4.5 * len(sparsities), 4), squeeze=False)
  width = 0.8 / max(1, len(impls))
  for ax, s in zip(axes[0], sparsities):
    for i, impl in enumerate(impls):
      ys = [
          next(
              (
                  r["median_us"]
                  for r in records
                  if _name(r) == impl and r["sparsity"] == s and r["batch"] == b
              ),
              np.nan,
          )
          for b in batches
      ]
      ax.bar(np.arange(len(batches)) + (i - (len(impls) - 1) / 2) * width, ys, width, label=impl)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(batches)), [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_title(f"sparsity {s:g}")
    ax.grid(axis="y", which="both", alpha=0.3)
  axes[0][0].set_ylabel("median latency (us, log)")
  axes[0][-1].legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def define_flags(fv: flags.FlagValues) -> flags.FlagValues:
  """Defines this benchmark's command-line flags on ``fv``; returns it."""
  flags.DEFINE_integer("in-features", 3072, "Input features of the layer.", flag_values=fv)
  flags.DEFINE_integer("out-features", 768, "Output features of the layer.", flag_values=fv)
  flags.DEFINE_list("sparsities", ["0.8", "0.9", "0.95", "0.99"], "Sparsities.", flag_values=fv)
  flags.DEFINE_list("batch-sizes", ["1", "16", "256", "2048"], "Batch sizes.", flag_values=fv)
  flags.DEFINE_list("impls", list(ALL_IMPLS), f"Impls, of {KNOWN_IMPLS}.", flag_values=fv)
  known = set(KNOWN_IMPLS)
  flags.register_validator("impls", known.issuperset, "unknown impls", flag_values=fv)
  flags.DEFINE_integer("repeats", 50, "Most timed rounds per point.", flag_values=fv)
  flags.DEFINE_float(
      "budget",
      3.0,
      "Seconds per (sparsity, batch) point after which rounds stop (at least 3 rounds).",
      flag_values=fv,
  )
  flags.DEFINE_float(
      "ablation",
      None,
      f"Fraction of ablated neurons (default per sparsity: {DEFAULT_ABLATION}).",
      flag_values=fv,
  )
  flags.DEFINE_enum(
      "dtype", "float32", ["float32", "bfloat16"], "Weights and input.", flag_values=fv
  )
  flags.DEFINE_bool("model", False, "Also time a whole ViT MLP block.", flag_values=fv)
  flags.DEFINE_bool(
      "async-dispatch",
      False,
      "Keep JAX's asynchronous CPU dispatch (off by default: a latency benchmark "
      "waits for every call, and the hand-off to a worker thread only adds to "
      "every impl's time).",
      flag_values=fv,
  )
  flags.DEFINE_enum(
      "cache",
      "cold",
      ["cold", "warm"],
      "cold: cycle through copies of the weights that together exceed the "
      "last-level cache; warm: one layer timed repeatedly (the paper's setup).",
      flag_values=fv,
  )
  flags.DEFINE_integer(
      "cache-bytes",
      None,
      "Last-level cache size for --cache=cold (default: read from the CPU).",
      flag_values=fv,
  )
  flags.DEFINE_list(
      "group-size",
      ["1"],
      "Group sizes G (group-shared fan-in; 1 = per-neuron), timed side by side.",
      flag_values=fv,
  )
  flags.register_validator(
      "group-size",
      lambda v: all(g.isdigit() and int(g) >= 1 for g in v),
      "group sizes are integers >= 1",
      flag_values=fv,
  )
  flags.DEFINE_integer("seed", 0, "Seed of the random layers and inputs.", flag_values=fv)
  flags.DEFINE_string("json", None, "Write the records to this JSON file.", flag_values=fv)
  flags.DEFINE_string("plot", None, "Write a PNG of grouped bars per batch size.", flag_values=fv)
  return fv


def _main(argv: Sequence[str], fv: flags.FlagValues) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  args = types.SimpleNamespace(**{k.replace("-", "_"): v for k, v in fv.flag_values_dict().items()})
  args.sparsities = [float(v) for v in args.sparsities]
  args.batch_sizes = [int(v) for v in args.batch_sizes]
  args.group_size = [int(v) for v in args.group_size]
  # Restored afterwards: main() may be called from a program with its own setting.
  with timing.sync_cpu_dispatch(enabled=not args.async_dispatch):
    return _run(args)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the benchmark with the command-line flags ``argv`` (default ``sys.argv[1:]``)."""
  fv = define_flags(flags.FlagValues())
  return _main(fv([__name__, *(sys.argv[1:] if argv is None else argv)]), fv)


def _native_isa(impl: str) -> str | None:
  """The native kernel variant an impl runs ('avx512', ...), else None."""
  if impl in ("condensed_native", NATIVE_BF16):
    return C.native_isas().get("auto")
  if impl in NATIVE_VARIANTS:
    return C.native_isas().get(impl.rsplit("_", 1)[1])
  return None


def _run(args) -> int:
  dtype = jnp.dtype(args.dtype)
  dev = jax.devices()[0]
  device = f"{dev.platform}:{dev.device_kind}"
  cpu = timing.cpu_model()
  cache_bytes = args.cache_bytes or llc_bytes()
  impls, skipped = available_impls(args.impls)
  for impl, why in skipped:
    print(f"skipping {impl}: {why}", file=sys.stderr)
  extra = f" native={C.native_isas().get('auto', '-')}" if "condensed_native" in impls else ""
  print(
      f"device {device} ({cpu}){extra}, {args.in_features}->{args.out_features} {args.dtype}, "
      f"{'async' if args.async_dispatch else 'sync'} dispatch, {args.cache} cache "
      f"(LLC {cache_bytes / 2**20:.0f} MiB)"
  )
  rng = np.random.default_rng(args.seed)
  records = []
  names = []  # timed names, in table order
  for s in args.sparsities:
    abl = args.ablation if args.ablation is not None else DEFAULT_ABLATION.get(s, 0.1)
    # name -> (impl, group size, weight bytes, copies, layer)
    runs, fns = {}, {}
    for i, g in enumerate(args.group_size):
      kernel, mask, bias = make_layer(
          rng, args.in_features, args.out_features, s, abl, dtype, group_size=g
      )
      # The baselines do not depend on the mask's grouping: timed once.
      here = impls if i == 0 else [m for m in impls if m.startswith("condensed")]
      f, weight_bytes, copies, layer = build_impls(
          here, kernel, mask, bias, dtype, cache=args.cache, cache_bytes=cache_bytes, group_size=g
      )
      for impl, fn in f.items():
        name = impl if g == 1 or not impl.startswith("condensed") else f"{impl}@g{g}"
        fns[name] = fn
        runs[name] = (impl, g, weight_bytes[impl], copies[impl], layer)
        if name not in names:
          names.append(name)
    for batch in args.batch_sizes:
      x = jnp.asarray(rng.standard_normal((batch, args.in_features)), dtype)
      io_bytes = x.nbytes + batch * args.out_features * dtype.itemsize
      res = time_impls(fns, x, args.repeats, args.budget)
      for name in res.seconds:
        impl, g, weight_bytes, copies, layer = runs[name]
        nnz = layer.n_active * layer.fan_in
        us = res.median_us(name)
        paired = {
            f"x_vs_{ref}_paired": res.paired_ratio(ref, name)
            for ref in ("dense", "bcsr")
            if ref in res.seconds
        }
        moved = weight_bytes + io_bytes
        records.append(
            dict(
                impl=impl,
                name=name,
                group_size=g,
                sparsity=s,
                batch=batch,
                median_us=us,
                repeats=res.rounds,
                round_us=[t * 1e6 for t in res.seconds[name]],
                **paired,
                device=device,
                cpu=cpu,
                native_isa=_native_isa(impl),
                cache=args.cache,
                cache_bytes=cache_bytes,
                copies=copies,
                bytes_moved=moved,
                bandwidth_gb_s=moved / us * 1e-3,
                useful_gflop_s=2 * nnz * batch / us * 1e-3,
                dtype=args.dtype,
                in_features=args.in_features,
                out_features=args.out_features,
                n_active=layer.n_active,
                fan_in=layer.fan_in,
                ablation=abl,
                dispatch="async" if args.async_dispatch else "sync",
            )
        )
      print(f"  done sparsity {s} batch {batch}", file=sys.stderr, flush=True)
  print_table(records, names)
  if args.model:
    records += model_latency(args, rng, dtype, device)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(records, f, indent=1)
  if args.plot:
    plot(
        records,
        names,
        args.plot,
        f"{args.in_features}->{args.out_features} {args.dtype}, {args.cache} cache, "
        f"on {device} ({cpu})",
    )
  return 0


if __name__ == "__main__":
  app.run(functools.partial(_main, fv=define_flags(flags.FLAGS)))
