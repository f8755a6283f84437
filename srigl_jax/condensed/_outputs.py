"""What the Dense and conv condensed formats share: rows of the active neurons.

Both store one row of ``k`` values per active neuron, its output position in
``neuron_ids`` and the full bias. Every kernel but the native ones (which do
this in C++) computes the weighted sums of the active neurons only,
``(..., n_active)``; `finish_outputs` adds the bias and puts each sum at its
neuron's position, where ablated neurons output their bias alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["CondensedRows", "finish_outputs"]


def finish_outputs(
    sums: jax.Array,
    neuron_ids: jax.Array,
    bias: jax.Array,
    *,
    compact: bool,
    bias_map: jax.Array | None = None,
) -> jax.Array:
  """Adds the bias to the active neurons' sums and scatters them into the full width.

  Args:
    sums: ``(..., n_active)`` weighted sums, no bias.
    neuron_ids: ``(n_active,)`` sorted, unique output position of each sum.
    bias: ``(n_out,)`` full bias in the dtype of ``sums``.
    compact: every output is active (``neuron_ids == arange(n_out)``), so no
      scatter is needed.
    bias_map: optional bias added to the whole output (a conv's per-position
      bias ``(oh, ow, n_out)``).

  Returns:
    ``(..., n_out)``.
  """
  if compact:
    y = sums + bias
  else:
    full = jnp.broadcast_to(bias, (*sums.shape[:-1], bias.shape[0]))
    y = full.at[..., neuron_ids].set(
        sums + bias[neuron_ids], unique_indices=True, indices_are_sorted=True
    )
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
