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
5. Sparse Dense, Conv (``feature_group_count=1``) and attention
   (`nn.DenseGeneral`) kernels are stored condensed; ``format='structured'``
   stores them with ablated neurons removed but dense kernels instead.
6. It checks itself: the converted model must reproduce the masked model on
   a probe input, else it raises naming the first layer that differs.

`ConvertedModel.apply` runs the *unchanged* model definition with a method
interceptor that routes every converted layer to its kernel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

from srigl_jax.condensed.conv_layer import CondensedConv, condense_conv, normalize_padding
from srigl_jax.condensed.dispatch import condensed_conv, condensed_matmul
from srigl_jax.condensed.layer import CondensedLayer, condense_dense

__all__ = ["ConvertedModel", "convert_model", "condensed_apply"]

_LINEAR = ("conv_general_dilated", "dot_general")
_FORMATS = ("condensed", "structured")
# Relative tolerance of the self-check, on the largest logit.
_CHECK_RTOL = 1e-4


def _join(path) -> str:
  return "/".join(str(p) for p in path)


def _key_name(k) -> str:
  return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))


# ---------------------------------------------------------------------------
# The converted model.


@dataclasses.dataclass
class ConvertedModel:
  """A model converted for inference.

  Attributes:
    model: the original Flax module (its definition is unchanged).
    variables: ``{'params': ..., 'batch_stats': ...}`` with converted layers;
      arrays only, so orbax saves it as it is.
    plan: a JSON-serialisable description: per layer its kind, format,
      neurons, active neurons, fan-in and density; the folded BatchNorms; the
      input shape a per-position bias map was built for.
  """

  model: nn.Module
  variables: Any
  plan: dict

  def apply(self, x, impl: str = "auto"):
    """Logits of the converted model (not jitted; wrap it in `jax.jit`)."""
    return condensed_apply(self.model, self.variables, self.plan, x, impl=impl)

  __call__ = apply


def _module_path(module: nn.Module) -> str:
  return _join(module.scope.path)


def _as_tuple(v, n=2):
  if v is None:
    return (1,) * n
  if isinstance(v, int):
    return (v,) * n
  return tuple(int(s) for s in v)


def _dense_general_axes(module, x_ndim):
  axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
  return tuple(sorted(a % x_ndim for a in axis))


def _apply_condensed_layer(module, entry, x, impl):
  p = module.variables["params"]
  kind = entry["kind"]
  if kind == "conv":
    layer = CondensedConv(
        values=p["values"],
        taps=p["taps"],
        neuron_ids=p["neuron_ids"],
        bias=p["bias"],
        bias_map=p.get("bias_map"),
        kernel_size=_as_tuple(module.kernel_size),
        in_channels=int(x.shape[-1]),
        out_channels=int(p["bias"].shape[0]),
        strides=_as_tuple(module.strides),
        padding=normalize_padding(module.padding),
        input_hw=None if entry.get("input_hw") is None else tuple(entry["input_hw"]),
    )
    layer.check_input(x.shape, name=f"layer '{_module_path(module)}'")
    return condensed_conv(x, layer, impl)
  lead, x2 = _flatten_dense_input(module, entry, x)
  layer = CondensedLayer(
      values=p["values"],
      indices=p["indices"],
      neuron_ids=p["neuron_ids"],
      bias=p["bias"],
      in_features=int(x2.shape[-1]),
      out_features=int(p["bias"].shape[0]),
  )
  y = condensed_matmul(x2, layer, impl)
  return y.reshape(*lead, *entry["out_shape"])


def _flatten_dense_input(module, entry, x):
  n_in = len(entry["in_shape"])
  if tuple(x.shape[x.ndim - n_in :]) != tuple(entry["in_shape"]):
    raise ValueError(
        f"layer '{_module_path(module)}': input of shape {tuple(x.shape)} does "
        f"not end in the converted fan-in shape {tuple(entry['in_shape'])}."
    )
  lead = x.shape[: x.ndim - n_in]
  return lead, x.reshape(*lead, -1)


