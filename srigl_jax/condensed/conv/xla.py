"""Condensed convolution in plain XLA ops: the portable, differentiable kernel.

It works in the plane layout of `srigl_jax.condensed.conv.format`: every tap
of an output channel is one contiguous run of the flattened planes, so a
block of channels gathers ``(block, k, chunk)`` runs with row-sized slices
(no element gather) and reduces them against the weights. Neuron blocks and
grid chunks are walked with `lax.scan` so that a gathered tile stays near
1 MiB whatever the batch and image size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from srigl_jax.condensed.conv.format import (
    CondensedConv,
    GroupedCondensedConv,
    apply_planes,
    tap_sources,
    to_planes,
)

__all__ = ["condensed_conv_xla", "grouped_conv_xla"]

# Elements of one gathered (block, k, chunk) tile.
_TILE_ELEMENTS = 2**18


@functools.partial(jax.jit, static_argnames=("tile_elements",))
def condensed_conv_xla(
    x: jax.Array, layer: CondensedConv, *, tile_elements: int = _TILE_ELEMENTS
) -> jax.Array:
  """Condensed convolution with XLA ops only (runs on any backend).

  Args:
    x: ``(b, h, w, cin)`` NHWC input, of the layer's input size when it has
      one (`condensed_conv` checks it).
    layer: the condensed conv.
    tile_elements: size of one gathered tile (elements).

  Returns:
    ``(b, oh, ow, cout)`` in the promoted dtype of x and the values;
    differentiable with respect to x and the values.
  """
  n, k = layer.values.shape

  def grid_sums(x, geo):
    batch = x.shape[0]
    grid = geo.grid(batch)
    chunk = min(grid, max(64, tile_elements // k))
    n_chunks = -(-grid // chunk)
    block = max(1, min(n, tile_elements // (k * chunk)))
    n_blocks = -(-n // block)
    planes = to_planes(x, geo).reshape(-1)
    # Every run src + [q0, q0 + chunk) must stay inside the buffer.
    planes = jnp.pad(planes, (0, n_chunks * chunk - grid))
    pad = n_blocks * block - n
    # Padded rows read run 0 with weight 0 and are sliced off below.
    src = jnp.pad(tap_sources(layer.taps, geo, batch), ((0, pad), (0, 0)))
    val = jnp.pad(layer.values.astype(x.dtype), ((0, pad), (0, 0)))
    src = src.reshape(n_blocks, block, k)
    val = val.reshape(n_blocks, block, k)

    def runs(starts):
      take = lambda s: jax.lax.dynamic_slice(planes, (s,), (chunk,))
      return jax.vmap(jax.vmap(take))(starts)  # (block, k, chunk)

    def one_block(_, sv):
      s, v = sv

      def one_chunk(_, q0):
        return None, jnp.einsum("nkq,nk->nq", runs(s + q0), v)

      _, y = jax.lax.scan(one_chunk, None, jnp.arange(n_chunks, dtype=jnp.int32) * chunk)
      return None, jnp.moveaxis(y, 0, 1).reshape(block, n_chunks * chunk)

    _, y = jax.lax.scan(one_block, None, (src, val))
    return y.reshape(n_blocks * block, n_chunks * chunk)[:n, :grid]

  return apply_planes(x, layer, grid_sums)


@functools.partial(jax.jit, static_argnames=("tile_elements",))
def grouped_conv_xla(
    x: jax.Array, layer: GroupedCondensedConv, *, tile_elements: int = _TILE_ELEMENTS
) -> jax.Array:
  """Grouped condensed convolution with XLA ops only (runs on any backend).

  In the plane layout a group's taps are ``k`` runs of the planes; a block
  of groups gathers its ``(block, k, chunk)`` runs once and one batched dot
  (``'gkq,gkn->gnq'``) feeds each run to the group's G channels: a small
  dense GEMM per group over output pixels.

  Args:
    x: ``(b, h, w, cin)`` NHWC input, of the layer's input size when it has
      one (`condensed_conv` checks it).
    layer: the grouped condensed conv.
    tile_elements: size of one gathered tile (elements).

  Returns:
    ``(b, oh, ow, cout)`` in the promoted dtype of x and the values;
    differentiable with respect to x and the values.
  """
  n, k, g = layer.values.shape

  def grid_sums(x, geo):
    batch = x.shape[0]
    grid = geo.grid(batch)
    chunk = min(grid, max(64, tile_elements // k))
    n_chunks = -(-grid // chunk)
    block = max(1, min(n, tile_elements // (k * chunk)))
    n_blocks = -(-n // block)
    planes = to_planes(x, geo).reshape(-1)
    # Every run src + [q0, q0 + chunk) must stay inside the buffer.
    planes = jnp.pad(planes, (0, n_chunks * chunk - grid))
    pad = n_blocks * block - n
    # Padded groups read run 0 with weight 0 and are sliced off below.
    src = jnp.pad(tap_sources(layer.taps, geo, batch), ((0, pad), (0, 0)))
    val = jnp.pad(layer.values.astype(x.dtype), ((0, pad), (0, 0), (0, 0)))
    src = src.reshape(n_blocks, block, k)
    val = val.reshape(n_blocks, block, k, g)

    def runs(starts):
      take = lambda s: jax.lax.dynamic_slice(planes, (s,), (chunk,))
      return jax.vmap(jax.vmap(take))(starts)  # (block, k, chunk)

    def one_block(_, sv):
      s, v = sv

      def one_chunk(_, q0):
        return None, jnp.einsum("gkq,gkn->gnq", runs(s + q0), v)

      _, y = jax.lax.scan(one_chunk, None, jnp.arange(n_chunks, dtype=jnp.int32) * chunk)
      # (n_chunks, block, g, chunk) -> (block * g, n_chunks * chunk)
      return None, jnp.moveaxis(y, 0, 2).reshape(block * g, n_chunks * chunk)

    _, y = jax.lax.scan(one_block, None, (src, val))
    return y.reshape(n_blocks * block * g, n_chunks * chunk)[: n * g, :grid]

  return apply_planes(x, layer, grid_sums)
