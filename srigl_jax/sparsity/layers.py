"""Which parameters are sparse, their fan-in geometry, and their budgets.

Everything here is static Python computed from the parameter *shapes*; it is
derived once when the sparse optimizer is initialised and travels with its
state as static pytree metadata (no arrays).

Parameters are found by their '/'-joined key paths ('linear1/kernel'). A Flax
NNX state holds each array inside an `nnx.Variable`, which adds the Variable's
`value` attribute to every path; `unwrap_variables` takes the arrays out once,
at the entry points of the sparse optimizer, so Linen params and NNX states
give the same paths and the same trees.
"""

from __future__ import annotations

import dataclasses
import fractions
import logging
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

# A rule deciding which leaves are sparse: (path, shape) -> bool.
SparseRule = Callable[[str, tuple[int, ...]], bool]
# A rule giving the fan-in axes of a sparse leaf: (path, shape) -> axes or None
# (None falls back to the default rule).
FanInRule = Callable[[str, tuple[int, ...]], "tuple[int, ...] | None"]

DISTRIBUTIONS = ("uniform", "erk")
# The classifier heads of common models; exempt from ablation by default.
DEFAULT_NO_ABLATION = (r"(^|/)(head|classifier|logits)/kernel$",)
_ATTENTION_QKV = ("query", "key", "value")


class SparseArgumentError(ValueError):
  """An argument of the sparse optimizer is out of range.

  Attributes:
    argument: the name of the argument (e.g. 'gamma_sal'), for callers that map
      it to a setting of their own.
  """

  def __init__(self, argument: str, message: str):
    super().__init__(message)
    self.argument = argument


class NoSparseLayerError(SparseArgumentError):
  """Sparsity > 0 was asked for, but no parameter is selected as sparse.

  Training would silently stay dense. `argument` is 'sparse_rule', or
  'dense_layers' when the rule matched kernels that dense_layers all kept
  dense.
  """


def _nnx_variable_type() -> type | None:
  # No NNX tree can exist before flax.nnx is imported, and Linen users should
  # not pay for importing it.
  nnx = sys.modules.get("flax.nnx")
  return None if nnx is None else nnx.Variable


def _variable_value(variable: Any) -> Any:
  # flax 0.12 deprecates the `.value` property in favour of `get_value()`.
  get_value = getattr(variable, "get_value", None)
  return get_value() if get_value is not None else variable.value


def unwrap_variables(tree: Any) -> Any:
  """`tree` with every Flax NNX Variable replaced by the value it holds.

  `nnx.state(model, nnx.Param)` holds `nnx.Param` Variables, and
  `nnx.Optimizer` keeps its optimizer state in `OptArray`/`OptVariable`s,
  while `nnx.Optimizer.update` hands the transformation plain arrays
  (`nnx.as_pure`). Unwrapping at every entry point makes all of these one
  layout: paths without the Variable's `value` attribute, and an optimizer
  state that does not depend on how `init` was called.

  Args:
    tree: any pytree.

  Returns:
    The same tree with each Variable replaced by its value; `tree` itself
    when it holds no Variable (Linen params).
  """
  variable = _nnx_variable_type()
  if variable is None:
    return tree
  is_variable = lambda x: isinstance(x, variable)
  leaves, treedef = jax.tree.flatten(tree, is_leaf=is_variable)
  if not any(is_variable(x) for x in leaves):
    return tree
  return jax.tree.unflatten(treedef, [_variable_value(x) if is_variable(x) else x for x in leaves])


def rewrap_variables(like: Any, values: Any) -> Any:
  """`values` in the layout of `like`: the inverse of `unwrap_variables`.

  Args:
    like: a tree that may hold Flax NNX Variables (e.g. `nnx.state(model,
      nnx.Param)`).
    values: `unwrap_variables(like)`-shaped tree of new values.

  Returns:
    `values` with each value put back into a copy of the Variable `like` holds
    at its place (same type and metadata), so that e.g. `nnx.update(model,
    ...)` or `optax.apply_updates(like, ...)` takes it; `values` itself when
    `like` holds no Variable.
  """
  variable = _nnx_variable_type()
  if variable is None:
    return values
  is_variable = lambda x: isinstance(x, variable)
  leaves, treedef = jax.tree.flatten(like, is_leaf=is_variable)
  if not any(is_variable(x) for x in leaves):
    return values
  new = treedef.flatten_up_to(values)
  return jax.tree.unflatten(
      treedef, [v.replace(x) if is_variable(v) else x for v, x in zip(leaves, new)]
  )


