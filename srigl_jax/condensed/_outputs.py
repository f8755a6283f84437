"""What the Dense and conv condensed formats share: rows of the active neurons.

Both store one row of ``k`` values per active neuron, its output position in
``neuron_ids`` and the full bias. Every kernel but the native ones (which do
this in C++) computes the weighted sums of the active neurons only,
``(..., n_active)``; `finish_outputs` adds the bias and puts each sum at its
neuron's position, where ablated neurons output their bias alone.

`check_rows` is the load-time check of those arrays, shared by both formats'
``validate()``: the kernels trust their indices (the XLA ones clamp an index
out of range into a wrong answer; the native ones refuse it on every call).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["CondensedRows", "check_grouped_rows", "check_rows", "finish_outputs"]


def _first_outside(a: np.ndarray, lo: int, hi: int) -> tuple[tuple[int, ...], int] | None:
  """(position, value) of the first entry of ``a`` (row-major) outside [lo, hi), or None."""
  bad = (a < lo) | (a >= hi)
  if not bad.any():
    return None
  pos = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), a.shape))
  return pos, int(a[pos])


def check_rows(
    name: str,
    *,
    values,
    indices,
    neuron_ids,
    bias,
    fan_in: int,
    n_outputs: int,
    index_name: str = "indices",
) -> None:
  """Checks the arrays of a condensed layer before any kernel reads through them.

  Args:
    name: the layer, as messages name it (e.g. "layer 'dense_0'").
    values: ``(n_active, k)`` weights.
    indices: ``(n_active, k)`` integer positions in ``[0, fan_in)``.
    neuron_ids: ``(n_active,)`` integer output positions, strictly
      increasing within ``[0, n_outputs)``.
    bias: ``(n_outputs,)`` or None.
    fan_in: the size of the input the indices address.
    n_outputs: the output width, ablated neurons included.
    index_name: what the messages call ``indices`` ('taps' for a conv).

  Raises:
    ValueError: naming the layer, the array, and for a value out of range
      its position, the value and the valid range.
  """
  values = np.asarray(values)
  indices = np.asarray(indices)
  neuron_ids = np.asarray(neuron_ids)
  if values.ndim != 2:
    raise ValueError(f"{name}: values must be (n_active, k), got shape {values.shape}.")
  if indices.shape != values.shape:
    raise ValueError(
        f"{name}: {index_name} has shape {indices.shape} but values has shape {values.shape}; "
        "they must be equal."
    )
  if not np.issubdtype(indices.dtype, np.integer):
    raise ValueError(f"{name}: {index_name} must be integers, got {indices.dtype}.")
  if neuron_ids.shape != values.shape[:1] or not np.issubdtype(neuron_ids.dtype, np.integer):
    raise ValueError(
        f"{name}: neuron_ids must be {values.shape[:1]} integers (one per row of values), got "
        f"{neuron_ids.dtype} of shape {neuron_ids.shape}."
    )
  _check_bias_and_range(name, bias, n_outputs, indices, index_name, fan_in)
  _check_ids(name, neuron_ids, "neuron_ids", n_outputs)


def _check_bias_and_range(
    name: str, bias, n_outputs: int, indices: np.ndarray, index_name: str, fan_in: int
) -> None:
  """Refuses a bias that is not (n_outputs,) and the first index outside [0, fan_in)."""
  if bias is not None and np.shape(bias) != (n_outputs,):
    raise ValueError(
        f"{name}: bias has shape {np.shape(bias)} but the layer has {n_outputs} outputs."
    )
  bad = _first_outside(indices, 0, fan_in)
  if bad is not None:
    (r, c), v = bad
    raise ValueError(f"{name}: {index_name}[{r}, {c}] = {v} is outside [0, {fan_in}).")


def _check_ids(name: str, ids: np.ndarray, id_name: str, limit: int) -> None:
  """Refuses ids outside [0, limit) or not strictly increasing, naming the entry."""
  bad = _first_outside(ids, 0, limit)
  if bad is not None:
    (j,), v = bad
    raise ValueError(f"{name}: {id_name}[{j}] = {v} is outside [0, {limit}).")
  steps = np.diff(ids.astype(np.int64))
  if (steps <= 0).any():
    j = int(np.argmax(steps <= 0)) + 1
    raise ValueError(
        f"{name}: {id_name} must be strictly increasing (sorted, distinct): {id_name}[{j}] = "
        f"{int(ids[j])} follows {id_name}[{j - 1}] = {int(ids[j - 1])}."
    )


def check_grouped_rows(
    name: str,
    *,
    values,
    indices,
    group_ids,
    bias,
    fan_in: int,
    n_outputs: int,
    group_size: int,
    index_name: str = "indices",
) -> None:
  """Checks the arrays of a grouped condensed layer before any kernel reads through them.

  Args:
    name: the layer, as messages name it (e.g. "layer 'dense_0'").
    values: ``(n_groups, k, group_size)`` weights.
    indices: ``(n_groups, k)`` integer positions in ``[0, fan_in)``, shared
      by each group's neurons.
    group_ids: ``(n_groups,)`` integer group positions, strictly increasing
      within ``[0, n_outputs / group_size)``.
    bias: ``(n_outputs,)`` or None.
    fan_in: the size of the input the indices address.
    n_outputs: the output width, ablated groups included.
    group_size: G, the layer's neurons per group.
    index_name: what the messages call ``indices`` ('taps' for a conv).

  Raises:
    ValueError: naming the layer, the array, and for a value out of range
      its position, the value and the valid range.
  """
  values = np.asarray(values)
  indices = np.asarray(indices)
  group_ids = np.asarray(group_ids)
  if group_size < 1 or n_outputs % group_size:
    raise ValueError(
        f"{name}: group_size = {group_size} must be >= 1 and divide the {n_outputs} outputs."
    )
  if values.ndim != 3 or values.shape[2] != group_size:
    raise ValueError(
        f"{name}: values must be (n_groups, k, {group_size}) for group_size {group_size}, got "
        f"shape {values.shape}."
    )
  if indices.shape != values.shape[:2]:
    raise ValueError(
        f"{name}: {index_name} has shape {indices.shape} but values has shape {values.shape}; "
        f"it must be {values.shape[:2]} (n_groups, k)."
    )
  if not np.issubdtype(indices.dtype, np.integer):
    raise ValueError(f"{name}: {index_name} must be integers, got {indices.dtype}.")
  if group_ids.shape != values.shape[:1] or not np.issubdtype(group_ids.dtype, np.integer):
    raise ValueError(
        f"{name}: group_ids must be {values.shape[:1]} integers (one per group of values), got "
        f"{group_ids.dtype} of shape {group_ids.shape}."
    )
  _check_bias_and_range(name, bias, n_outputs, indices, index_name, fan_in)
  _check_ids(name, group_ids, "group_ids", n_outputs // group_size)


def finish_outputs(
    sums: jax.Array,
    neuron_ids: jax.Array,
    bias: jax.Array,
    *,
    compact: bool,
    bias_map: jax.Array | None = None,
) -> jax.Array:
  """Adds the bias to the active neurons' sums and places them into the full width.

  Each output column gathers its neuron's sum, or a zero column for an
  ablated neuron, then the bias is added. A scatter into the bias did the
  same 3-11x slower on XLA:CPU (a (8, 28, 28, 400) conv output placed into
  512 channels: 49-53 ms against 4.5-7 ms; (256, 700) into 768: 0.72-0.77
  against 0.22 ms; equal at batch 1).

  Args:
    sums: ``(..., n_active)`` weighted sums, no bias.
    neuron_ids: ``(n_active,)`` sorted, unique output position of each sum.
    bias: ``(n_out,)`` full bias in the dtype of ``sums``.
    compact: every output is active (``neuron_ids == arange(n_out)``), so
      nothing moves.
    bias_map: optional bias added to the whole output (a conv's per-position
      bias ``(oh, ow, n_out)``).

  Returns:
    ``(..., n_out)``.
  """
  if compact:
    y = sums + bias
  else:
    n = sums.shape[-1]
    slot = jnp.full(bias.shape, n, jnp.int32).at[neuron_ids].set(jnp.arange(n, dtype=jnp.int32))
    padded = jnp.concatenate([sums, jnp.zeros((*sums.shape[:-1], 1), sums.dtype)], axis=-1)
    y = jnp.take(padded, slot, axis=-1, mode="clip") + bias
  if bias_map is not None:
    y = y + bias_map.astype(y.dtype)
  return y


class CondensedRows:
  """Methods of a condensed format with ``values``, ``neuron_ids`` and ``bias`` fields.

  A subclass defines `n_outputs` (its output width, ablated neurons included).
  """

  # A per-position bias added after the scatter; CondensedConv has it as a field.
  bias_map = None

  @property
  def n_outputs(self) -> int:
    raise NotImplementedError

  @property
  def n_active(self) -> int:
    return int(self.values.shape[0])

  @property
  def fan_in(self) -> int:
    return int(self.values.shape[1])

  @property
  def is_compact(self) -> bool:
    """True when every output is active (no scatter is needed)."""
    # neuron_ids are sorted and unique, so equal counts mean ids == arange.
    return self.n_active == self.n_outputs

  def bias_or_zeros(self, dtype=jnp.float32):
    """The full ``(n_outputs,)`` bias, zeros when the layer has none."""
    if self.bias is None:
      return jnp.zeros((self.n_outputs,), dtype)
    return jnp.asarray(self.bias, dtype)

  def finish(self, sums: jax.Array) -> jax.Array:
    """``(..., n_active)`` sums -> ``(..., n_outputs)`` with the bias (see `finish_outputs`)."""
    bias = self.bias_or_zeros(sums.dtype)
    return finish_outputs(
        sums, self.neuron_ids, bias, compact=self.is_compact, bias_map=self.bias_map
    )
