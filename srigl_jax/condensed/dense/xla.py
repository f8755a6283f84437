"""Condensed matmul in plain XLA ops: the portable, differentiable kernel.

XLA's CPU gather of single elements (``x[:, indices]``) is slow, so this
gathers whole rows of the transposed input ``x.T`` (one contiguous
``batch``-long row per fan-in entry) and walks the neurons in blocks with a
``lax.scan`` so that each gathered block stays in cache. The grouped kernel
gathers one row per fan-in entry of a group and feeds it to the group's G
neurons with a batched dot.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from srigl_jax.condensed.dense.format import CondensedLayer, GroupedCondensedLayer, apply_rows

__all__ = ["condensed_matmul_xla", "grouped_matmul_xla"]

# Elements of one gathered (block, k, batch) tile: 2**16 floats (256 KiB)
# stays in L2 between the gather and the reduction (measured best of 2**14..2**18).
_TILE_ELEMENTS = 2**16


@functools.partial(jax.jit, static_argnames=("block_neurons",))
def condensed_matmul_xla(
    x: jax.Array, layer: CondensedLayer, *, block_neurons: int | None = None
) -> jax.Array:
  """Condensed matmul with XLA ops only (runs on any backend).

  Args:
    x: ``(..., in_features)`` input (`condensed_matmul` checks it).
    layer: the condensed layer.
    block_neurons: neurons per scan step; default sizes the gathered tile to
      about 256 KiB.

  Returns:
    ``(..., out_features)`` in the promoted dtype of x and the values;
    differentiable with respect to x and the values.
  """
  n, k = layer.values.shape

  def row_sums(x2):
    batch = x2.shape[0]
    bn = block_neurons or max(min(n, 4), min(n, _TILE_ELEMENTS // max(1, k * batch)))
    n_blocks = -(-n // bn)
    pad = n_blocks * bn - n
    # Padded rows point at input 0 with weight 0 and are sliced off below.
    idx = jnp.pad(layer.indices.astype(jnp.int32), ((0, pad), (0, 0)))
    val = jnp.pad(layer.values.astype(x2.dtype), ((0, pad), (0, 0)))
    idx = idx.reshape(n_blocks, bn, k)
    val = val.reshape(n_blocks, bn, k)
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
    return y.reshape(n_blocks * bn, batch)[:n].T

  return apply_rows(x, layer, row_sums)


@functools.partial(jax.jit, static_argnames=("block_groups",))
def grouped_matmul_xla(
    x: jax.Array, layer: GroupedCondensedLayer, *, block_groups: int | None = None
) -> jax.Array:
  """Grouped condensed matmul with XLA ops only (runs on any backend).

  Each group gathers its ``k`` input rows of ``x.T`` once, and one batched
  dot over the groups of a block (``'gkb,gkn->bgn'``) feeds them to the
  group's G neurons.

  Args:
    x: ``(..., in_features)`` input (`condensed_matmul` checks it).
    layer: the grouped condensed layer.
    block_groups: groups per scan step; default sizes the gathered tile to
      about 256 KiB.

  Returns:
    ``(..., out_features)`` in the promoted dtype of x and the values;
    differentiable with respect to x and the values.
  """
  n, k, g = layer.values.shape

  def row_sums(x2):
    batch = x2.shape[0]
    bn = block_groups or max(min(n, 4), min(n, _TILE_ELEMENTS // max(1, k * batch)))
    n_blocks = -(-n // bn)
    pad = n_blocks * bn - n
    # Padded groups point at input 0 with weight 0 and are sliced off below.
    idx = jnp.pad(layer.indices.astype(jnp.int32), ((0, pad), (0, 0)))
    val = jnp.pad(layer.values.astype(x2.dtype), ((0, pad), (0, 0), (0, 0)))
    idx = idx.reshape(n_blocks, bn, k)
    val = val.reshape(n_blocks, bn, k, g)
    xt = x2.T  # (in, batch): a gathered row is contiguous over the batch

    def block(_, iv):
      i, v = iv
      rows = xt.at[i].get(mode="promise_in_bounds")  # (bn, k, batch)
      return None, jnp.einsum("gkb,gkn->bgn", rows, v)

    if n_blocks == 1:
      _, y = block(None, (idx[0], val[0]))
      y = y[None]
    else:
      _, y = jax.lax.scan(block, None, (idx, val))  # (n_blocks, batch, bn, g)
    y = jnp.moveaxis(y, 0, 1).reshape(batch, n_blocks * bn * g)
    return y[:, : n * g]

  return apply_rows(x, layer, row_sums)
