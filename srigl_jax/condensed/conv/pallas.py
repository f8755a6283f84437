"""Condensed convolution as a Pallas kernel for GPUs (Triton lowering).

The program of `srigl_jax.condensed._pallas_common` (inference-only; run in
the Pallas interpreter on CPU) over the plane layout of
`srigl_jax.condensed.conv.format`: output channel ``j``'s grid row is
``y_grid[j, q] = sum_t values[j, t] * planes_flat[src[j, t] + q]`` with
``src = tap_sources(taps, geometry, batch)``, so the gather of one tap reads
``block_cols`` contiguous inputs, for every kernel size, stride, padding and
batch size, with no im2col buffer. The grouped kernel multiplies each group's
gathered runs with its G channels' weights as one small dense product on the
tensor cores. `condensed_conv_xla` and `grouped_conv_xla` are the
differentiable kernels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from srigl_jax.condensed import _pallas_common
from srigl_jax.condensed.conv.format import (
    CondensedConv,
    GroupedCondensedConv,
    apply_planes,
    tap_sources,
    to_planes,
)

__all__ = [
    "ConvBlockSizes",
    "GroupedConvBlockSizes",
    "condensed_conv_pallas",
    "grouped_conv_pallas",
]


@dataclasses.dataclass(frozen=True)
class ConvBlockSizes(_pallas_common.LaunchOptions):
  """Tile sizes and Triton options of the conv kernel.

  Defaults: the fastest of a sweep on an H200 for a 3x3 conv 28x28x128 at
  batch 64, 90% sparse (scripts/gpu_tune.py; docs/benchmarks/gpu/gpu_tune.json).

  Attributes:
    block_neurons: active output channels per program.
    block_cols: output-grid columns per program (capped to the padded grid,
      so small images and batch 1 do not compute a mostly empty tile).
  """

  block_neurons: int = 64
  block_cols: int = 64
  unroll: int = dataclasses.field(default=4, kw_only=True)


def _gather_runs(planes_ref, src, cols):
  return planes_ref[src[:, None] + cols[None, :]]


def _planes_and_sources(x, layer, geo, grid, grid_p, name):
  """The flat planes padded for ``grid_p`` columns, and each tap's run start."""
  batch = x.shape[0]
  if geo.rows * geo.row_len(batch) + grid_p - grid >= 2**31:
    # Gather addresses are int32 (as in `tap_sources`).
    raise ValueError(
        f"{name}: the plane buffer of this call has "
        f"{geo.rows * geo.row_len(batch)} elements, beyond int32 addressing; "
        "split the batch into smaller calls."
    )
  # Every run src + [0, grid_p) must stay inside the buffer; the extra
  # columns read zeros (or the next row) and are sliced off.
  planes = jnp.pad(to_planes(x, geo).reshape(-1), (0, grid_p - grid))
  return planes, tap_sources(layer.taps, geo, batch)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def condensed_conv_pallas(
    x: jax.Array,
    layer: CondensedConv,
    *,
    block_sizes: ConvBlockSizes = ConvBlockSizes(),
    interpret: bool = False,
) -> jax.Array:
  """Condensed convolution with the Pallas GPU kernel.

  Accumulates in float32 whatever the input dtype (bf16 works). Taps may be
  int16 or int32.

  Args:
    x: ``(b, h, w, cin)`` NHWC input, of the layer's input size when it has
      one (`condensed_conv` checks it).
    layer: the condensed conv.
    block_sizes: tile configuration.
    interpret: run the kernel in the Pallas interpreter (CPU tests).

  Returns:
    ``(b, oh, ow, cout)`` in the promoted dtype of x and the values.

  Raises:
    ValueError: the planes of this call are too large for int32 addresses.
  """

  def grid_sums(x, geo):
    batch = x.shape[0]
    grid = geo.grid(batch)
    bc, grid_p = _pallas_common.column_blocks(block_sizes.block_cols, grid)
    planes, src = _planes_and_sources(x, layer, geo, grid, grid_p, "condensed_conv_pallas")
    return _pallas_common.pallas_sums(
        planes, src, layer.values, _gather_runs, grid, bc, block_sizes, interpret
    )

  return apply_planes(x, layer, grid_sums)


@dataclasses.dataclass(frozen=True)
class GroupedConvBlockSizes(_pallas_common.LaunchOptions):
  """Tile sizes and Triton options of the grouped conv kernel (untuned, as
  `GroupedBlockSizes` of the Dense kernel).

  Attributes:
    block_groups: groups per program.
    block_cols: output-grid columns per program (capped to the padded grid).
    block_k: taps gathered per step.
    tf32: float32 products in TF32 on the tensor cores.
  """

  block_groups: int = 4
  block_cols: int = 64
  block_k: int = 32
  num_warps: int = dataclasses.field(default=4, kw_only=True)
  tf32: bool = dataclasses.field(default=True, kw_only=True)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def grouped_conv_pallas(
    x: jax.Array,
    layer: GroupedCondensedConv,
    *,
    block_sizes: GroupedConvBlockSizes = GroupedConvBlockSizes(),
    interpret: bool = False,
) -> jax.Array:
  """Grouped condensed convolution with the Pallas GPU kernel (tensor cores).

  In the plane layout a group's taps are ``k`` runs of the planes; each
  program gathers ``block_k`` runs of ``block_cols`` output pixels and
  multiplies them with the group's weights as a small dense product,
  ``(block_cols x block_k) @ (block_k x G)``, accumulating in float32.

  Args:
    x: ``(b, h, w, cin)`` NHWC input, of the layer's input size when it has
      one (`condensed_conv` checks it).
    layer: the grouped condensed conv.
    block_sizes: tile configuration.
    interpret: run the kernel in the Pallas interpreter (CPU tests).

  Returns:
    ``(b, oh, ow, cout)`` in the promoted dtype of x and the values.

  Raises:
    ValueError: the planes of this call are too large for int32 addresses.
  """

  def grid_sums(x, geo):
    batch = x.shape[0]
    grid = geo.grid(batch)
    bc, grid_p = _pallas_common.column_blocks(block_sizes.block_cols, grid)
    planes, src = _planes_and_sources(x, layer, geo, grid, grid_p, "grouped_conv_pallas")
    sums = _pallas_common.grouped_pallas_sums(
        planes, src, layer.values, _gather_runs, grid, bc, block_sizes, interpret
    )  # (n_groups, grid, G)
    return jnp.moveaxis(sums, 2, 1).reshape(-1, grid)

  return apply_planes(x, layer, grid_sums)
