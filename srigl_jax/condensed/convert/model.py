"""Whole-model conversion: a trained masked Flax model -> condensed inference.

`convert_model(model, variables, masks, sample_input)` reads the model's own
structure, so no layer pairs are declared by hand:

1. It traces the eval forward pass once (`jax.make_jaxpr`) under a recording
   method interceptor. The jaxpr ties every sparse kernel to the
   ``conv_general_dilated`` / ``dot_general`` that consumes it; the recorded
   module calls tie each ``nn.BatchNorm`` to the layer whose output it takes.
2. *Constant analysis.* It evaluates the jaxpr on a batch-1 input that is
   entirely unknown (NaN), with the real weights. Everything downstream of an
   ablated neuron that does not depend on the input comes out as a known
   number: the neuron's zero output, through BatchNorm, the activation,
   pooling, flattening or a residual sum. Linear ops use an exact rule (an
   output is unknown iff some non-zero weight meets an unknown input), so zero
   padding is handled exactly: a constant channel seen through padding is
   known, but not constant, at the borders.
3. *Folding.* Each sparse consumer drops its taps on input channels that are
   known at every position and adds their contribution to its bias: a
   per-channel bias when the contribution is the same at every position, else
   a per-position bias map valid for the traced input size (the converted
   layer refuses other sizes). The producer's ablated neurons are never
   computed; where their constant output still matters (a residual sum, a
   depthwise conv, another consumer), the producer emits it as its bias.
4. *BatchNorm.* An eval-mode BatchNorm that reads only the output of a sparse
   layer is folded into that layer's values and bias, and skipped at run time.
5. Sparse Dense, Conv (``feature_group_count=1``, no dilation) and attention
   (`nn.DenseGeneral`) kernels are stored condensed; ``format='structured'``
   stores them with ablated neurons removed but dense kernels instead, and
   ``on_unsupported='structured'`` does so for the layers that cannot be
   condensed (masks that are not constant fan-in, dilated convolutions).
6. *Groups.* A layer trained with group-shared fan-in (G consecutive neurons
   sharing one mask column) is stored in the grouped format, its inputs once
   per group: ``group_size=None`` detects each layer's G from its mask, an int
   requires it. Folding keeps groups whole: a folded input is dropped from
   every column of the mask, so from every neuron of a group.
7. It checks itself: the converted model must reproduce the masked model on
   a probe input, else it raises naming the first layer that differs.

`ConvertedModel.apply` (`srigl_jax.condensed.convert.converted`) runs the
*unchanged* model definition with a method interceptor that routes every
converted layer to its kernel.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from srigl_jax.condensed._groups import detect_group_size, grouped_by, validate_group_size
from srigl_jax.condensed.conv import condense_conv, condense_grouped_conv
from srigl_jax.condensed.convert.analysis import (
    LINEAR,
    eval_abstract,
    module_path,
    trace,
    use_counts,
)
from srigl_jax.condensed.convert.converted import ConvertedModel, as_pair
from srigl_jax.condensed.dense import condense_dense, condense_grouped_dense, fan_in_counts
from srigl_jax.condensed.structured import structured_from_mask

__all__ = ["convert_model"]

_FORMATS = ("condensed", "structured")
_ON_UNSUPPORTED = ("error", "structured")
# Relative tolerance of the self-check, on the largest logit.
_CHECK_RTOL = 1e-4


def _join(path) -> str:
  return "/".join(str(p) for p in path)


def _key_name(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


def _dense_general_axes(module, x_ndim):
  axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
  return tuple(sorted(a % x_ndim for a in axis))


# ---------------------------------------------------------------------------
# Conversion.


@dataclasses.dataclass
class _Layer:
  path: str  # module path
  kind: str  # 'conv' | 'dense'
  module: nn.Module
  kernel: np.ndarray  # masked, float
  mask: np.ndarray
  bias: np.ndarray
  eqn: Any
  had_bias: bool
  batchnorm: str | None = None
  bias_map: np.ndarray | None = None
  folded_inputs: int = 0
  in_shape: tuple = ()
  out_shape: tuple = ()
  input_hw: tuple | None = None
  # Why the kernel has no condensed form whatever its mask, or None.
  not_condensable: str | None = None
  # G: consecutive neurons sharing one mask column (1 = ungrouped).
  group_size: int = 1

  @property
  def mask2d(self) -> np.ndarray:
    """The mask as (fan_in, neurons)."""
    return self.mask.reshape(-1, self.mask.shape[-1])


def _flat_leaves(tree):
  return [
      (tuple(_key_name(k) for k in path), leaf)
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  ]


def _set(tree: dict, path, value):
  for key in path[:-1]:
    tree = tree[key]
  if value is None:
    del tree[path[-1]]
  else:
    tree[path[-1]] = value


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _to_mutable(tree):
  if isinstance(tree, Mapping):
    return {k: _to_mutable(v) for k, v in tree.items()}
  return tree


def _unsupported(path, why, fix):
  return ValueError(f"convert_model: layer '{path}' {why}. {fix}")


def _refuse_nnx(model, variables) -> None:
  """Raises on a Flax NNX module or state: the converter traces Linen modules only."""
  nnx = sys.modules.get("flax.nnx")  # no NNX object can exist before it is imported
  if nnx is None:
    return
  is_variable = lambda x: isinstance(x, nnx.Variable)
  if isinstance(model, nnx.Module):
    got = f"a Flax NNX module ({type(model).__name__})"
  elif isinstance(variables, nnx.State) or any(
      is_variable(x) for x in jax.tree.leaves(variables, is_leaf=is_variable)
  ):
    got = "Flax NNX variables (an nnx.State or nnx.Variables)"
  else:
    return
  raise TypeError(
      f"convert_model: got {got}; Flax NNX models are not supported yet. It takes a "
      "flax.linen.Module with its variables dict {'params': ..., 'batch_stats': ...} "
      "of plain arrays. Workaround: define the same model in Linen, with the layers "
      "named as the NNX attributes (nnx.Linear -> nn.Dense, nnx.Conv -> nn.Conv, "
      "nnx.BatchNorm -> nn.BatchNorm), and pass {'params': nnx.to_pure_dict(nnx.state("
      "model, nnx.Param)), 'batch_stats': nnx.to_pure_dict(nnx.state(model, "
      "nnx.BatchStat))} with the masks of srigl_jax.get_masks."
  )


def convert_model(
    model: nn.Module,
    variables,
    masks,
    sample_input,
    *,
    format: str = "condensed",
    fold: str | Iterable[str] = "auto",
    fold_batchnorm: bool = True,
    on_unsupported: str = "error",
    check: bool = True,
    impl: str = "auto",
    group_size: int | None = None,
) -> ConvertedModel:
  """Converts a trained sparse Flax model for inference.

  Args:
    model: the Flax module (any model of `srigl_jax.models`, or your own
      built from `nn.Dense`, `nn.DenseGeneral`, `nn.Conv`, `nn.BatchNorm`).
    variables: ``{'params': ..., 'batch_stats': ...}`` as trained (masked
      entries are zeroed here in any case).
    masks: params-shaped tree; bool arrays for sparse kernels, None for dense
      leaves (`srigl_jax.get_masks(opt_state)`). A dict holding the params
      tree alone is accepted too.
    sample_input: an input of the served shape (any batch size). Folds
      through zero padding are exact for this spatial size only.
    format: ``'condensed'`` (constant fan-in kernels) or ``'structured'``
      (ablated neurons removed, dense kernels).
    fold: ``'auto'`` folds known-constant inputs into every sparse consumer,
      ``'none'`` folds nothing, or a collection of layer paths to fold into.
    fold_batchnorm: fold eval-mode BatchNorm into the sparse layer before it.
    on_unsupported: what to do with a sparse layer that cannot be condensed
      (a mask that is not constant fan-in, as RigL and SET give; a dilated
      convolution): ``'error'`` raises, ``'structured'`` stores it with its
      ablated neurons removed and a dense kernel. Sparse grouped or depthwise
      convolutions and kernels the converter cannot follow are refused
      either way.
    check: run the self-check against the masked model.
    impl: kernel choice for the self-check.
    group_size: group-shared fan-in (`srigl(..., group_size=G)`). None
      detects, per layer, the largest G > 1 dividing its width whose groups of
      G consecutive neurons have identical mask columns, and stores the layer
      in the grouped format (`GroupedCondensedLayer`, `GroupedCondensedConv`;
      no such G: today's format). An int G requires every sparse layer whose
      width G divides to be grouped by G (as training makes them); layers it
      does not divide stay ungrouped, as they trained. 1 stores every layer
      ungrouped. The plan records each layer's ``group_size``.

  Returns:
    The `ConvertedModel`.

  Raises:
    TypeError: a Flax NNX module or state (not supported yet).
    ValueError: a layer cannot be condensed (with ``on_unsupported='error'``),
      a grouped or depthwise conv is marked sparse, a sparse kernel is used
      in a way the converter cannot follow, a layer's mask is not grouped by
      an int ``group_size`` that divides its width (naming the layer), or the
      self-check fails (naming the first layer that differs).
  """
  _refuse_nnx(model, variables)
  if format not in _FORMATS:
    raise ValueError(f"convert_model: format must be one of {_FORMATS}, got {format!r}")
  if on_unsupported not in _ON_UNSUPPORTED:
    raise ValueError(
        f"convert_model: on_unsupported must be one of {_ON_UNSUPPORTED}, got {on_unsupported!r}"
    )
  if group_size is not None:
    group_size = validate_group_size(group_size, "convert_model")
  if isinstance(fold, str) and fold not in ("auto", "none"):
    raise ValueError(
        f"convert_model: fold must be 'auto', 'none' or a collection of layer paths, got {fold!r}"
    )
  variables = _to_mutable(dict(variables))
  if "params" not in variables:
    raise ValueError("convert_model: variables must hold a 'params' collection.")
  if isinstance(masks, Mapping) and "params" in masks and "params" not in variables["params"]:
    masks = masks["params"]
  params = variables["params"]

  # Masked params, and which kernels are sparse.
  sparse: dict[tuple, np.ndarray] = {}
  mask_leaves = dict(
      (tuple(_key_name(k) for k in p), m)
      for p, m in jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda m: m is None)[0]
  )
  for path, leaf in _flat_leaves(params):
    m = mask_leaves.get(path)
    if m is None:
      continue
    m = np.asarray(m).astype(bool)
    if m.shape != np.shape(leaf):
      raise ValueError(
          f"convert_model: mask of '{_join(path)}' has shape {m.shape} but the "
          f"parameter has shape {np.shape(leaf)}; pass the masks of these params."
      )
    _set(params, path, jnp.asarray(np.where(m, np.asarray(leaf), 0)))
    sparse[path] = m
  masked_variables = _to_mutable(variables)

  sample_input = jnp.asarray(sample_input)
  x1 = jnp.zeros((1, *sample_input.shape[1:]), sample_input.dtype)
  closed, calls = trace(model, variables, x1)
  jaxpr = closed.jaxpr
  flat_vars = _flat_leaves(variables)
  n_vars = len(flat_vars)
  invar_path = {
      v: ("params",) + p[1:] if p[0] == "params" else p
      for v, (p, _) in zip(jaxpr.invars[:n_vars], flat_vars)
  }
  # Follow dtype casts of a kernel to the op that consumes it.
  alias = dict(invar_path)
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "convert_element_type" and eqn.invars[0] in alias:
      alias[eqn.outvars[0]] = alias[eqn.invars[0]]
  consumers: dict[tuple, list] = {}
  for eqn in jaxpr.eqns:
    for v in eqn.invars:
      if isinstance(v, jcore.Var) and v in alias:
        consumers.setdefault(alias[v], []).append(eqn)

  by_path = {}
  for c in calls:
    by_path.setdefault(c.path, c)

  layers: dict[str, _Layer] = {}
  for path, m in sparse.items():
    vpath = ("params",) + path
    if path[-1] != "kernel":
      continue
    mod_path = _join(path[:-1])
    call = by_path.get(mod_path)
    uses = consumers.get(vpath, [])
    if call is None or len(uses) != 1 or uses[0].primitive.name not in LINEAR:
      raise _unsupported(
          mod_path,
          "has a sparse kernel that is not consumed by exactly one convolution "
          "or dot product of its own module call",
          "The converter follows nn.Dense, nn.DenseGeneral and nn.Conv layers "
          "called once; keep this kernel dense (sparsity.dense_layers) or call "
          "the layer once.",
      )
    module = call.module
    not_condensable = None
    kernel = np.asarray(_get(params, path), np.float32)
    node = _get(params, path[:-1])
    had_bias = "bias" in node
    if isinstance(module, nn.Conv) or uses[0].primitive.name == "conv_general_dilated":
      if int(getattr(module, "feature_group_count", 1)) != 1:
        raise _unsupported(
            mod_path,
            f"is a grouped or depthwise convolution (feature_group_count="
            f"{module.feature_group_count}) marked sparse",
            "Only feature_group_count=1 convolutions have a condensed form; keep "
            "depthwise and grouped convs dense (sparsity.dense_layers, e.g. "
            "'.*depthwise.*').",
        )
      dilations = (getattr(module, "kernel_dilation", 1), getattr(module, "input_dilation", 1))
      if any(as_pair(d) != (1, 1) for d in dilations):
        not_condensable = "is a dilated convolution, which has no condensed kernel"
      kind = "conv"
    else:
      kind = "dense"
    if kind == "dense":
      if isinstance(module, nn.DenseGeneral):
        in_shape = kernel.shape[: len(_dense_general_axes(module, kernel.ndim + 1))]
      else:
        in_shape = kernel.shape[:1]
      out_shape = kernel.shape[len(in_shape) :]
      fan = int(np.prod(in_shape))
      kernel = kernel.reshape(fan, -1)
      m = m.reshape(fan, -1)
    else:
      in_shape, out_shape = (), ()
    n_out = kernel.shape[-1]
    bias = (
        np.asarray(node["bias"], np.float32).reshape(-1)
        if had_bias
        else np.zeros(n_out, np.float32)
    )
    layers[mod_path] = _Layer(
        path=mod_path,
        kind=kind,
        module=module,
        kernel=kernel,
        mask=m.copy(),
        bias=bias,
        eqn=uses[0],
        had_bias=had_bias,
        in_shape=tuple(in_shape),
        out_shape=tuple(out_shape),
        not_condensable=not_condensable,
    )

  # Groups, from the masks as trained (folding below keeps them whole).
  for layer in layers.values():
    layer.group_size = _layer_group_size(layer, group_size)

  # BatchNorm folds: a BN that reads exactly a sparse layer's output, which
  # nothing else reads.
  folded_bn: dict[str, str] = {}
  if fold_batchnorm:
    counts = use_counts(jaxpr)
    out_of = {c.out_var: c.path for c in calls if c.out_var is not None}
    for c in calls:
      if not isinstance(c.module, nn.BatchNorm) or c.in_var is None:
        continue
      src = out_of.get(c.in_var)
      if src is None or src not in layers or counts.get(c.in_var, 0) != 1:
        continue
      bn = c.module
      if not bn.use_running_average or bn.axis not in (-1, len(c.in_var.aval.shape) - 1):
        continue
      if (
          layers[src].batchnorm is not None
          or layers[src].kind != "conv"
          and len(layers[src].out_shape) != 1
      ):
        continue
      layers[src].batchnorm = c.path
      folded_bn[c.path] = src

  # Constant analysis.
  lhs_values: dict = {}
  x_unknown = (np.zeros(x1.shape, x1.dtype), np.ones(x1.shape, bool))
  args = [(np.asarray(leaf), np.zeros(np.shape(leaf), bool)) for _, leaf in flat_vars]
  args.append(x_unknown)
  eval_abstract(jaxpr, closed.consts, args, record=lhs_values)

  fold_set = None if isinstance(fold, str) else {str(f) for f in fold}
  for layer in layers.values():
    if fold == "none" or (fold_set is not None and layer.path not in fold_set):
      continue
    _fold_known_inputs(layer, lhs_values.get(layer.eqn))
  if fold_set is not None:
    missing = fold_set - set(layers)
    if missing:
      raise ValueError(
          f"convert_model: fold names {sorted(missing)}, which are not sparse "
          f"layers of this model; sparse layers: {sorted(layers)}."
      )

  # BatchNorm into values and bias.
  stats = variables.get("batch_stats", {})
  for bn_path, src in folded_bn.items():
    layer = layers[src]
    bn_keys = tuple(bn_path.split("/"))
    bn = by_path[bn_path].module
    p = _get(params, bn_keys)
    s = _get(stats, bn_keys)
    var = np.asarray(s["var"], np.float64)
    mean = np.asarray(s["mean"], np.float64)
    scale = np.asarray(p["scale"], np.float64) if bn.use_scale else 1.0
    shift = np.asarray(p["bias"], np.float64) if bn.use_bias else 0.0
    g = scale / np.sqrt(var + bn.epsilon)
    layer.kernel = (layer.kernel * g).astype(np.float32)
    layer.bias = (g * layer.bias + shift - mean * g).astype(np.float32)
    if layer.bias_map is not None:
      layer.bias_map = (layer.bias_map * g).astype(np.float32)
    _set(params, bn_keys, None)
    if stats:
      _set(stats, bn_keys, None)

  # Build the converted params.
  plan_layers: dict[str, dict] = {}
  for layer in layers.values():
    entry, new_params = _convert_layer(layer, format, on_unsupported)
    plan_layers[layer.path] = entry
    _set(params, tuple(layer.path.split("/")), new_params)
  _prune_empty(variables)

  plan = {
      "version": 1,
      "format": format,
      "input_shape": [int(d) for d in sample_input.shape[1:]],
      "layers": plan_layers,
      "folded_batchnorms": folded_bn,
  }
  converted = ConvertedModel(model=model, variables=variables, plan=plan).validate()
  if check:
    _self_check(model, masked_variables, converted, sample_input, impl)
  return converted


def _self_check(model, masked_variables, converted, sample_input, impl):
  """Compares converted and masked outputs on a probe input; names the culprit."""
  rng = np.random.default_rng(0)
  probe = sample_input[: min(4, sample_input.shape[0])]
  if jnp.issubdtype(probe.dtype, jnp.inexact):
    probe = jnp.asarray(rng.standard_normal(probe.shape), probe.dtype)
  ref = np.asarray(model.apply(masked_variables, probe), np.float64)
  out = np.asarray(converted.apply(probe, impl=impl), np.float64)
  scale = max(1.0, float(np.abs(ref).max()))
  if out.shape == ref.shape and float(np.abs(out - ref).max()) <= _CHECK_RTOL * scale:
    return
  # Find the first module whose output differs.
  skip = set(converted.plan["folded_batchnorms"].values())

  def recorder(store):
    def interceptor(next_fun, args, kwargs, context):
      y = next_fun(*args, **kwargs)
      if context.method_name == "__call__" and isinstance(y, jax.Array):
        store.setdefault(module_path(context.module), np.asarray(y, np.float64))
      return y

    return interceptor

  seen_ref, seen_out = {}, {}
  with nn.intercept_methods(recorder(seen_ref)):
    model.apply(masked_variables, probe)
  with nn.intercept_methods(recorder(seen_out)):
    converted.apply(probe, impl=impl)
  culprit = "the model's output"
  for path, r in seen_ref.items():
    o = seen_out.get(path)
    if path in skip or o is None:
      continue
    if o.shape != r.shape or np.abs(o - r).max() > _CHECK_RTOL * max(1.0, np.abs(r).max()):
      culprit = f"layer '{path}'"
      break
  raise ValueError(
      f"convert_model: the converted model does not reproduce the masked model "
      f"(first difference at {culprit}; max logit difference "
      f"{float(np.abs(out - ref).max()) if out.shape == ref.shape else 'shape ' + str(out.shape)}). "
      "The converter cannot follow this model's structure there: pass fold='none' "
      "and fold_batchnorm=False, or keep that layer dense (sparsity.dense_layers)."
  )


def _prune_empty(tree):
  if isinstance(tree, dict):
    for k in list(tree):
      _prune_empty(tree[k])
      if isinstance(tree[k], dict) and not tree[k]:
        del tree[k]


def _layer_group_size(layer: _Layer, group_size: int | None) -> int:
  """The G a layer is stored with: detected (None) or checked (an int)."""
  mask = layer.mask2d
  if group_size is None:
    return detect_group_size(mask)
  if group_size == 1 or mask.shape[1] % group_size:
    return 1  # trained ungrouped: group_size does not divide its width
  bad = grouped_by(mask, group_size)
  if bad is not None:
    lo = bad * group_size
    raise _unsupported(
        layer.path,
        f"is not grouped by group_size={group_size}: the mask columns of its "
        f"neurons {lo}..{lo + group_size - 1} differ",
        "Pass the group_size the run trained with (config.sparsity.group_size), "
        "or group_size=None to detect each layer's groups from its mask.",
    )
  return group_size


def _fold_known_inputs(layer: _Layer, a) -> None:
  """Drops the taps on inputs known at every position; adds them as bias."""
  if a is None:
    return
  val, unk = a
  if not jnp.issubdtype(val.dtype, jnp.inexact):
    return
  a = np.where(unk, np.nan, val).astype(np.float32)
  if layer.kind == "conv":
    if a.ndim != 4:
      return
    known = ~np.isnan(a).any(axis=(0, 1, 2))  # (cin,)
    used = layer.mask.any(axis=(0, 1, 3))
  else:
    if len(layer.in_shape) != 1:
      return  # attention kernels read several axes; nothing to fold there
    flat = a.reshape(-1, a.shape[-1])
    known = ~np.isnan(flat).any(axis=0)
    # A Dense fold needs the same value at every leading position.
    same = (flat == flat[:1]).all(axis=0)
    known &= same
    used = layer.mask.any(axis=1)
  fold = known & used
  if not fold.any():
    return
  x_known = np.where(fold, np.nan_to_num(a, nan=0.0), 0.0).astype(np.float32)
  w = layer.kernel
  if layer.kind == "conv":
    contrib = np.asarray(
        layer.eqn.primitive.bind(jnp.asarray(x_known), jnp.asarray(w), **layer.eqn.params)
    )[0].astype(
        np.float64
    )  # (oh, ow, cout)
    if (contrib == contrib[:1, :1]).all():
      layer.bias = (layer.bias + contrib[0, 0]).astype(np.float32)
    else:
      layer.bias_map = contrib.astype(np.float32)
      layer.input_hw = (int(a.shape[1]), int(a.shape[2]))
    layer.mask[:, :, fold, :] = False
    layer.kernel = np.where(layer.mask, layer.kernel, 0).astype(np.float32)
  else:
    contrib = x_known.reshape(-1, a.shape[-1])[0].astype(np.float64) @ w.astype(np.float64)
    layer.bias = (layer.bias + contrib).astype(np.float32)
    layer.mask[fold, :] = False
    layer.kernel = np.where(layer.mask, layer.kernel, 0).astype(np.float32)
  layer.folded_inputs = int(fold.sum())


def _convert_layer(layer: _Layer, format: str, on_unsupported: str):
  """The plan entry and the converted params of one sparse layer."""
  m = layer.mask
  counts = fan_in_counts(m)
  active = counts > 0
  entry = {
      "kind": layer.kind,
      "neurons": int(m.shape[-1]),
      "active_neurons": int(active.sum()),
      "dense_fan_in": int(np.prod(m.shape[:-1])),
      "density": float(m.mean()),
      "folded_inputs": layer.folded_inputs,
      "batchnorm": layer.batchnorm,
      "bias_map": layer.bias_map is not None,
  }
  if layer.kind != "conv":
    entry["in_shape"] = [int(d) for d in layer.in_shape]
    entry["out_shape"] = [int(d) for d in layer.out_shape]
  if layer.bias_map is not None:
    entry["input_hw"] = [int(d) for d in layer.input_hw]
  # Folding removes taps unevenly from a constant fan-in mask; such a layer
  # is condensed with its shorter rows padded.
  why_not = layer.not_condensable
  if why_not is None and layer.folded_inputs == 0 and active.any():
    lo, hi = int(counts[active].min()), int(counts[active].max())
    if lo != hi:
      why_not = (
          f"is not constant fan-in: its active neurons have between {lo} and {hi} non-zero inputs"
      )
  fmt = format
  if fmt == "condensed" and why_not is not None:
    if on_unsupported == "error":
      raise _unsupported(
          layer.path,
          why_not,
          "Condensed layers need SRigL's constant fan-in masks and undilated "
          "convolutions; pass on_unsupported='structured' to store such layers "
          "with their ablated neurons removed and dense kernels (e.g. for "
          "RigL/SET runs).",
      )
    fmt = "structured"
  entry["format"] = fmt
  kernel = np.where(m, layer.kernel, 0).astype(np.float32)
  g = layer.group_size if fmt == "condensed" else 1
  entry["group_size"] = g
  if fmt == "condensed":
    grouped = dict(group_size=g) if g > 1 else {}
    if layer.kind == "conv":
      condense_fn = condense_grouped_conv if g > 1 else condense_conv
      c = condense_fn(kernel, m, layer.bias, name=layer.path, allow_ragged=True, **grouped)
      new = {"values": c.values, "taps": c.taps}
    else:
      condense_fn = condense_grouped_dense if g > 1 else condense_dense
      c = condense_fn(kernel, m, layer.bias, name=layer.path, allow_ragged=True, **grouped)
      new = {"values": c.values, "indices": c.indices}
    if g > 1:
      new["group_ids"] = c.group_ids
    else:
      new["neuron_ids"] = c.neuron_ids
    new["bias"] = c.bias
    entry["fan_in"] = c.fan_in
  else:
    st = structured_from_mask(kernel, m, layer.bias, name=layer.path)
    new = {"kernel": st.kernel, "neuron_ids": st.neuron_ids, "bias": st.bias}
    entry["fan_in"] = int(counts[active].max()) if active.any() else 0
  if layer.bias_map is not None:
    new["bias_map"] = jnp.asarray(layer.bias_map)
  return entry, new
