"""The structured fallback: a sparse layer with its ablated neurons removed.

For layers that have no condensed form (a mask that is not constant fan-in,
e.g. RigL or SET; a kernel the entry point cannot condense) the neurons
without any active weight are still dropped, but the kept kernel stays dense
(masked weights are zero), so a plain matmul or convolution computes the
active outputs and ``neuron_ids`` places them into the full output.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax.numpy as jnp
import numpy as np

__all__ = ["StructuredLayer", "structured_from_mask"]


@flax.struct.dataclass
class StructuredLayer:
  """A sparse layer with its ablated output neurons removed (a pytree).

  Attributes:
    kernel: ``(..., n_active)`` masked kernel of the active neurons.
    neuron_ids: ``(n_active,)`` int32 output position of each kept neuron.
    bias: ``(out_features,)`` or None.
    out_features: output dimension, ablated neurons included (static).
  """

  kernel: Any
  neuron_ids: Any
  bias: Any
  out_features: int = flax.struct.field(pytree_node=False)


def structured_from_mask(kernel, mask, bias=None, *, name: str = "<layer>") -> StructuredLayer:
  """Removes the ablated output neurons (last axis) of a sparse kernel.

  Works for any kernel with its neurons on the last axis (Dense ``(in, out)``,
  Conv ``(kh, kw, cin, cout)``, attention ``(..., out)``) and does not need
  constant fan-in. A neuron is kept when any of its weights is active.

  Args:
    kernel: the weights; neurons on the last axis.
    mask: bool array of the same shape.
    bias: optional ``(out,)`` bias.
    name: layer name used in error messages.

  Returns:
    The `StructuredLayer` holding the masked kernel of the active neurons.

  Raises:
    ValueError: on a shape or dtype mismatch, or a kernel of rank < 2.
  """
  kernel = np.asarray(kernel)
  mask = np.asarray(mask)
  if mask.shape != kernel.shape or mask.dtype != np.bool_:
    raise ValueError(
        f"condense: layer '{name}' needs a bool mask of the kernel's shape "
        f"{kernel.shape}, got {mask.dtype} {mask.shape}."
    )
  if kernel.ndim < 2:
    raise ValueError(
        f"condense: layer '{name}' kernel has rank {kernel.ndim}; sparse "
        "kernels have their neurons on the last axis and at least 2 axes."
    )
  ids = np.nonzero(mask.reshape(-1, mask.shape[-1]).any(axis=0))[0].astype(np.int32)
  kept = np.where(mask, kernel, 0)[..., ids]
  return StructuredLayer(
      kernel=jnp.asarray(kept),
      neuron_ids=jnp.asarray(ids),
      bias=None if bias is None else jnp.asarray(bias),
      out_features=int(kernel.shape[-1]),
  )
