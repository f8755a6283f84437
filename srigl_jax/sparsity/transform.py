"""SRigL, RigL, SET and static sparse training as one Optax wrapper.

`srigl(inner, ...)` wraps any optax optimizer. Its state carries the masks, the
step count, a PRNG key and the inner optimizer's state. One call does
everything:

    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)

leaves every masked weight exactly zero (weights pruned at this step
included), gives masked positions no update from the inner optimizer, and every
`update_every` steps (until `stop_step`) updates the masks under `lax.cond`
inside the same jitted call, resetting the inner optimizer's moments wherever
the mask changed.

With `group_size=G > 1`, G consecutive output neurons of a layer share one
mask column (notes section 10): every rule runs on (group, input) entries
scored by the L1 norm over the group's neurons, so SRigL's budget, constant
fan-in, prune, grow and ablation act per group. G = 1 runs the per-neuron code
unchanged.

Flax NNX works the same way: `nnx.Optimizer(model, tx, wrt=nnx.Param)`, or
`tx.init(nnx.state(model, nnx.Param))` and `tx.update(grads, state, params)`
on the states `nnx.grad` and `nnx.state` give. Every entry point takes the
arrays out of the NNX Variables (`layers.unwrap_variables`), so the state holds
plain arrays whichever way it was built, and hands back updates and params in
the Variables they came in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from srigl_jax.sparsity import layers as layers_lib
from srigl_jax.sparsity import select
from srigl_jax.sparsity import updates as upd
from srigl_jax.sparsity.layers import LayerSpec, SparseArgumentError

METHODS = ("dense", "static", "set", "rigl", "srigl")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class SparseLayers:
  """Static (non-array) description of the sparse layers, kept in the state."""

  specs: tuple[LayerSpec, ...]

  def by_path(self) -> dict[str, LayerSpec]:
    return {s.path: s for s in self.specs}


class SparseState(NamedTuple):
  """State of the sparse optimizer.

  Attributes:
    count: int32 number of updates applied so far.
    masks: params-shaped tree: bool array per sparse kernel, None elsewhere.
    key: PRNG key (random growth of SET).
    grad_acc: params-shaped tree of accumulated grow scores (sparse kernels
      only, and only when grad_accumulation > 1), None elsewhere.
    inner_state: the wrapped optimizer's state.
    layers: static description of the sparse layers.
  """

  count: jax.Array
  masks: Any
  key: jax.Array
  grad_acc: Any
  inner_state: Any
  layers: SparseLayers


def _is_none(x):
  return x is None


def map_sparse(fn: Callable, sparse_tree: Any, *trees: Any, dense_fn=None) -> Any:
  """Maps fn over leaves where sparse_tree is not None.

  Args:
    fn: applied as fn(sparse_leaf, *other_leaves) on sparse positions.
    sparse_tree: params-shaped tree with None at dense positions.
    *trees: params-shaped trees.
    dense_fn: applied as dense_fn(*other_leaves) on dense positions; by default
      dense positions map to None.

  Returns:
    A params-shaped tree.
  """

  def f(s, *xs):
    if s is None:
      return None if dense_fn is None else dense_fn(*xs)
    return fn(s, *xs)

  return jax.tree.map(f, sparse_tree, *trees, is_leaf=_is_none)


def _paths_tree(params: Any) -> Any:
  return jax.tree_util.tree_map_with_path(lambda kp, _: layers_lib.path_str(kp), params)


def find_sparse_state(tree: Any) -> SparseState:
  """Finds the SparseState inside an optimizer state (or a TrainState).

  Args:
    tree: a tree holding exactly one SparseState: the state of the
      transformation, of a chain or wrapper holding it, a Flax TrainState, or
      the `opt_state` of an `nnx.Optimizer` (whose arrays are taken out of
      their NNX Variables).

  Returns:
    The SparseState, holding plain arrays.
  """
  found = [
      x
      for x in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, SparseState))
      if isinstance(x, SparseState)
  ]
  if len(found) != 1:
    raise ValueError(
        f"Expected exactly one srigl_jax sparse optimizer state in the tree, "
        f"found {len(found)}. Pass the state returned by tx.init of a "
        "srigl/rigl/set_sparse/static_sparse transformation."
    )
  return layers_lib.unwrap_variables(found[0])


def with_counts_of(tree: Any, source: Any) -> Any:
  """`tree` with each SparseState's step `count` taken from `source`.

  For a caller that keeps an old optimizer state (e.g. it skips a step whose
  gradient was not finite) but must keep the mask-update schedule aligned with
  its own step counter.

  Args:
    tree: an optimizer state (or a tree holding one).
    source: a tree of the same structure, whose counts are kept.

  Returns:
    `tree` with the counts of `source`.
  """
  is_sparse = lambda x: isinstance(x, SparseState)
  return jax.tree.map(
      lambda t, s: t._replace(count=s.count) if is_sparse(t) else t, tree, source, is_leaf=is_sparse
  )


def get_masks(opt_state: Any) -> Any:
  """Params-shaped tree of bool masks (None for dense leaves).

  Works on the state of the transformation itself, of any chain or wrapper
  containing it, on a Flax TrainState holding it, or on `nnx.Optimizer`'s
  `opt_state` (then a `nnx.State` of arrays, with the paths of
  `nnx.state(model, nnx.Param)`).
  """
  return find_sparse_state(opt_state).masks


def apply_masks(params: Any, masks_or_state: Any) -> Any:
  """Zeroes the masked weights of params.

  Args:
    params: params tree (Linen params, or `nnx.state(model, nnx.Param)`).
    masks_or_state: the masks (`get_masks`), or a state holding them.

  Returns:
    params with masked weights zero, in the layout it came in (NNX Variables
    included, so `nnx.update(model, apply_masks(...))` takes it).
  """
  masks = _masks_of(masks_or_state)
  masked = map_sparse(
      lambda m, p: jnp.where(m, p, jnp.zeros_like(p)),
      masks,
      layers_lib.unwrap_variables(params),
      dense_fn=lambda p: p,
  )
  return layers_lib.rewrap_variables(params, masked)


def _masks_of(masks_or_state: Any) -> Any:
  try:
    return get_masks(masks_or_state)
  except ValueError:
    return layers_lib.unwrap_variables(masks_or_state)


def sparse_init(params: Any, opt_state: Any, key: jax.Array, gain: float = math.sqrt(2.0)) -> Any:
  """Re-initialises the kept weights with their sparse fan-in (notes sec. 3).

  Every active weight of a sparse kernel is drawn from N(0, (gain / sqrt(k))^2)
  where k is its neuron's number of non-zero inputs (He/Kaiming normal with the
  sparse fan-in, so activations keep their scale); masked weights are zero.
  Dense leaves are returned unchanged.

  Args:
    params: params tree (Linen params, or `nnx.state(model, nnx.Param)`).
    opt_state: state containing the sparse optimizer's state.
    key: PRNG key.
    gain: sqrt(2) for ReLU networks.

  Returns:
    The new params, in the layout `params` came in: for an NNX state, a
    state of the same Variables, to be written back with `nnx.update(model,
    new_params)`.
  """
  state = find_sparse_state(opt_state)
  specs = state.layers.by_path()
  like, params = params, layers_lib.unwrap_variables(params)
  paths = _paths_tree(params)

  def init_leaf(m, p, path):
    spec = specs[path]
    mm = upd.to_matrix(m, spec)
    k = jnp.maximum(jnp.sum(mm, axis=0), 1).astype(jnp.float32)
    leaf_key = jax.random.fold_in(key, list(specs).index(path))
    w = jax.random.normal(leaf_key, mm.shape, jnp.float32) * (gain / jnp.sqrt(k))
    w = jnp.where(mm, w, 0.0).astype(p.dtype)
    return upd.from_matrix(w, spec)

  new = map_sparse(init_leaf, state.masks, params, paths, dense_fn=lambda p, _: p)
  return layers_lib.rewrap_variables(like, new)


def layer_stats(opt_state: Any) -> dict[str, dict[str, jax.Array]]:
  """Per-layer density, active neurons and fan-in, computed from the masks.

  Returns:
    path -> {'density', 'active_neurons', 'neurons', 'fan_in', 'min_fan_in',
    'sparsity_target', 'group_size', 'groups', 'active_groups'}; fan_in is the
    largest fan-in of a neuron (the constant fan-in k' for SRigL), min_fan_in
    the smallest over active neurons. group_size is the layer's effective group
    size (1 for a layer trained ungrouped), groups = neurons / group_size, and
    active_groups counts the groups with at least one active neuron.
  """
  state = find_sparse_state(opt_state)
  specs = state.layers.by_path()
  out = {}
  leaves = jax.tree_util.tree_leaves_with_path(state.masks)
  for kp, m in leaves:
    path = layers_lib.path_str(kp)
    spec = specs[path]
    per = jnp.sum(upd.to_matrix(m, spec), axis=0, dtype=jnp.int32)
    active = per > 0
    active_groups = jnp.any(active.reshape(spec.num_groups, spec.group_size), axis=1)
    out[path] = {
        "density": jnp.mean(m.astype(jnp.float32)),
        "active_neurons": jnp.sum(active, dtype=jnp.int32),
        "neurons": jnp.int32(spec.num_neurons),
        "fan_in": jnp.max(per),
        "min_fan_in": jnp.min(jnp.where(active, per, jnp.iinfo(jnp.int32).max)),
        "sparsity_target": jnp.float32(spec.sparsity),
        "group_size": jnp.int32(spec.group_size),
        "groups": jnp.int32(spec.num_groups),
        "active_groups": jnp.sum(active_groups, dtype=jnp.int32),
    }
  return out


def global_sparsity(opt_state: Any, params: Any) -> jax.Array:
  """Fraction of zero-masked weights over all params (dense leaves count)."""
  masks = get_masks(opt_state)
  total = sum(int(p.size) for p in jax.tree.leaves(params))
  zeros = sum(jnp.sum(~m, dtype=jnp.float32) for m in jax.tree.leaves(masks))
  return jnp.asarray(zeros, jnp.float32) / total


@dataclasses.dataclass(frozen=True)
class _Config:
  method: str
  sparsity: float
  distribution: str
  erk_power_scale: float
  update_every: int
  drop_fraction: float
  stop_step: int
  gamma_sal: float
  grad_accumulation: int
  sparse_rule: Any
  dense_layers: Any
  no_ablation: Any
  fan_in_axes: Any
  group_size: int


def _check_int(argument: str, name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise SparseArgumentError(argument, f"{name} must be an integer >= {minimum}, got {value!r}.")
  return value


def _validate(cfg: _Config) -> None:
  if cfg.method not in METHODS:
    raise SparseArgumentError(
        "method", f"Unknown method {cfg.method!r}; valid methods are {METHODS}."
    )
  layers_lib.validate_sparsity(cfg.sparsity)
  if cfg.distribution not in layers_lib.DISTRIBUTIONS:
    raise SparseArgumentError(
        "distribution",
        f"distribution={cfg.distribution!r} is unknown; valid names are "
        f"{layers_lib.DISTRIBUTIONS}.",
    )
  if not cfg.erk_power_scale > 0:
    raise SparseArgumentError(
        "erk_power_scale", f"erk_power_scale must be > 0, got {cfg.erk_power_scale}."
    )
  _check_int("update_every", "update_every (delta)", cfg.update_every, 1)
  _check_int("stop_step", "stop_step (T_end)", cfg.stop_step, 1)
  _check_int("grad_accumulation", "grad_accumulation", cfg.grad_accumulation, 1)
  layers_lib.validate_group_size(cfg.group_size)
  if cfg.grad_accumulation > cfg.update_every:
    raise SparseArgumentError(
        "grad_accumulation",
        f"grad_accumulation={cfg.grad_accumulation} exceeds update_every="
        f"{cfg.update_every}: the grow score can only average the mini-batches "
        "since the last mask update.",
    )
  if not 0.0 < cfg.drop_fraction <= 1.0:
    raise SparseArgumentError(
        "drop_fraction", f"drop_fraction (alpha) must be in (0, 1], got {cfg.drop_fraction}."
    )
  if not cfg.gamma_sal >= 0.0:
    raise SparseArgumentError(
        "gamma_sal", f"gamma_sal must be >= 0 (0 disables ablation), got {cfg.gamma_sal}."
    )
  if cfg.gamma_sal > 1.0:
    raise SparseArgumentError(
        "gamma_sal",
        f"gamma_sal={cfg.gamma_sal} > 1 would ablate every neuron with fewer "
        "salient weights than its whole fan-in; use a value in [0, 1].",
    )
  layers_lib.resolve_sparse_rule(cfg.sparse_rule)
  layers_lib._compile_patterns(cfg.dense_layers, "dense_layers")
  layers_lib._compile_patterns(cfg.no_ablation, "no_ablation")


def _as_key(key: Any) -> jax.Array:
  if key is None:
    raise SparseArgumentError(
        "key",
        "A PRNG key is required (key=jax.random.key(seed)); srigl_jax uses no " "hidden seed.",
    )
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  if key.shape == (2,) and key.dtype == jnp.uint32:
    return jax.random.wrap_key_data(key)
  raise TypeError(f"key must be a JAX PRNG key, got {key!r}.")


def sparse_optimizer(
    inner: optax.GradientTransformation,
    *,
    method: str = "srigl",
    sparsity: float,
    key: jax.Array,
    stop_step: int,
    distribution: str = "erk",
    erk_power_scale: float = 1.0,
    update_every: int = 100,
    drop_fraction: float = 0.3,
    gamma_sal: float = 0.3,
    grad_accumulation: int = 1,
    sparse_rule: str | Callable | None = None,
    dense_layers: Sequence[str] | str | None = (),
    no_ablation: Sequence[str] | str | None = layers_lib.DEFAULT_NO_ABLATION,
    fan_in_axes: Callable | None = None,
    group_size: int = 1,
) -> optax.GradientTransformationExtraArgs:
  """Wraps an optax optimizer with dynamic (or static) sparse training.

  Args:
    inner: the optimizer to wrap (any optax GradientTransformation).
    method: 'srigl', 'rigl', 'set', 'static', or 'dense' (no sparsity; the
      same state layout, so trainers need no special case).
    sparsity: global sparsity s in [0, 1).
    key: PRNG key for the initial masks and SET's random growth.
    stop_step: T_end, the last step (exclusive) at which masks change; the
      paper uses 75% of training.
    distribution: layer-wise sparsity, 'erk' or 'uniform'.
    erk_power_scale: ERK exponent.
    update_every: delta, steps between mask updates.
    drop_fraction: alpha, the initial drop fraction (cosine-annealed to 0).
    gamma_sal: SRigL ablation threshold as a fraction of the constant fan-in;
      0 disables ablation (SRigL w/o ablation).
    grad_accumulation: average the grow score over this many mini-batches
      before each update (<= update_every).
    sparse_rule: which leaves are sparse: 'kernels' (Flax kernels of rank >= 2,
      the default), 'dense_only', or a callable (path, shape) -> bool. Paths
      are '/'-joined keys ('linear1/kernel'), the same for Linen params and
      Flax NNX states (whose Variables are unwrapped first); `nnx.Linear`,
      `nnx.Conv`, `nnx.LinearGeneral` and `nnx.MultiHeadAttention` name and
      shape their kernels as Linen does, so they get the same fan-in axes.
    dense_layers: regexes (searched in '/'-joined paths) of kernels kept dense.
    no_ablation: regexes of layers exempt from ablation (classifier heads by
      default).
    fan_in_axes: optional callable (path, shape) -> fan-in axes or None, to
      override the default fan-in geometry (see layers.default_fan_in_axes).
    group_size: G, group-shared fan-in (notes section 10). G consecutive output
      neurons (columns of the (D, N) matrix of `updates.to_matrix`; output
      channels of a conv) share one mask column, each neuron keeping its own
      weights. The rules run on (group, input) entries: drop score the L1 norm
      of |W| over the group's neurons, grow score the L1 norm of the grow score
      |grad| (accumulated when grad_accumulation > 1), budget floor(B / G)
      entries. SRigL then acts per group: the initial mask draws k0 = floor(B /
      N) distinct inputs per group; n_prune = floor(n_entries * f_t); a group is
      ablated when its salient entry count is below tau = max(1,
      floor(gamma_sal * k0)), the guard keeping at least m + 1 groups with m =
      floor(B / (G * D)); every active group gets k' = floor(B / (G * active
      groups)) inputs. RigL, SET and static run their unstructured rules on the
      entries (1 x G blocks), so each keeps exactly floor(B / G) entries. A
      layer whose width N is not a multiple of G trains ungrouped (its
      LayerSpec and `layer_stats` report group_size 1); `init` raises if no
      sparse layer's width is. 1 (the default) is plain per-neuron training.

  Returns:
    An optax.GradientTransformationExtraArgs whose update requires params.

  Raises:
    SparseArgumentError: an argument out of range (a `ValueError` whose
      `argument` attribute names it), at construction.
    NoSparseLayerError: at `init`, sparsity > 0 but no parameter is selected
      as sparse (a `SparseArgumentError` naming sparse_rule or dense_layers;
      the message lists the paths seen and the fix).
    ValueError: a layer that cannot take the sparsity or the group_size, at
      `init`.
  """
  if method == "dense":
    sparsity = 0.0
  cfg = _Config(
      method=method,
      sparsity=sparsity,
      distribution=distribution,
      erk_power_scale=erk_power_scale,
      update_every=update_every,
      drop_fraction=drop_fraction,
      stop_step=stop_step,
      gamma_sal=gamma_sal if method == "srigl" else 0.0,
      grad_accumulation=grad_accumulation,
      sparse_rule=sparse_rule,
      dense_layers=dense_layers,
      no_ablation=no_ablation,
      fan_in_axes=fan_in_axes,
      group_size=group_size,
  )
  _validate(cfg)
  base_key = _as_key(key)
  dynamic = method in ("set", "rigl", "srigl")

  def specs_for(params) -> SparseLayers:
    specs = layers_lib.build_layer_specs(
        params,
        sparsity=cfg.sparsity,
        distribution=cfg.distribution,
        erk_power_scale=cfg.erk_power_scale,
        sparse_rule=cfg.sparse_rule,
        dense_layers=cfg.dense_layers,
        no_ablation=cfg.no_ablation,
        fan_in_axes=cfg.fan_in_axes,
        constant_fan_in=method == "srigl",
        group_size=cfg.group_size,
    )
    return SparseLayers(tuple(specs.values()))

  def init_fn(params):
    params = layers_lib.unwrap_variables(params)
    layers = specs_for(params)
    specs = layers.by_path()
    mask_key, state_key = jax.random.split(base_key)
    index = {p: i for i, p in enumerate(specs)}

    def make_mask(path, p):
      if path not in specs:
        return None
      spec = specs[path]
      k = jax.random.fold_in(mask_key, index[path])
      if spec.group_size > 1:
        view = spec.group_view()
        if method == "srigl":
          m = upd.random_constant_fan_in_mask(k, view)
        else:
          m = upd.random_unstructured_mask(k, view)
        m = upd.expand_groups(m, spec.group_size)
      elif method == "srigl":
        m = upd.random_constant_fan_in_mask(k, spec)
      else:
        m = upd.random_unstructured_mask(k, spec)
      return upd.from_matrix(m, spec)

    masks = jax.tree.map(make_mask, _paths_tree(params), params)
    if cfg.grad_accumulation > 1 and dynamic:
      grad_acc = map_sparse(lambda m, p: jnp.zeros(p.shape, jnp.float32), masks, params)
    else:
      grad_acc = map_sparse(lambda m: None, masks)
    return SparseState(
        count=jnp.zeros([], jnp.int32),
        masks=masks,
        key=state_key,
        grad_acc=grad_acc,
        inner_state=inner.init(params),
        layers=layers,
    )

  def new_masks_for(masks, stepped, scores, specs, frac, grow_key):
    """The mask update of every sparse layer (notes section 4)."""
    layer_index = {p: i for i, p in enumerate(specs)}

    def grouped_layer_update(spec, m, w, s, index):
      # The per-neuron rules on the (D, N / G) matrix of (group, input)
      # entries, with the group view's budget; see `sparse_optimizer`.
      size, view = spec.group_size, spec.group_view()
      m_g = upd.group_any(m, size)
      w_keys = select.magnitude_keys(upd.group_l1(jnp.where(m, w, jnp.zeros_like(w)), size))
      if method == "set":
        g_keys = select.random_keys(jax.random.fold_in(grow_key, index), m_g.shape)
      else:
        g_keys = select.magnitude_keys(upd.group_l1(s, size))
      if method == "srigl":
        new = upd.srigl_update(m_g, w_keys, g_keys, frac, view, cfg.gamma_sal)
      else:
        new = upd.unstructured_update(m_g, w_keys, g_keys, frac)
      return upd.expand_groups(new, size)

    def layer_update(spec, m, w, s, index):
      if spec.group_size > 1:
        return grouped_layer_update(spec, m, w, s, index)
      w_keys = select.magnitude_keys(w)
      if method == "set":
        g_keys = select.random_keys(jax.random.fold_in(grow_key, index), m.shape)
      else:
        g_keys = select.magnitude_keys(s)
      if method == "srigl":
        return upd.srigl_update(m, w_keys, g_keys, frac, spec, cfg.gamma_sal)
      return upd.unstructured_update(m, w_keys, g_keys, frac)

    by_path = [
        {layers_lib.path_str(kp): x for kp, x in jax.tree_util.tree_leaves_with_path(t)}
        for t in (masks, stepped, scores)
    ]
    new_by_path = {}
    # Layers of the same geometry and budget (the blocks of a ResNet or a ViT)
    # share one compiled body under lax.map: compile time then grows with the
    # number of distinct layer shapes, not the number of layers.
    for group in _same_geometry_groups(specs):
      spec = specs[group[0]]
      stacked = [jnp.stack([upd.to_matrix(t[p], specs[p]) for p in group]) for t in by_path]
      index = jnp.asarray([layer_index[p] for p in group], jnp.int32)
      if len(group) == 1:
        out = layer_update(spec, *(x[0] for x in stacked), index[0])[None]
      else:
        out = lax.map(lambda a: layer_update(spec, *a), (*stacked, index))
      for j, p in enumerate(group):
        new_by_path[p] = upd.from_matrix(out[j], specs[p])
    return map_sparse(lambda m, path: new_by_path[path], masks, _paths_tree(masks))

  def update_fn(grads, state, params=None, **extra_args):
    if params is None:
      raise ValueError(
          "The sparse optimizer needs the params: call " "tx.update(grads, state, params)."
      )
    grads_like = grads
    grads, state, params = map(layers_lib.unwrap_variables, (grads, state, params))
    specs = state.layers.by_path()
    masks = state.masks
    step = state.count + 1

    grad_acc = state.grad_acc
    if cfg.grad_accumulation > 1 and dynamic:
      pos = (step - 1) % cfg.update_every
      first = pos == cfg.update_every - cfg.grad_accumulation
      in_window = pos >= cfg.update_every - cfg.grad_accumulation
      grad_acc = map_sparse(
          lambda a, g: jnp.where(first, 0.0, a) + jnp.where(in_window, g.astype(jnp.float32), 0.0),
          grad_acc,
          grads,
      )
      scores = grad_acc
    else:
      scores = map_sparse(lambda m, g: g, masks, grads)

    def inner_step():
      masked_grads = map_sparse(
          lambda m, g: jnp.where(m, g, jnp.zeros_like(g)),
          masks,
          grads,
          dense_fn=lambda g: g,
      )
      return inner.update(masked_grads, state.inner_state, params, **extra_args)

    def final_updates(new_masks, inner_updates):
      # Kept weights take the inner step; pruned and newly grown weights end
      # at exactly 0 (p + (-p) == 0 in IEEE arithmetic).
      return map_sparse(
          lambda new_m, old_m, p, u: jnp.where(new_m & old_m, u, -p).astype(u.dtype),
          new_masks,
          masks,
          params,
          inner_updates,
          dense_fn=lambda m, p, u: u,
      )

    inner_updates, inner_state = inner_step()
    key = state.key
    if dynamic and specs:
      is_update = (step % cfg.update_every == 0) & (step < cfg.stop_step)

      def compute_masks(key):
        # Recomputes the inner step from the (already materialised) inputs
        # rather than taking inner_updates as an operand: an operand would
        # force the common no-update step to materialise it and break the
        # fusion of the inner update, the masking and apply_updates.
        stepped_updates, _ = inner_step()
        key, grow_key = jax.random.split(key)
        # Weights after the inner step, computed exactly as optax.apply_updates
        # does, so the drop score sees the values the kept weights will have.
        stepped = map_sparse(
            lambda m, p, u: jnp.asarray(p + u).astype(p.dtype),
            masks,
            params,
            stepped_updates,
        )
        frac = upd.drop_fraction(step, cfg.drop_fraction, cfg.stop_step)
        return new_masks_for(masks, stepped, scores, specs, frac, grow_key), key

      new_masks, key = lax.cond(is_update, compute_masks, lambda key: (masks, key), key)
      # Elementwise, so XLA fuses the reset into the inner optimizer's update.
      changed = _changed_tree(masks, new_masks, params)
      inner_state = optax.tree_map_params(inner, _reset_where, inner_state, changed)
    else:
      new_masks = masks
    updates = layers_lib.rewrap_variables(grads_like, final_updates(new_masks, inner_updates))
    return updates, SparseState(
        count=state.count + 1,
        masks=new_masks,
        key=key,
        grad_acc=grad_acc,
        inner_state=inner_state,
        layers=state.layers,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _same_geometry_groups(specs: dict[str, LayerSpec]) -> list[list[str]]:
  """Paths of sparse layers grouped by (D, N, budget, ablation, group size), in tree order."""
  groups: dict[tuple, list[str]] = {}
  for path, spec in specs.items():
    key = (spec.fan_in, spec.num_neurons, spec.budget, spec.ablation, spec.group_size)
    groups.setdefault(key, []).append(path)
  return list(groups.values())


def _reset_where(s, changed):
  """Zeroes an optimizer-state leaf where the mask changed."""
  if jnp.ndim(changed) == 0 or jnp.shape(s) != changed.shape:
    return s  # a dense parameter, or a state leaf not shaped like its param
  return jnp.where(changed, jnp.zeros_like(s), s)


def _changed_tree(masks, new_masks, params):
  """Params-shaped bool tree: where the mask changed (scalar False if dense)."""
  return jax.tree.map(
      lambda old, new, p: jnp.zeros((), bool) if old is None else old != new,
      masks,
      new_masks,
      params,
      is_leaf=_is_none,
  )


def srigl(inner: optax.GradientTransformation, **kwargs):
  """SRigL: constant fan-in dynamic sparse training with neuron ablation.

  See `sparse_optimizer` for the arguments (method is 'srigl').
  """
  return sparse_optimizer(inner, method="srigl", **kwargs)


def rigl(inner: optax.GradientTransformation, **kwargs):
  """RigL (unstructured); see `sparse_optimizer`."""
  return sparse_optimizer(inner, method="rigl", **kwargs)


def set_sparse(inner: optax.GradientTransformation, **kwargs):
  """SET: magnitude drop, random growth (unstructured); see `sparse_optimizer`."""
  return sparse_optimizer(inner, method="set", **kwargs)


def static_sparse(inner: optax.GradientTransformation, **kwargs):
  """Static sparse training: a random unstructured mask that never changes."""
  kwargs.setdefault("stop_step", 1)
  return sparse_optimizer(inner, method="static", **kwargs)
