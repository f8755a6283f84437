"""Condensed convolution in plain XLA ops: the portable fallback, and the reference.

The fast path works in the plane layout of `conv_layer`: every tap of an
output channel is one contiguous run of the flattened planes, so a block of
channels gathers ``(block, k, chunk)`` runs with row-sized slices (no element
gather) and reduces them against the weights. Neuron blocks and grid chunks
are walked with `lax.scan` so that a gathered tile stays near 1 MiB whatever
the batch and image size. Differentiable with respect to the input and the
values.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from srigl_jax.condensed.conv_layer import (
    CondensedConv,
    from_planes,
    plane_layout,
    tap_sources,
    to_planes,
)

__all__ = ["condensed_conv_reference", "condensed_conv_xla", "finish_conv_output"]

# Elements of one gathered (block, k, chunk) tile.
_TILE_ELEMENTS = 2**18


def condensed_conv_reference(x: jax.Array, layer: CondensedConv) -> jax.Array:
  """Plain-jnp reference: densify the kernel and run `lax.conv_general_dilated`.

  Args:
    x: ``(b, h, w, cin)`` input.
    layer: the condensed conv.

  Returns:
    ``(b, oh, ow, cout)`` in the promoted dtype of x and the values.
  """
  layer.check_input(x.shape)
  dtype = jnp.result_type(x.dtype, layer.values.dtype)
  lo = plane_layout(x.shape, layer.kernel_size, layer.strides, layer.padding)
  y = jax.lax.conv_general_dilated(
      x.astype(dtype),
      layer.to_dense().astype(dtype),
      window_strides=layer.strides,
      padding=lo.pads,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST,
  )
  y = y + layer.bias_or_zeros(dtype)
  if layer.bias_map is not None:
    y = y + layer.bias_map.astype(dtype)
  return y


def finish_conv_output(y_active: jax.Array, layer: CondensedConv) -> jax.Array:
  """Adds the bias and places active channels into the full output.

  Args:
    y_active: ``(b, oh, ow, n_active)`` sums of the active channels, no bias.
    layer: the layer they belong to.

  Returns:
    ``(b, oh, ow, cout)``: active channels with their bias, ablated channels
    with only their bias, plus the per-position bias map if the layer has one.
  """
  dtype = y_active.dtype
  bias = layer.bias_or_zeros(dtype)
  if layer.is_compact:
    y = y_active + bias
  else:
    full = jnp.broadcast_to(bias, (*y_active.shape[:3], layer.out_channels))
    y = full.at[..., layer.neuron_ids].set(
        y_active + bias[layer.neuron_ids], unique_indices=True, indices_are_sorted=True
    )
  if layer.bias_map is not None:
    y = y + layer.bias_map.astype(dtype)
  return y


@functools.partial(jax.jit, static_argnames=("tile_elements",))
def condensed_conv_xla(
    x: jax.Array, layer: CondensedConv, *, tile_elements: int = _TILE_ELEMENTS
) -> jax.Array:
  """Condensed convolution with XLA ops only (runs on any backend).

  Args:
    x: ``(b, h, w, cin)`` NHWC input.
    layer: the condensed conv.
    tile_elements: size of one gathered tile (elements).

  Returns:
    ``(b, oh, ow, cout)``; differentiable with respect to x and the values.
  """
  layer.check_input(x.shape)
  dtype = jnp.result_type(x.dtype, layer.values.dtype)
  lo = plane_layout(x.shape, layer.kernel_size, layer.strides, layer.padding)
  n, k = layer.values.shape
  if n == 0 or lo.batch == 0 or k == 0:
    zeros = jnp.zeros((lo.batch, lo.oh, lo.ow, n), dtype)
    return finish_conv_output(zeros, layer)
  chunk = min(lo.grid, max(64, tile_elements // k))
  n_chunks = -(-lo.grid // chunk)
  block = max(1, min(n, tile_elements // (k * chunk)))
  n_blocks = -(-n // block)
  planes = to_planes(x.astype(dtype), lo).reshape(-1)
  # Every run src + [q0, q0 + chunk) must stay inside the buffer.
  planes = jnp.pad(planes, (0, n_chunks * chunk - lo.grid))
  pad = n_blocks * block - n
  # Padded rows read run 0 with weight 0 and are sliced off below.
  src = jnp.pad(tap_sources(layer.taps, lo), ((0, pad), (0, 0)))
  val = jnp.pad(layer.values.astype(dtype), ((0, pad), (0, 0)))
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
  y = y.reshape(n_blocks * block, n_chunks * chunk)[:n, : lo.grid]
  return finish_conv_output(from_planes(y, lo), layer)
