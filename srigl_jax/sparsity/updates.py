"""Prune / grow / ablate rules on one layer, written in matrix form.

A kernel is viewed as a (D, N) matrix: fan-in axes first (a free reshape for
Flax kernels, whose fan-in axes lead), one column per neuron. All functions
are traceable with static shapes; counts that depend on the data (how many to
prune, how many neurons survive) are traced scalars, handled by the radix
selection in `select`.

Group-shared fan-in (notes section 10) reuses these rules unchanged: a layer
with group size G is reduced to the (D, N / G) matrix of its groups
(`group_l1`, `group_any`), the rules run on it with the layer's `group_view()`
as their spec, and the group mask is expanded back to the G columns of every
group (`expand_groups`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from srigl_jax.sparsity import select
from srigl_jax.sparsity.layers import GroupSpec, LayerSpec

# The geometry the per-neuron rules read: a layer, or a layer's groups.
Geometry = LayerSpec | GroupSpec


def to_matrix(x: jax.Array, spec: LayerSpec) -> jax.Array:
  """(kernel shape) -> (D, N), fan-in axes first."""
  if spec.perm != tuple(range(len(spec.shape))):
    x = jnp.transpose(x, spec.perm)
  return x.reshape(spec.fan_in, spec.num_neurons)


def from_matrix(m: jax.Array, spec: LayerSpec) -> jax.Array:
  """(D, N) -> kernel shape; inverse of `to_matrix`."""
  perm = spec.perm
  x = m.reshape(tuple(spec.shape[a] for a in perm))
  if perm != tuple(range(len(spec.shape))):
    x = jnp.transpose(x, [perm.index(a) for a in range(len(perm))])
  return x


def group_l1(x: jax.Array, group_size: int) -> jax.Array:
  """(D, N) -> (D, N / G) float32: the L1 norm of |x| over each group's G columns.

  Groups are G consecutive columns; this is the score of a (group, input) pair
  (|W| for the drop score, |grad| for the grow score).
  """
  d, n = x.shape
  a = jnp.abs(x.astype(jnp.float32))
  return jnp.sum(a.reshape(d, n // group_size, group_size), axis=-1)


def group_any(mask: jax.Array, group_size: int) -> jax.Array:
  """(D, N) bool -> (D, N / G) bool: whether any neuron of the group uses the input."""
  d, n = mask.shape
  return jnp.any(mask.reshape(d, n // group_size, group_size), axis=-1)


def expand_groups(mask: jax.Array, group_size: int) -> jax.Array:
  """(D, N / G) -> (D, N): every neuron of a group gets its group's column."""
  d, n_groups = mask.shape
  out = jnp.broadcast_to(mask[:, :, None], (d, n_groups, group_size))
  return out.reshape(d, n_groups * group_size)


def drop_fraction(step: jax.Array, alpha: float, stop_step: int) -> jax.Array:
  """Cosine-annealed drop fraction f_t = alpha / 2 * (1 + cos(pi t / T_end))."""
  t = jnp.asarray(step, jnp.float32)
  return alpha / 2.0 * (1.0 + jnp.cos(jnp.pi * t / stop_step))


def _prune_counts(mask: jax.Array, frac: jax.Array):
  n_ones = jnp.sum(mask, dtype=jnp.int32)
  n_prune = jnp.floor(n_ones.astype(jnp.float32) * frac).astype(jnp.int32)
  return n_ones, n_prune, n_ones - n_prune


def unstructured_update(
    mask: jax.Array, w_keys: jax.Array, g_keys: jax.Array, frac: jax.Array
) -> jax.Array:
  """RigL (gradient g_keys) or SET (random g_keys) on one layer.

  Drops the layer-wise n_prune smallest active weights by |W| and grows the
  n_prune largest-scored entries that are inactive after the drop.
  """
  _, n_prune, n_keep = _prune_counts(mask, frac)
  keep = select.top_n(jnp.where(mask, w_keys, 0), n_keep)
  grow = select.top_n(jnp.where(keep, 0, g_keys), n_prune)
  return keep | grow


def ablation_threshold(spec: Geometry, gamma_sal: float) -> int:
  """tau = max(1, floor(gamma_sal * k0)) before the min-neurons guard.

  On a layer's `group_view()`, k0 = floor(floor(B / G) / (N / G)) = floor(B / N),
  so grouped layers use the same threshold, compared with a group's salient
  (group, input) count.
  """
  return max(1, int(math.floor(gamma_sal * spec.k0 + 1e-9)))


