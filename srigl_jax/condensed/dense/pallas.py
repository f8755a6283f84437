"""Condensed matmul as a Pallas kernel for GPUs (Triton lowering).

The program of `srigl_jax.condensed._pallas_common` (inference-only; run in
the Pallas interpreter on CPU) on the transposed input ``x.T`` ``(in,
batch)``: the gather of one input index reads ``block_batch`` contiguous
batch entries. The sums come out as ``(n_active, batch)`` and are placed into
the full width by XLA. The grouped kernel runs the grouped program of
`srigl_jax.condensed._pallas_common` (a small dense product per group on the
tensor cores) on the same ``x.T``. `condensed_matmul_xla` and
`grouped_matmul_xla` are the differentiable kernels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from srigl_jax.condensed import _pallas_common
from srigl_jax.condensed.dense.format import CondensedLayer, GroupedCondensedLayer, apply_rows

__all__ = ["BlockSizes", "GroupedBlockSizes", "condensed_matmul_pallas", "grouped_matmul_pallas"]


@dataclasses.dataclass(frozen=True)
class BlockSizes(_pallas_common.LaunchOptions):
  """Tile sizes and Triton options of the Dense kernel.

  Defaults: the best mean over batch 1 and 256, fp32 and bf16, of a sweep of
  96 configurations on an H200 at 90% sparsity, 3072 -> 768
  (scripts/gpu_tune.py; docs/benchmarks/gpu/gpu_tune.json).

  Attributes:
    block_neurons: active neurons per program.
    block_batch: batch rows per program (capped to the padded batch).
  """

  block_neurons: int = 64
  block_batch: int = 16


def _gather_rows(xt_ref, indices, cols):
  return xt_ref[indices.astype(jnp.int32)[:, None], cols[None, :]]


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def condensed_matmul_pallas(
    x: jax.Array,
    layer: CondensedLayer,
    *,
    block_sizes: BlockSizes = BlockSizes(),
    interpret: bool = False,
) -> jax.Array:
  """Condensed matmul with the Pallas GPU kernel.

  Accumulates in float32 whatever the input dtype (bf16 works).

  Args:
    x: ``(..., in_features)`` input (`condensed_matmul` checks it).
    layer: the condensed layer (int16 or int32 indices).
    block_sizes: tile configuration.
    interpret: run the kernel in the Pallas interpreter (CPU tests).

  Returns:
    ``(..., out_features)`` in the promoted dtype of x and the values.
  """

  def row_sums(x2):
    batch = x2.shape[0]
    bb, batch_p = _pallas_common.column_blocks(block_sizes.block_batch, batch)
    # Extra batch columns are zeros, sliced off with the padded neurons.
    xt = jnp.pad(x2, ((0, batch_p - batch), (0, 0))).T  # (in, batch_p)
    sums = _pallas_common.pallas_sums(
        xt, layer.indices, layer.values, _gather_rows, batch, bb, block_sizes, interpret
    )
    return sums.T

  return apply_rows(x, layer, row_sums)


@dataclasses.dataclass(frozen=True)
class GroupedBlockSizes(_pallas_common.LaunchOptions):
  """Tile sizes and Triton options of the grouped Dense kernel.

  Untuned (no GPU was available when it was written): a small dense product
  per group needs at least 16 rows, 16 fan-in entries and 16 neurons on the
  tensor cores.

  Attributes:
    block_groups: groups per program.
    block_batch: batch rows per program (capped to the padded batch).
    block_k: fan-in entries gathered per step.
    tf32: float32 products in TF32 on the tensor cores (JAX's default GPU
      precision); False computes them in full float32.
  """

  block_groups: int = 4
  block_batch: int = 32
  block_k: int = 32
  num_warps: int = dataclasses.field(default=4, kw_only=True)
  tf32: bool = dataclasses.field(default=True, kw_only=True)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def grouped_matmul_pallas(
    x: jax.Array,
    layer: GroupedCondensedLayer,
    *,
    block_sizes: GroupedBlockSizes = GroupedBlockSizes(),
    interpret: bool = False,
) -> jax.Array:
  """Grouped condensed matmul with the Pallas GPU kernel (tensor cores).

  Each group is a small dense ``(batch tile x k) @ (k x G)`` product: the
  program gathers ``block_k`` rows of ``x.T`` at the group's shared indices
  and multiplies them with the group's weights, in bf16 or fp32 (TF32 unless
  ``block_sizes.tf32`` is off), accumulating in float32.

  Args:
    x: ``(..., in_features)`` input (`condensed_matmul` checks it).
    layer: the grouped condensed layer (int16 or int32 indices, any G).
    block_sizes: tile configuration.
    interpret: run the kernel in the Pallas interpreter (CPU tests).

  Returns:
    ``(..., out_features)`` in the promoted dtype of x and the values.
  """

  def row_sums(x2):
    batch = x2.shape[0]
    bb, batch_p = _pallas_common.column_blocks(block_sizes.block_batch, batch)
    xt = jnp.pad(x2, ((0, batch_p - batch), (0, 0))).T  # (in, batch_p)
    sums = _pallas_common.grouped_pallas_sums(
        xt, layer.indices, layer.values, _gather_rows, batch, bb, block_sizes, interpret
    )  # (n_groups, batch, G)
    return jnp.moveaxis(sums, 1, 0).reshape(batch, -1)

  return apply_rows(x, layer, row_sums)