def _apply_structured_layer(module, entry, x):
  p = module.variables["params"]
  ids = p["neuron_ids"]
  bias = p["bias"]
  if entry["kind"] == "conv":
    pads = normalize_padding(module.padding)
    y = jax.lax.conv_general_dilated(
        x,
        p["kernel"].astype(x.dtype),
        window_strides=_as_tuple(module.strides),
        padding=pads,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
  else:
    lead, x2 = _flatten_dense_input(module, entry, x)
    y = x2 @ p["kernel"].astype(x.dtype)
  full = jnp.broadcast_to(bias.astype(y.dtype), (*y.shape[:-1], bias.shape[0]))
  y = full.at[..., ids].add(y)
  if p.get("bias_map") is not None:
    y = y + p["bias_map"].astype(y.dtype)
  if entry["kind"] != "conv":
    y = y.reshape(*lead, *entry["out_shape"])
  return y


def _interceptor(plan: Mapping[str, Any], impl: str):
  layers = plan["layers"]
  folded = set(plan.get("folded_batchnorms", {}))

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = _module_path(context.module)
    if path in folded:
      return args[0]
    entry = layers.get(path)
    if entry is None or entry["format"] == "dense":
      return next_fun(*args, **kwargs)
    x = jnp.asarray(args[0])
    if entry["format"] == "condensed":
      return _apply_condensed_layer(context.module, entry, x, impl)
    return _apply_structured_layer(context.module, entry, x)

  return interceptor


def condensed_apply(model: nn.Module, variables, plan, x, *, impl: str = "auto", **kwargs):
  """Runs ``model`` on converted variables (see `convert_model`).

  Args:
    model: the original Flax module.
    variables: `ConvertedModel.variables`.
    plan: `ConvertedModel.plan`.
    x: the model input.
    impl: kernel choice: 'auto', 'native', 'pallas', 'xla' or 'reference'.
    **kwargs: passed to ``model.apply`` (the eval mode is the default).

  Returns:
    What ``model.apply`` returns.
  """
  with nn.intercept_methods(_interceptor(plan, impl)):
    return model.apply(variables, x, **kwargs)


# ---------------------------------------------------------------------------
# Tracing: which eqn consumes which kernel, which BatchNorm follows which layer.


@dataclasses.dataclass
class _Call:
  path: str
  module: nn.Module
  in_var: Any
  out_var: Any


def _var(t):
  v = getattr(t, "val", None)
  return v if isinstance(v, jcore.Var) else None


def _trace(model, variables, x1):
  calls: list[_Call] = []

  def recorder(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and args:
      calls.append(_Call(_module_path(context.module), context.module, _var(args[0]), _var(out)))
    return out

  def forward(v, x):
    with nn.intercept_methods(recorder):
      return model.apply(v, x)

  closed = jax.make_jaxpr(forward)(variables, x1)
  return closed, calls


def _use_counts(jaxpr) -> dict:
  counts: dict = {}
  for eqn in jaxpr.eqns:
    for v in eqn.invars:
      if isinstance(v, jcore.Var):
        counts[v] = counts.get(v, 0) + 1
  for v in jaxpr.outvars:
    if isinstance(v, jcore.Var):
      counts[v] = counts.get(v, 0) + 1
  return counts


# ---------------------------------------------------------------------------
# Constant analysis: which values do not depend on the input, and their value.
#
# Every variable is a pair (value, unknown): a concrete array for batch 1 and
# a bool array marking the entries that depend on the input. Rules by kind of
# primitive keep the marks exact: elementwise ops OR their operands' marks,
# structural ops move the marks as they move the data, reductions and pooling
# mark an output that reads any marked input, and linear ops mark an output
# iff a non-zero weight meets a marked input. Anything else is wholly marked
# once any operand is.

_STRUCTURAL = frozenset(
    {
        "reshape",
        "transpose",
        "broadcast_in_dim",
        "squeeze",
        "expand_dims",
        "slice",
        "concatenate",
        "pad",
        "rev",
        "copy",
        "copy_p",
    }
)
_REDUCTIONS = frozenset(
    {
        "reduce_sum",
        "reduce_max",
        "reduce_min",
        "reduce_prod",
        "reduce_and",
        "reduce_or",
        "argmax",
        "argmin",
    }
)
_WINDOWS = frozenset({"reduce_window_sum", "reduce_window_max", "reduce_window_min"})


def _fill(val, unk):
  return np.where(unk, np.zeros((), val.dtype), val)


def _linear_eval(eqn, a, b):
  """Partial evaluation of a bilinear op (conv or dot) on marked operands."""
  prim = eqn.primitive
  out_dtype = eqn.outvars[0].aval.dtype

  def run(u, v):
    return np.asarray(prim.bind(jnp.asarray(u), jnp.asarray(v), **eqn.params))

  (av, au), (bv, bu) = a, b
  av, bv = _fill(av, au), _fill(bv, bu)
  val = run(av, bv).astype(out_dtype)
  if not au.any() and not bu.any():
    return val, np.zeros(val.shape, bool)
  f = lambda m: m.astype(np.float32)
  params = dict(eqn.params)
  params.pop("preferred_element_type", None)
  touch_a, touch_b = f(au | (av != 0)), f(bu | (bv != 0))
  ind = lambda u, v: np.asarray(
      prim.bind(jnp.asarray(u), jnp.asarray(v), **{**params, "preferred_element_type": jnp.float32})
  )
  unk = (ind(f(au), touch_b) + ind(touch_a, f(bu))) > 0
  return val, unk


def _sub_jaxpr(eqn):
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    j = eqn.params.get(key)
    if isinstance(j, jcore.ClosedJaxpr):
      return j
  return None


def _marks(eqn, ins, outs):
  """The unknown marks of an eqn's outputs (see the section comment)."""
  name = eqn.primitive.name
  unks = [u for _, u in ins]
  if not any(u.any() for u in unks):
    return [np.zeros(np.shape(o), bool) for o in outs]
  shapes = [np.shape(o) for o in outs]
  if name in _STRUCTURAL:
    moved = eqn.primitive.bind(
        *[jnp.asarray(u) for u in unks], **{k: v for k, v in eqn.params.items()}
    )
    moved = moved if eqn.primitive.multiple_results else [moved]
    return [np.asarray(m).astype(bool) for m in moved]
  if name in _REDUCTIONS:
    axes = tuple(eqn.params["axes"])
    return [np.asarray(unks[0].any(axis=axes)).reshape(shapes[0])]
  if name in _WINDOWS:
    p = eqn.params
    m = jax.lax.reduce_window(
        jnp.asarray(unks[0], jnp.float32),
        0.0,
        jax.lax.max,
        p["window_dimensions"],
        p["window_strides"],
        p["padding"],
        p["base_dilation"],
        p["window_dilation"],
    )
    return [np.asarray(m) > 0]
  if len(outs) == 1 and _broadcasts_to([np.shape(u) for u in unks], shapes[0]):
    out = np.zeros(shapes[0], bool)
    for u in unks:
      out = out | u  # size-1 axes broadcast, as jaxpr elementwise ops allow
    return [out]
  return [np.ones(s, bool) for s in shapes]


def _broadcasts_to(shapes, out) -> bool:
  try:
    return np.broadcast_shapes(*shapes, out) == tuple(out)
  except ValueError:
    return False


def _eval_abstract(jaxpr, consts, args, record=None):
  env: dict = {}

  def read(v):
    if isinstance(v, jcore.Literal):
      val = np.asarray(v.val)
      return val, np.zeros(val.shape, bool)
    return env[v]

  for v, c in zip(jaxpr.constvars, consts):
    c = np.asarray(c)
    env[v] = (c, np.zeros(c.shape, bool))
  for v, a in zip(jaxpr.invars, args):
    env[v] = a
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    if eqn.primitive.name in _LINEAR:
      outs = [_linear_eval(eqn, ins[0], ins[1])]
      if record is not None:
        record[eqn] = ins[0]
    elif (sub := _sub_jaxpr(eqn)) is not None:
      outs = _eval_abstract(sub.jaxpr, sub.consts, ins)
    else:
      res = eqn.primitive.bind(*[jnp.asarray(_fill(v, u)) for v, u in ins], **eqn.params)
      res = [np.asarray(r) for r in (res if eqn.primitive.multiple_results else [res])]
      outs = list(zip(res, _marks(eqn, ins, res)))
    for v, o in zip(eqn.outvars, outs):
      if not isinstance(v, jcore.DropVar):
        env[v] = o
  return [read(v) for v in jaxpr.outvars]


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


def convert_model(
    model: nn.Module,
    variables,
    masks,
    sample_input,
    *,
    format: str = "condensed",
    fold: str | Iterable[str] = "auto",
    fold_batchnorm: bool = True,
    on_ragged: str = "error",
    check: bool = True,
    impl: str = "auto",
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
    on_ragged: a sparse layer whose mask is not constant fan-in (RigL, SET):
      ``'error'`` raises, ``'structured'`` stores it structured.
    check: run the self-check against the masked model.
    impl: kernel choice for the self-check.

  Returns:
    The `ConvertedModel`.

  Raises:
    ValueError: a conv or Dense mask is not constant fan-in (with
      ``on_ragged='error'``), a grouped or depthwise conv is marked sparse, a
      sparse kernel is used in a way the converter cannot follow, or the
      self-check fails (naming the first layer that differs).
  """
  if format not in _FORMATS:
    raise ValueError(f"convert_model: format must be one of {_FORMATS}, got {format!r}")
  if on_ragged not in ("error", "structured"):
    raise ValueError(f"convert_model: on_ragged must be 'error' or 'structured', got {on_ragged!r}")
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
  closed, calls = _trace(model, variables, x1)
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
    if call is None or len(uses) != 1 or uses[0].primitive.name not in _LINEAR:
      raise _unsupported(
          mod_path,
          "has a sparse kernel that is not consumed by exactly one convolution "
          "or dot product of its own module call",
          "The converter follows nn.Dense, nn.DenseGeneral and nn.Conv layers "
          "called once; keep this kernel dense (sparsity.dense_layers) or call "
          "the layer once.",
      )
    module = call.module
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
      if _as_tuple(module.kernel_dilation) != (1, 1) or _as_tuple(module.input_dilation) != (1, 1):
        raise _unsupported(
            mod_path,
            "uses a dilated convolution",
            "Keep it dense (sparsity.dense_layers); dilation has no condensed kernel.",
        )
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
    )

  # BatchNorm folds: a BN that reads exactly a sparse layer's output, which
  # nothing else reads.
  folded_bn: dict[str, str] = {}
  if fold_batchnorm:
    counts = _use_counts(jaxpr)
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
  _eval_abstract(jaxpr, closed.consts, args, record=lhs_values)

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
    entry, new_params = _convert_layer(layer, format, on_ragged, x1.shape)
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
  converted = ConvertedModel(model=model, variables=variables, plan=plan)
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
        store.setdefault(_module_path(context.module), np.asarray(y, np.float64))
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


def _convert_layer(layer: _Layer, format: str, on_ragged: str, x_shape):
  m = layer.mask
  counts = m.reshape(-1, m.shape[-1]).sum(axis=0)
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
  ragged = bool(active.any() and counts[active].min() != counts[active].max())
  fmt = format
  if ragged and fmt == "condensed" and layer.folded_inputs == 0:
    if on_ragged == "error":
      raise _unsupported(
          layer.path,
          f"is not constant fan-in: its active neurons have between "
          f"{int(counts[active].min())} and {int(counts[active].max())} non-zero inputs",
          "Condensed layers need SRigL's constant fan-in masks; for RigL/SET "
          "runs pass on_ragged='structured' (ablated neurons removed, dense kernels).",
      )
    fmt = "structured"
  entry["format"] = fmt
  kernel = np.where(m, layer.kernel, 0).astype(np.float32)
  bias_map = None if layer.bias_map is None else jnp.asarray(layer.bias_map)
  if fmt == "condensed":
    if layer.kind == "conv":
      c = condense_conv(
          kernel,
          m,
          layer.bias,
          strides=_as_tuple(layer.module.strides),
          padding="VALID",
          name=layer.path,
          allow_ragged=True,
      )
      new = {"values": c.values, "taps": c.taps, "neuron_ids": c.neuron_ids, "bias": c.bias}
    else:
      c = condense_dense(kernel, m, layer.bias, name=layer.path, allow_ragged=True)
      new = {"values": c.values, "indices": c.indices, "neuron_ids": c.neuron_ids, "bias": c.bias}
    entry["fan_in"] = int(c.values.shape[1])
  else:
    ids = np.nonzero(active)[0].astype(np.int32)
    new = {
        "kernel": jnp.asarray(kernel[..., ids]),
        "neuron_ids": jnp.asarray(ids),
        "bias": jnp.asarray(layer.bias),
    }
    entry["fan_in"] = int(counts[active].max()) if active.any() else 0
  if bias_map is not None:
    new["bias_map"] = bias_map
  return entry, new