def neurons_to_ablate(counts: jax.Array, spec: Geometry, gamma_sal: float) -> jax.Array:
  """Step 3-4 of notes section 4: which neurons to ablate given saliency counts.

  tau = max(1, floor(gamma_sal * k0)); the guard lowers it to the (m+1)-th
  largest count, m = floor(B / D) being the fewest neurons that hold the budget
  at dense fan-in. On a layer's `group_view()` the "neurons" are its N / G
  groups and B is floor(B / G), so m = floor(B / (G * D)) groups and tau is
  unchanged (k0 = floor(B / N)).

  Args:
    counts: int32 (N,), salient weights per neuron (or salient entries per
      group).
    spec: the layer, or its group view.
    gamma_sal: ablation threshold fraction (> 0).

  Returns:
    bool (N,), True where the neuron is ablated.
  """
  n = spec.num_neurons
  tau = jnp.int32(ablation_threshold(spec, gamma_sal))
  m = spec.budget // spec.fan_in  # fewest neurons that hold B at dense fan-in
  if m < n:
    # The (m+1)-th largest count; lowering tau to it keeps >= m+1 neurons alive,
    # which bounds the new fan-in floor(B / n_active) below D.
    c_m = jnp.sort(counts)[n - 1 - m]
    tau = jnp.minimum(tau, c_m)
  return counts < tau


def srigl_update(
    mask: jax.Array,
    w_keys: jax.Array,
    g_keys: jax.Array,
    frac: jax.Array,
    spec: Geometry,
    gamma_sal: float,
) -> jax.Array:
  """One SRigL mask update of one layer (notes section 4, steps 1-7).

  Given a layer's `group_view()` and the (D, N / G) group matrices, this is the
  group-shared update: budget floor(B / G) entries, k' = floor(B / (G *
  active groups)), and ablation of whole groups.

  Args:
    mask: bool (D, N) current mask.
    w_keys: int32 (D, N) magnitude keys of the weights.
    g_keys: int32 (D, N) magnitude keys of the grow score, all >= 1.
    frac: drop fraction f_t.
    spec: the layer (budget, fan-in, whether it may ablate), or its group view.
    gamma_sal: ablation threshold fraction; 0 disables ablation.

  Returns:
    The new bool (D, N) mask, with constant fan-in k' over the active neurons.
  """
  n_neurons = spec.num_neurons
  _, n_prune, n_keep = _prune_counts(mask, frac)
  w_active = jnp.where(mask, w_keys, 0)
  keep = select.top_n(w_active, n_keep)
  if spec.ablation and gamma_sal > 0:
    salient = keep | select.top_n(g_keys, n_prune)
    counts = jnp.sum(salient, axis=0, dtype=jnp.int32)
    ablated = neurons_to_ablate(counts, spec, gamma_sal)
  else:
    ablated = jnp.zeros((n_neurons,), bool)
  alive = ~ablated
  n_active = jnp.maximum(jnp.sum(alive, dtype=jnp.int32), 1)
  k_new = jnp.int32(spec.budget) // n_active

  # Step 6: keep the top n_keep by |W| among the active neurons. This differs
  # from `keep` only when a neuron being ablated still holds weights.
  holds = jnp.any(mask, axis=0)
  keep = lax.cond(
      jnp.any(ablated & holds),
      lambda: select.top_n(jnp.where(alive[None, :], w_active, 0), n_keep),
      lambda: keep,
  )
  per = jnp.sum(keep, axis=0, dtype=jnp.int32)
  # A neuron left with more than k' keeps its k' largest (by magnitude).
  keep = lax.cond(
      jnp.any(per > k_new),
      lambda: select.top_n_per_column(jnp.where(keep, w_keys, 0), jnp.minimum(per, k_new)),
      lambda: keep,
  )
  # Step 7: top up every active neuron to exactly k' by the grow score.
  need = jnp.where(alive, k_new - jnp.sum(keep, axis=0, dtype=jnp.int32), 0)
  grow = select.top_n_per_column(jnp.where(keep, 0, g_keys), need)
  return keep | grow


def random_constant_fan_in_mask(key: jax.Array, spec: Geometry) -> jax.Array:
  """Each neuron draws k0 distinct inputs uniformly at random; (D, N) bool."""
  keys = select.random_keys(key, (spec.fan_in, spec.num_neurons))
  k = jnp.full((spec.num_neurons,), spec.k0, jnp.int32)
  return select.top_n_per_column(keys, k)


def random_unstructured_mask(key: jax.Array, spec: Geometry) -> jax.Array:
  """Exactly B active weights placed uniformly at random; (D, N) bool."""
  keys = select.random_keys(key, (spec.fan_in, spec.num_neurons))
  return select.top_n(keys, jnp.int32(spec.budget))
