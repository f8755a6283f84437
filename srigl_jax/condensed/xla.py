"""Condensed matmul in plain XLA ops: the portable fallback, and the reference.

XLA's CPU gather of single elements (``x[:, indices]``) is slow, so the fast
path gathers whole rows of the transposed input ``x.T`` (one contiguous
``batch``-long row per fan-in entry) and walks the neurons in blocks with a
``lax.scan`` so that each gathered block stays in cache.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from srigl_jax.condensed.layer import CondensedLayer

__all__ = ["condensed_matmul_reference", "condensed_matmul_xla", "scatter_to_outputs"]

# Elements of one gathered (block, k, batch) tile: 2**16 floats (256 KiB)
# stays in L2 between the gather and the reduction (measured best of 2**14..2**18).
_TILE_ELEMENTS = 2**16


def condensed_matmul_reference(x: jax.Array, layer: CondensedLayer) -> jax.Array:
  """Plain-jnp reference: densify the layer and do ``x @ W + b``.

  Args:
    x: ``(..., in_features)`` input.
    layer: the condensed layer.

  Returns:
    ``(..., out_features)`` output in the promoted dtype of x and the values.
  """
  dtype = jnp.result_type(x.dtype, layer.values.dtype)
  w = layer.to_dense().astype(dtype)
  y = jnp.matmul(x.astype(dtype), w, precision=jax.lax.Precision.HIGHEST)
  return y + layer.bias_or_zeros(dtype)


def scatter_to_outputs(y_active: jax.Array, layer: CondensedLayer) -> jax.Array:
  """Places ``(batch, n_active)`` outputs (bias added) into the full width.

  Ablated columns receive their bias.

  Args:
    y_active: outputs of the active neurons, bias already added.
    layer: the layer the outputs belong to.

  Returns:
    ``(batch, out_features)``.
  """
  if layer.is_compact:
    return y_active
  full = jnp.broadcast_to(
      layer.bias_or_zeros(y_active.dtype), (y_active.shape[0], layer.out_features)
  )
  return full.at[:, layer.neuron_ids].set(y_active, unique_indices=True, indices_are_sorted=True)


@functools.partial(jax.jit, static_argnames=("block_neurons",))
def condensed_matmul_xla(
    x: jax.Array, layer: CondensedLayer, *, block_neurons: int | None = None
) -> jax.Array:
  """Condensed matmul with XLA ops only (runs on any backend).

  Args:
    x: ``(..., in_features)`` input.
    layer: the condensed layer.
    block_neurons: neurons per scan step; default sizes the gathered tile to
      about 256 KiB.

  Returns:
    ``(..., out_features)``; differentiable with respect to x and the values.
  """
  lead = x.shape[:-1]
  dtype = jnp.result_type(x.dtype, layer.values.dtype)
  x2 = x.reshape(-1, x.shape[-1]).astype(dtype)
  batch = x2.shape[0]
  n, k = layer.values.shape
  bias = layer.bias_or_zeros(dtype)
  if n == 0 or batch == 0:
    return jnp.broadcast_to(bias, (*lead, layer.out_features))
  if block_neurons is None:
    block_neurons = max(min(n, 4), min(n, _TILE_ELEMENTS // max(1, k * batch)))
  n_blocks = -(-n // block_neurons)
  pad = n_blocks * block_neurons - n
  # Padded rows point at input 0 with weight 0 and are sliced off below.
  idx = jnp.pad(layer.indices.astype(jnp.int32), ((0, pad), (0, 0)))
  val = jnp.pad(layer.values.astype(dtype), ((0, pad), (0, 0)))
  idx = idx.reshape(n_blocks, block_neurons, k)
  val = val.reshape(n_blocks, block_neurons, k)
  xt = x2.T  # (in, batch): a gathered row is contiguous over the batch

  def block(_, iv):
    i, v = iv
    rows = xt.at[i].get(mode="promise_in_bounds")  # (bn, k, batch)
    return None, jnp.einsum("nkb,nk->nb", rows, v)

  if n_blocks == 1:
    _, y = block(None, (idx[0], val[0]))
    y = y[None]
  else:
    _, y = jax.lax.scan(block, None, (idx, val))
  y = y.reshape(n_blocks * block_neurons, batch)[:n].T
  y = y + bias[layer.neuron_ids]
  return scatter_to_outputs(y, layer).reshape(*lead, layer.out_features)
