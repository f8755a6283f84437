"""The plain-jnp reference of the condensed matmul, which the tests compare against."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from srigl_jax.condensed.dense.format import CondensedLayer, GroupedCondensedLayer

__all__ = ["condensed_matmul_reference"]


def condensed_matmul_reference(
    x: jax.Array,
    layer: CondensedLayer | GroupedCondensedLayer,
    *,
    precision=jax.lax.Precision.HIGHEST,
) -> jax.Array:
  """Densifies the layer and computes ``x @ W + b``.

  Args:
    x: ``(..., in_features)`` input.
    layer: the condensed layer, grouped or not.
    precision: of the matmul (full fp32 by default).

  Returns:
    ``(..., out_features)`` in the promoted dtype of x and the values;
    differentiable.
  """
  dtype = jnp.result_type(x.dtype, layer.values.dtype)
  w = layer.to_dense().astype(dtype)
  y = jnp.matmul(x.astype(dtype), w, precision=precision)
  return y + layer.bias_or_zeros(dtype)