def path_str(key_path: Sequence[Any]) -> str:
  """Turns a jax key path into 'a/b/kernel'."""
  parts = []
  for k in key_path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    else:
      parts.append(str(k))
  return "/".join(parts)


def kernels_rule(path: str, shape: tuple[int, ...]) -> bool:
  """Default sparse rule: Flax `kernel` leaves of rank >= 2."""
  return path.rsplit("/", 1)[-1] == "kernel" and len(shape) >= 2


def dense_only_rule(path: str, shape: tuple[int, ...]) -> bool:
  """Only 2-D Dense kernels are sparse; convolutions stay dense."""
  return path.rsplit("/", 1)[-1] == "kernel" and len(shape) == 2


SPARSE_RULES: dict[str, SparseRule] = {
    "kernels": kernels_rule,
    "dense_only": dense_only_rule,
}
# What each named rule selects, for error messages.
_RULE_TEXT = {
    "kernels": "every leaf named 'kernel' of rank >= 2",
    "dense_only": "every leaf named 'kernel' of rank 2",
}


def default_fan_in_axes(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """Fan-in axes of a Flax kernel (notes section 1).

  Dense and Conv kernels hold their output units on the last axis. Flax
  attention projections are DenseGeneral kernels: query/key/value are
  (embed, heads, head_dim) with fan-in axis 0, the output projection `out` is
  (heads, head_dim, embed) with fan-in axes (0, 1).
  """
  parts = path.split("/")
  parent = parts[-2] if len(parts) >= 2 else ""
  if len(shape) == 3 and parent in _ATTENTION_QKV:
    return (0,)
  return tuple(range(len(shape) - 1))


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """Static description of one sparse layer.

  Attributes:
    path: '/'-joined path of the kernel in the params tree.
    shape: kernel shape.
    fan_in_axes: axes that feed one neuron; the other axes index neurons.
    density: target fraction of non-zero weights, 1 - sparsity.
    ablation: whether SRigL may ablate neurons of this layer.
    group_size: G, the number of consecutive neurons (columns of the (D, N)
      matrix of `updates.to_matrix`; output channels of a conv) that share one
      mask column. 1 (the default) is plain per-neuron training; a layer whose
      width N is not a multiple of the requested group size trains with 1.
  """

  path: str
  shape: tuple[int, ...]
  fan_in_axes: tuple[int, ...]
  density: float
  ablation: bool
  group_size: int = 1

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def fan_in(self) -> int:
    """Dense fan-in D: product of the fan-in axes."""
    return math.prod(self.shape[a] for a in self.fan_in_axes)

  @property
  def num_neurons(self) -> int:
    return self.size // self.fan_in

  @property
  def budget(self) -> int:
    """B = floor(numel * (1 - s)) non-zero weights."""
    return budget(self.size, self.density)

  @property
  def k0(self) -> int:
    """Constant fan-in before any ablation, floor(B / n_neurons)."""
    return self.budget // self.num_neurons

  @property
  def num_groups(self) -> int:
    """N / G groups of G consecutive neurons (N when ungrouped)."""
    return self.num_neurons // self.group_size

  def group_view(self) -> GroupSpec:
    """The layer at group granularity: D inputs, N / G groups, floor(B / G) entries."""
    return GroupSpec(
        path=self.path,
        fan_in=self.fan_in,
        num_neurons=self.num_groups,
        budget=self.budget // self.group_size,
        ablation=self.ablation,
    )

  @property
  def sparsity(self) -> float:
    return 1.0 - self.density

  @property
  def perm(self) -> tuple[int, ...]:
    """Axis order putting the fan-in axes first (identity for Flax kernels)."""
    rest = tuple(a for a in range(len(self.shape)) if a not in self.fan_in_axes)
    return self.fan_in_axes + rest


@dataclasses.dataclass(frozen=True)
class GroupSpec:
  """A sparse layer seen at group granularity, for group-shared fan-in.

  The group-shared rules run the per-neuron rules of `updates` on the (D, N / G)
  matrix of group scores, one column per group of G consecutive neurons. This
  view gives those rules the geometry they read from a `LayerSpec`: each group
  is one "neuron" with dense fan-in D, and the budget counts (group, input)
  entries, each standing for G weights. Since floor(floor(B / G) / (N / G)) =
  floor(B / N), the constant fan-in before ablation `k0` equals the layer's.

  Attributes:
    path: '/'-joined path of the kernel in the params tree.
    fan_in: dense fan-in D of every group.
    num_neurons: the number of groups, N / G.
    budget: floor(B / G) (group, input) entries.
    ablation: whether SRigL may ablate groups of this layer.
  """

  path: str
  fan_in: int
  num_neurons: int
  budget: int
  ablation: bool

  @property
  def k0(self) -> int:
    """Constant fan-in of a group before any ablation, floor(budget / groups)."""
    return self.budget // self.num_neurons


def budget(size: int, density: float) -> int:
  # The tolerance absorbs binary rounding of decimal sparsities: 10 weights at
  # sparsity 0.9 are meant to keep exactly 1, not floor(0.99999...) = 0.
  return int(math.floor(size * density + 1e-6))


def _density_from_sparsity(sparsity: float) -> float:
  # 1 - 0.9 is 0.09999999999999998 in binary; take the decimal the user typed.
  return float(1 - fractions.Fraction(repr(float(sparsity))))


def validate_sparsity(sparsity: float, name: str = "sparsity") -> float:
  if not isinstance(sparsity, (int, float, np.floating)) or isinstance(sparsity, bool):
    raise TypeError(f"{name} must be a float in [0, 1), got {sparsity!r}.")
  if not 0.0 <= float(sparsity) < 1.0:
    raise SparseArgumentError(
        name,
        f"{name}={sparsity!r} is outside [0, 1): it is the fraction of weights "
        "set to zero, e.g. 0.9 keeps 10% of each sparse layer.",
    )
  return float(sparsity)


def validate_group_size(group_size: Any) -> int:
  """Checks `group_size` (an int >= 1; bools are refused) and returns it."""
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
    raise SparseArgumentError(
        "group_size",
        f"group_size must be an integer >= 1 (the number of consecutive output "
        f"neurons sharing one set of inputs; 1 = per-neuron SRigL), got {group_size!r}.",
    )
  return group_size


def erk_densities(
    shapes: Mapping[str, tuple[int, ...]],
    sparsity: float,
    power_scale: float = 1.0,
) -> dict[str, float]:
  """Erdos-Renyi-Kernel layer densities (notes section 2).

  Density of layer i is eps * p_i with p_i = (sum(shape_i) / prod(shape_i)) **
  power_scale; eps makes the total non-zero count equal
  sum_i floor((1 - s) * N_i). Layers whose density would exceed 1 become dense,
  leave the budget, and eps is solved again.

  Args:
    shapes: path -> kernel shape of every sparse layer.
    sparsity: global target sparsity over these layers.
    power_scale: exponent applied to the raw ERK probabilities.

  Returns:
    path -> density in (0, 1].
  """
  density = _density_from_sparsity(sparsity)
  sizes = {p: math.prod(s) for p, s in shapes.items()}
  raw = {p: (sum(s) / math.prod(s)) ** power_scale for p, s in shapes.items()}
  target = sum(budget(n, density) for n in sizes.values())
  dense: set[str] = set()
  while True:
    free = [p for p in shapes if p not in dense]
    remaining = target - sum(sizes[p] for p in dense)
    divisor = sum(raw[p] * sizes[p] for p in free)
    if not free or divisor <= 0:
      return {p: 1.0 for p in shapes}
    eps = remaining / divisor
    over = [p for p in free if eps * raw[p] > 1.0]
    if not over:
      out = {p: 1.0 for p in dense}
      out.update({p: eps * raw[p] for p in free})
      return out
    # Only the layers with the largest raw density are forced dense per round,
    # as in RigL's reference implementation; the others may fit once eps drops.
    top = max(raw[p] for p in over)
    dense.update(p for p in over if raw[p] == top)


def _compile_patterns(patterns: Sequence[str] | str | None, what: str):
  if patterns is None:
    return []
  if isinstance(patterns, str):
    patterns = [patterns]
  out = []
  for p in patterns:
    try:
      out.append(re.compile(p))
    except re.error as e:
      raise SparseArgumentError(what, f"{what} pattern {p!r} is not a valid regex: {e}") from e
  return out


def resolve_sparse_rule(rule: str | SparseRule | None) -> SparseRule:
  if rule is None:
    return kernels_rule
  if isinstance(rule, str):
    if rule not in SPARSE_RULES:
      raise SparseArgumentError(
          "sparse_rule",
          f"Unknown sparse rule {rule!r}; valid names are {sorted(SPARSE_RULES)}"
          " or a callable (path, shape) -> bool.",
      )
    return SPARSE_RULES[rule]
  if not callable(rule):
    raise TypeError(f"sparse_rule must be a name or a callable, got {rule!r}.")
  return rule


def build_layer_specs(
    params: Any,
    *,
    sparsity: float,
    distribution: str = "erk",
    erk_power_scale: float = 1.0,
    sparse_rule: str | SparseRule | None = None,
    dense_layers: Sequence[str] | str | None = (),
    no_ablation: Sequence[str] | str | None = DEFAULT_NO_ABLATION,
    fan_in_axes: FanInRule | None = None,
    constant_fan_in: bool = True,
    group_size: int = 1,
) -> dict[str, LayerSpec]:
  """Decides the sparse layers of a params tree and their budgets.

  Args:
    params: params pytree (arrays or ShapeDtypeStructs), e.g. Linen params or
      a Flax NNX state `nnx.state(model, nnx.Param)`.
    sparsity: global sparsity in [0, 1).
    distribution: 'uniform' or 'erk'.
    erk_power_scale: ERK exponent.
    sparse_rule: 'kernels' (default), 'dense_only', or (path, shape) -> bool.
    dense_layers: regexes (searched in the path) of layers kept dense.
    no_ablation: regexes of layers exempt from neuron ablation.
    fan_in_axes: optional override (path, shape) -> fan-in axes or None.
    constant_fan_in: whether every neuron must receive >= 1 weight (SRigL).
    group_size: G consecutive neurons share one mask column. Each layer whose
      width (neuron count N) is a multiple of G gets `group_size=G`; the others
      get 1 (trained ungrouped), with a logged warning naming them.

  Returns:
    path -> LayerSpec for every sparse layer, in tree order. Layers whose
    density is 1 (sparsity 0, or made dense by ERK) are left out.

  Raises:
    NoSparseLayerError: sparsity > 0 but no leaf is selected as sparse (the
      rule matched nothing, or dense_layers kept every match dense).
    ValueError: on bad arguments, a layer whose fan-in would reach 0 (or,
      grouped without constant fan-in, whose budget is below one group entry
      of G weights), or a group_size > 1 that divides no sparse layer's width.
  """
  validate_sparsity(sparsity)
  validate_group_size(group_size)
  if distribution not in DISTRIBUTIONS:
    raise SparseArgumentError(
        "distribution", f"Unknown distribution {distribution!r}; valid names are {DISTRIBUTIONS}."
    )
  if erk_power_scale <= 0:
    raise SparseArgumentError(
        "erk_power_scale", f"erk_power_scale must be > 0, got {erk_power_scale}."
    )
  rule = resolve_sparse_rule(sparse_rule)
  dense_pats = _compile_patterns(dense_layers, "dense_layers")
  abl_pats = _compile_patterns(no_ablation, "no_ablation")

  leaves = jax.tree_util.tree_leaves_with_path(unwrap_variables(params))
  seen = {path_str(kp): tuple(int(d) for d in np.shape(leaf)) for kp, leaf in leaves}
  matched = {path: shape for path, shape in seen.items() if rule(path, shape)}
  shapes = {
      path: shape for path, shape in matched.items() if not any(p.search(path) for p in dense_pats)
  }
  for p in dense_pats:
    if not any(p.search(path) for path in seen):
      logging.warning("dense_layers pattern %r matches no parameter.", p.pattern)
  if sparsity == 0.0:
    return {}
  if not shapes:
    raise _no_sparse_layer_error(sparsity, sparse_rule, dense_layers, seen, matched)

  if distribution == "uniform":
    d = _density_from_sparsity(sparsity)
    densities = {p: d for p in shapes}
  else:
    densities = erk_densities(shapes, sparsity, erk_power_scale)

  specs: dict[str, LayerSpec] = {}
  for path, shape in shapes.items():
    dens = densities[path]
    if dens >= 1.0:
      continue
    axes = fan_in_axes(path, shape) if fan_in_axes is not None else None
    if axes is None:
      axes = default_fan_in_axes(path, shape)
    axes = tuple(sorted(int(a) % len(shape) for a in axes))
    if not axes or len(axes) == len(shape) or len(set(axes)) != len(axes):
      raise ValueError(
          f"Layer '{path}' with shape {shape}: fan-in axes {axes} must be a "
          "non-empty proper subset of the axes."
      )
    spec = LayerSpec(
        path=path,
        shape=shape,
        fan_in_axes=axes,
        density=dens,
        ablation=not any(p.search(path) for p in abl_pats),
    )
    if spec.num_neurons % group_size == 0:
      spec = dataclasses.replace(spec, group_size=group_size)
    _check_budget(spec, constant_fan_in)
    specs[path] = spec
  if group_size > 1 and specs:
    _check_groups(specs, group_size)
  return specs


def _listing(paths: Mapping[str, tuple[int, ...]], limit: int = 6) -> str:
  shown = ", ".join(f"'{p}' {s}" for p, s in list(paths.items())[:limit])
  more = len(paths) - limit
  return shown + (f", ... ({more} more)" if more > 0 else "")


def _no_sparse_layer_error(
    sparsity: float,
    sparse_rule: str | SparseRule | None,
    dense_layers: Sequence[str] | str | None,
    seen: Mapping[str, tuple[int, ...]],
    matched: Mapping[str, tuple[int, ...]],
) -> NoSparseLayerError:
  """Why no layer would be sparse: the rule, the paths it saw, and the fix."""
  name = "kernels" if sparse_rule is None else sparse_rule
  if isinstance(name, str):
    rule = f"sparse_rule={name!r} ({_RULE_TEXT[name]})"
  else:
    rule = f"sparse_rule={getattr(name, '__qualname__', repr(name))}"
  head = f"No layer to sparsify at sparsity={sparsity}: training would stay dense. "
  dense_only = "or method='dense' (or sparsity=0) to train dense on purpose."
  if matched:
    return NoSparseLayerError(
        "dense_layers",
        f"{head}{rule} matched {len(matched)} parameter(s), but "
        f"dense_layers={dense_layers!r} keeps every one dense: {_listing(matched)}. "
        f"Fix: narrow dense_layers, {dense_only}",
    )
  saw = f"the {len(seen)} parameter(s) given: {_listing(seen)}" if seen else "an empty tree"
  return NoSparseLayerError(
      "sparse_rule",
      f"{head}{rule} matched none of {saw}. Fix: pass the model's parameters "
      "(Linen: variables['params']; Flax NNX: nnx.state(model, nnx.Param), or "
      "nnx.Optimizer(model, tx, wrt=nnx.Param)), a sparse_rule callable (path, "
      f"shape) -> bool that selects your kernels by these paths, {dense_only}",
  )


def _check_groups(specs: Mapping[str, LayerSpec], group_size: int) -> None:
  ungrouped = [s for s in specs.values() if s.group_size != group_size]
  widths = ", ".join(f"'{s.path}' {s.num_neurons}" for s in ungrouped)
  if len(ungrouped) == len(specs):
    raise ValueError(
        f"group_size={group_size} divides the width (output neurons) of no sparse "
        f"layer: {widths}. Every layer would train ungrouped. Pass a group_size "
        "that divides some of these widths, group_size=1 for per-neuron SRigL, "
        "or change the layer widths."
    )
  if ungrouped:
    logging.warning(
        "group_size=%d does not divide the width of %s: these layers train "
        "ungrouped (group size 1).",
        group_size,
        widths,
    )


class FanInError(ValueError):
  """A sparse layer would keep no weight (or, under constant fan-in, a fan-in of 0)."""


def _check_budget(spec: LayerSpec, constant_fan_in: bool) -> None:
  n, size = spec.num_neurons, spec.size
  if constant_fan_in and spec.budget < n:
    raise FanInError(
        f"Layer '{spec.path}' (shape {spec.shape}, dense fan-in {spec.fan_in}, "
        f"{n} neurons) would have a constant fan-in of 0 at sparsity "
        f"{spec.sparsity:.4f}: its budget of {spec.budget} weights is below its "
        f"neuron count. The largest sparsity this layer can take is "
        f"{1 - n / size:.4f}. Lower the sparsity, or keep the layer dense with "
        f"dense_layers=[{re.escape(spec.path)!r}]."
    )
  if spec.group_size > 1 and spec.budget < spec.group_size:
    # Only reachable without constant fan-in (B >= N >= G otherwise).
    raise FanInError(
        f"Layer '{spec.path}' (shape {spec.shape}) would keep no group entry at "
        f"sparsity {spec.sparsity:.4f}: its budget of {spec.budget} weights is "
        f"below one group of group_size={spec.group_size} weights. Lower the "
        "sparsity or the group_size, or keep the layer dense."
    )
  if spec.budget < 1:
    raise FanInError(
        f"Layer '{spec.path}' (shape {spec.shape}) would keep no weight at "
        f"sparsity {spec.sparsity:.4f}. The largest sparsity it can take is "
        f"{1 - 1 / size:.4f}; lower the sparsity or keep the layer dense."
    )
