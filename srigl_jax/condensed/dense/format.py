"""Condensed storage of constant fan-in Dense layers, and `condense_dense()`.

A Dense kernel trained with SRigL has, for every *active* output neuron, the
same number ``k`` of non-zero inputs; *ablated* neurons have none. The
condensed form stores only what a forward pass needs::

    values   (n_active, k)   the non-zero weights of each active neuron
    indices  (n_active, k)   their input positions (int16 when in <= 32768)
    neuron_ids (n_active,)   which output column each row feeds
    bias     (out,) or None  the full bias; ablated columns output only this

    y[b, neuron_ids[j]] = sum_k x[b, indices[j, k]] * values[j, k] + bias[...]

With group-shared fan-in (`srigl(..., group_size=G)`), G consecutive neurons
share one set of inputs. `GroupedCondensedLayer` stores that set once per
group and the G neurons' own weights side by side::

    values    (n_groups, k, G)  weights; values[g, t] are the G neurons' weights
                                at input indices[g, t], contiguous for the kernels
    indices   (n_groups, k)     the group's input positions (int16 when in <= 32768)
    group_ids (n_groups,)       sorted ids of the active groups; group g feeds
                                outputs g * G .. g * G + G - 1
    bias      (out,) or None

    y[b, group_ids[g] * G + n] = sum_k x[b, indices[g, k]] * values[g, k, n] + bias[...]

Structure always comes from the mask, never from weight values, so a trained
weight that happens to be exactly zero is still stored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from srigl_jax.condensed._groups import condense_groups, validate_group_size
from srigl_jax.condensed._outputs import CondensedRows, check_grouped_rows, check_rows

__all__ = [
    "CondensedLayer",
    "GroupedCondensedLayer",
    "apply_rows",
    "condense_dense",
    "condense_grouped_dense",
    "fan_in_counts",
    "index_dtype_for",
]

# The largest input dimension whose indices fit in int16.
_INT16_LIMIT = 2**15


def index_dtype_for(in_features: int) -> np.dtype:
  """The narrowest index dtype that can address `in_features` inputs.

  Args:
    in_features: the layer's input dimension.

  Returns:
    ``np.int16`` when every index fits (``in_features <= 32768``), else
    ``np.int32``.
  """
  return np.dtype(np.int16 if in_features <= _INT16_LIMIT else np.int32)


def fan_in_counts(mask) -> np.ndarray:
  """Active weights of each neuron (the last axis) of a mask; 0 = ablated."""
  mask = np.asarray(mask)
  return mask.reshape(-1, mask.shape[-1]).sum(axis=0)


@flax.struct.dataclass
class CondensedLayer(CondensedRows):
  """A constant fan-in sparse Dense layer in condensed form (a pytree).

  Attributes:
    values: ``(n_active, k)`` weights of the active neurons.
    indices: ``(n_active, k)`` int16/int32 input index of each weight.
    neuron_ids: ``(n_active,)`` int32, sorted output column of each row.
    bias: ``(out_features,)`` or None.
    in_features: input dimension (static).
    out_features: output dimension, ablated neurons included (static).
  """

  values: Any
  indices: Any
  neuron_ids: Any
  bias: Any
  in_features: int = flax.struct.field(pytree_node=False)
  out_features: int = flax.struct.field(pytree_node=False)

  @property
  def n_outputs(self) -> int:
    return self.out_features

  def to_dense(self) -> jnp.ndarray:
    """The equivalent masked dense kernel ``(in_features, out_features)``."""
    kernel = jnp.zeros((self.in_features, self.out_features), self.values.dtype)
    cols = jnp.broadcast_to(self.neuron_ids[:, None], self.indices.shape)
    # .add, not .set: padded entries (value 0 at index 0) must not overwrite.
    return kernel.at[self.indices.astype(jnp.int32), cols].add(self.values)

  def validate(self, name: str = "condensed layer") -> CondensedLayer:
    """Checks the arrays on the host before a kernel reads through them; returns the layer.

    `condense_dense` builds valid layers; call this on layers read from
    elsewhere (`convert_model` and `srigl_jax.serving`'s loader do).

    Args:
      name: what the error message names (e.g. "layer 'dense_0'").

    Returns:
      This layer.

    Raises:
      ValueError: shapes disagree, an index lies outside
        ``[0, in_features)``, or ``neuron_ids`` is not strictly increasing
        within ``[0, out_features)``; the message names the array, the
        position, the value and the valid range.
    """
    check_rows(
        name,
        values=self.values,
        indices=self.indices,
        neuron_ids=self.neuron_ids,
        bias=self.bias,
        fan_in=self.in_features,
        n_outputs=self.out_features,
    )
    return self

  def for_input(self, x_shape: Sequence[int], name: str = "condensed_matmul") -> CondensedLayer:
    """Checks that this layer takes inputs of shape ``x_shape``; returns it.

    Args:
      x_shape: ``(..., in_features)``.
      name: what the error message names.

    Returns:
      This layer (the Dense format needs nothing per input shape).

    Raises:
      ValueError: the last axis is not ``in_features`` long.
    """
    _check_features(x_shape, self.in_features, name)
    return self


def _check_features(x_shape: Sequence[int], in_features: int, name: str) -> None:
  if len(x_shape) < 1 or x_shape[-1] != in_features:
    raise ValueError(
        f"{name}: input of shape {tuple(x_shape)} has "
        f"{x_shape[-1] if x_shape else 0} features but the layer expects "
        f"{in_features}."
    )


@flax.struct.dataclass
class GroupedCondensedLayer(CondensedRows):
  """A group-shared constant fan-in Dense layer in condensed form (a pytree).

  Attributes:
    values: ``(n_groups, k, G)`` weights of the active groups' neurons.
    indices: ``(n_groups, k)`` int16/int32 input index shared by each group.
    group_ids: ``(n_groups,)`` int32, sorted ids of the active groups.
    bias: ``(out_features,)`` or None.
    in_features: input dimension (static).
    out_features: output dimension, ablated groups included (static); a
      multiple of ``group_size``.
    group_size: G, neurons per group (static).
  """

  values: Any
  indices: Any
  group_ids: Any
  bias: Any
  in_features: int = flax.struct.field(pytree_node=False)
  out_features: int = flax.struct.field(pytree_node=False)
  group_size: int = flax.struct.field(pytree_node=False)

  @property
  def n_outputs(self) -> int:
    return self.out_features

  @property
  def n_groups(self) -> int:
    """Active groups."""
    return int(self.values.shape[0])

  @property
  def n_active(self) -> int:
    """Active neurons: G per active group."""
    return self.n_groups * self.group_size

  @property
  def neuron_ids(self) -> jax.Array:
    """``(n_groups * G,)`` sorted output column of every active neuron."""
    g = self.group_size
    ids = self.group_ids.astype(jnp.int32)[:, None] * g + jnp.arange(g, dtype=jnp.int32)
    return ids.reshape(-1)

  def to_dense(self) -> jnp.ndarray:
    """The equivalent masked dense kernel ``(in_features, out_features)``."""
    n, k, g = self.values.shape
    kernel = jnp.zeros((self.in_features, self.out_features), self.values.dtype)
    rows = jnp.broadcast_to(self.indices.astype(jnp.int32)[:, :, None], (n, k, g))
    cols = jnp.broadcast_to(self.neuron_ids.reshape(n, 1, g), (n, k, g))
    # .add, not .set: padded entries (value 0 at index 0) must not overwrite.
    return kernel.at[rows, cols].add(self.values)

  def validate(self, name: str = "grouped condensed layer") -> GroupedCondensedLayer:
    """Checks the arrays on the host before a kernel reads through them; returns the layer.

    `condense_grouped_dense` builds valid layers; call this on layers read
    from elsewhere (`convert_model` and `srigl_jax.serving`'s loader do).

    Args:
      name: what the error message names (e.g. "layer 'dense_0'").

    Returns:
      This layer.

    Raises:
      ValueError: shapes disagree with each other or with ``group_size``,
        an index lies outside ``[0, in_features)``, or ``group_ids`` is not
        strictly increasing within ``[0, out_features / group_size)``; the
        message names the array, the position, the value and the valid
        range.
    """
    check_grouped_rows(
        name,
        values=self.values,
        indices=self.indices,
        group_ids=self.group_ids,
        bias=self.bias,
        fan_in=self.in_features,
        n_outputs=self.out_features,
        group_size=self.group_size,
    )
    return self

  def for_input(
      self, x_shape: Sequence[int], name: str = "condensed_matmul"
  ) -> GroupedCondensedLayer:
    """Checks that this layer takes inputs of shape ``x_shape``; returns it.

    Args:
      x_shape: ``(..., in_features)``.
      name: what the error message names.

    Returns:
      This layer.

    Raises:
      ValueError: the last axis is not ``in_features`` long.
    """
    _check_features(x_shape, self.in_features, name)
    return self


def apply_rows(x: jax.Array, layer: CondensedLayer | GroupedCondensedLayer, row_sums) -> jax.Array:
  """Runs a kernel that computes the active neurons' sums of flattened inputs.

  Flattens ``x`` to ``(batch, in_features)`` in the promoted dtype of x and
  the values, calls ``row_sums(x2)`` for the ``(batch, n_active)`` sums
  (skipped when there is nothing to sum), and returns the finished
  ``(..., out_features)`` output.
  """
  lead = x.shape[:-1]
  dtype = jnp.result_type(x.dtype, layer.values.dtype)
  x2 = x.reshape(-1, x.shape[-1]).astype(dtype)
  if 0 in (x2.shape[0], *layer.values.shape):
    sums = jnp.zeros((x2.shape[0], layer.n_active), dtype)
  else:
    sums = row_sums(x2)
  return layer.finish(sums).reshape(*lead, layer.out_features)


def condense_dense(
    kernel,
    mask,
    bias=None,
    *,
    name: str = "<layer>",
    allow_ragged: bool = False,
    index_dtype=None,
) -> CondensedLayer:
  """Condenses one Dense kernel from its constant fan-in mask (on the host).

  Args:
    kernel: ``(in, out)`` weights (Flax Dense layout).
    mask: ``(in, out)`` bool; True where a weight is active.
    bias: optional ``(out,)`` bias.
    name: layer name used in error messages.
    allow_ragged: pad neurons with fewer non-zeros up to the largest fan-in
      (index 0, value 0) instead of raising. Only the model converter uses
      this, after it has removed the inputs of ablated neurons.
    index_dtype: override the index dtype (default: `index_dtype_for`).

  Returns:
    The `CondensedLayer`.

  Raises:
    ValueError: the kernel is not 2-D, shapes or dtypes disagree, or active
      neurons do not all have the same fan-in.
  """
  kernel = np.asarray(kernel)
  mask = np.asarray(mask)
  _check_dense_arrays(kernel, mask, name, "condense")
  in_features, out_features = kernel.shape
  counts = fan_in_counts(mask)
  active = counts > 0
  neuron_ids = np.nonzero(active)[0].astype(np.int32)
  active_counts = counts[active]
  k = int(active_counts.max()) if active_counts.size else 0
  if active_counts.size and int(active_counts.min()) != k and not allow_ragged:
    raise ValueError(
        f"condense: layer '{name}' is not constant fan-in: its active neurons "
        f"have between {int(active_counts.min())} and {k} non-zero inputs "
        "(they must all have the same count; ablated neurons have 0). "
        "Condense only masks produced by SRigL's constant fan-in update "
        "(srigl_jax.sparsity), not RigL/SET masks, or keep such layers "
        "structured (on_unsupported='structured')."
    )
  index_dtype = np.dtype(index_dtype or index_dtype_for(in_features))
  cols = mask.T[active]  # (n_active, in), one row per active neuron
  # Stable argsort of ~mask puts each row's active inputs first, in
  # increasing input order; rows shorter than k are padded with inactive
  # positions that then get value 0 and index 0.
  order = np.argsort(~cols, axis=1, kind="stable")[:, :k]
  valid = np.take_along_axis(cols, order, axis=1)
  indices = np.where(valid, order, 0).astype(index_dtype)
  values = np.where(valid, kernel.T[active][np.arange(len(order))[:, None], order], 0)
  values = values.astype(kernel.dtype)
  return CondensedLayer(
      values=jnp.asarray(values),
      indices=jnp.asarray(indices),
      neuron_ids=jnp.asarray(neuron_ids),
      bias=None if bias is None else jnp.asarray(bias),
      in_features=int(in_features),
      out_features=int(out_features),
  )


def condense_grouped_dense(
    kernel,
    mask,
    bias=None,
    *,
    group_size: int,
    name: str = "<layer>",
    allow_ragged: bool = False,
    index_dtype=None,
) -> GroupedCondensedLayer:
  """Condenses one Dense kernel from its group-shared constant fan-in mask (on the host).

  Args:
    kernel: ``(in, out)`` weights (Flax Dense layout).
    mask: ``(in, out)`` bool; the G columns of every group must be identical.
    bias: optional ``(out,)`` bias.
    group_size: G, consecutive neurons sharing one set of inputs; must divide
      ``out``.
    name: layer name used in error messages.
    allow_ragged: pad groups with fewer inputs up to the largest fan-in
      (index 0, value 0) instead of raising (the model converter, after it
      has removed folded inputs).
    index_dtype: override the index dtype (default: `index_dtype_for`).

  Returns:
    The `GroupedCondensedLayer`.

  Raises:
    ValueError: the kernel is not 2-D, shapes or dtypes disagree, G does not
      divide the width, a group's mask columns differ, or active groups do not
      all have the same fan-in.
  """
  what = "condense_grouped_dense"
  group_size = validate_group_size(group_size, what)
  kernel = np.asarray(kernel)
  mask = np.asarray(mask)
  _check_dense_arrays(kernel, mask, name, what)
  in_features, out_features = kernel.shape
  index_dtype = np.dtype(index_dtype or index_dtype_for(in_features))
  values, indices, group_ids = condense_groups(
      kernel,
      mask,
      group_size,
      name=name,
      what=what,
      allow_ragged=allow_ragged,
      index_dtype=index_dtype,
  )
  return GroupedCondensedLayer(
      values=jnp.asarray(values),
      indices=jnp.asarray(indices),
      group_ids=jnp.asarray(group_ids),
      bias=None if bias is None else jnp.asarray(bias),
      in_features=int(in_features),
      out_features=int(out_features),
      group_size=group_size,
  )


def _check_dense_arrays(kernel: np.ndarray, mask: np.ndarray, name: str, what: str) -> None:
  """Raises unless kernel is 2-D and mask is a bool array of its shape."""
  if kernel.ndim != 2:
    raise ValueError(
        f"{what}: layer '{name}' has a kernel of rank {kernel.ndim} (shape "
        f"{kernel.shape}); condensing needs a Dense kernel of shape (in, out). "
        "Reshape it to (fan_in, neurons) first, or keep its ablated neurons "
        "removed but the kernel dense (condense(..., on_unsupported='structured'))."
    )
  if mask.shape != kernel.shape:
    raise ValueError(
        f"{what}: layer '{name}' has mask shape {mask.shape} but kernel "
        f"shape {kernel.shape}; pass the mask that belongs to this kernel."
    )
  if mask.dtype != np.bool_:
    raise ValueError(
        f"{what}: layer '{name}' mask has dtype {mask.dtype}; masks must be "
        "bool arrays (True = active weight)."
    )
