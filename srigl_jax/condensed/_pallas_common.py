"""The Pallas program shared by the Dense and conv kernels (Triton lowering).

Both kernels compute, for every active neuron ``j`` and output column ``c``,
``sums[j, c] = sum_t values[j, t] * gather(data, indices[j, t], c)``; only
the gather differs. The Dense kernel gathers ``x.T[index, c]`` (columns are
batch rows), the conv kernel ``planes[src + c]`` (columns are output-grid
positions, see `srigl_jax.condensed.conv.format`). Either way the
``block_cols`` elements one index gathers are contiguous, so each warp's loads
coalesce.

Grid: (neuron blocks, column blocks). Each program keeps a ``(block_neurons,
block_cols)`` float32 accumulator and walks the fan-in: at step ``t`` it reads
row ``t`` of the transposed indices and values (``block_neurons`` contiguous
entries), gathers a tile and accumulates it times the values. The data is read
whole by every program.

The grouped formats (group-shared fan-in) have their own program,
`grouped_pallas_sums`: a group's gathered ``(block_k, block_cols)`` tile is
multiplied with its ``(block_k, G)`` weights as one small dense product on
the tensor cores.

Inference-only: no derivative rule is defined. On CPU the kernels run in the
Pallas interpreter (``interpret=True``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = ["LaunchOptions", "column_blocks", "grouped_pallas_sums", "pallas_sums"]

# Gather(data_ref, indices (block_neurons,), cols (block_cols,)) -> tile.
Gather = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True, kw_only=True)
class LaunchOptions:
  """Triton options of a launch, the base of each kernel's block-size dataclass.

  A subclass adds its tile sizes, ``block_neurons`` and a column block, as
  ``block_*`` fields; every ``block_*`` field must be a power of two, as
  Triton block shapes are.

  Attributes:
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages.
    unroll: fan-in steps unrolled per loop iteration.
  """

  num_warps: int = 8
  num_stages: int = 2
  unroll: int = 1

  def __post_init__(self):
    for field in dataclasses.fields(self):
      n = getattr(self, field.name)
      if field.name.startswith("block_") and (n < 1 or n & (n - 1)):
        raise ValueError(
            f"{type(self).__name__}: {field.name}={n} must be a power of two "
            "(Triton block shapes are)."
        )


def column_blocks(block_cols: int, n_cols: int) -> tuple[int, int]:
  """The column block for ``n_cols`` columns, and the padded column count.

  The block is capped to the columns rounded up to a power of two (at least
  16), so that batch 1 or a small image does not compute a mostly empty tile.

  Args:
    block_cols: the configured column block (a power of two).
    n_cols: columns to compute.

  Returns:
    ``(block, padded)`` with ``padded`` a multiple of ``block``.
  """
  block = min(block_cols, max(16, _next_pow2(n_cols)))
  return block, -(-n_cols // block) * block


def _kernel(data_ref, idx_ref, val_ref, out_ref, *, gather: Gather, k: int, unroll: int):
  block_cols = out_ref.shape[1]
  cols = pl.program_id(1) * block_cols + jnp.arange(block_cols, dtype=jnp.int32)

  def step(t, acc):
    vals = val_ref[t, :].astype(jnp.float32)
    tile = gather(data_ref, idx_ref[t, :], cols).astype(jnp.float32)
    return acc + tile * vals[:, None]

  # The Triton lowering rejects fori_loop(unroll > 1), so the unrolling is
  # written out: each loop iteration does `unroll` fan-in steps, and the
  # k % unroll leftover steps (k is static) follow as straight-line code.
  unroll = max(1, min(unroll, k))
  groups = k // unroll

  def unrolled(g, acc):
    for u in range(unroll):
      acc = step(g * unroll + u, acc)
    return acc

  acc = jnp.zeros(out_ref.shape, jnp.float32)
  acc = jax.lax.fori_loop(0, groups, unrolled, acc)
  for t in range(groups * unroll, k):
    acc = step(t, acc)
  out_ref[...] = acc.astype(out_ref.dtype)


def pallas_sums(
    data: jax.Array,
    indices: jax.Array,
    values: jax.Array,
    gather: Gather,
    n_cols: int,
    block_cols: int,
    block_sizes: LaunchOptions,
    interpret: bool,
) -> jax.Array:
  """Runs the shared Pallas program; the active neurons' sums ``(n_active, n_cols)``.

  Args:
    data: what ``gather`` reads, in the dtype of the computation, with room
      for the padded columns (the caller pads it to ``column_blocks(...)[1]``
      columns).
    indices: ``(n_active, k)`` the per-weight gather index.
    values: ``(n_active, k)`` weights.
    gather: the tile gather (see `Gather`).
    n_cols: columns to keep.
    block_cols: the column block from `column_blocks`.
    block_sizes: the kernel's `LaunchOptions` subclass (its ``block_neurons``
      is used here).
    interpret: run in the Pallas interpreter.

  Returns:
    ``(n_active, n_cols)`` sums in the dtype of ``data``, no bias.
  """
  dtype = data.dtype
  n, k = indices.shape
  bn = block_sizes.block_neurons
  n_p = -(-n // bn) * bn
  cols_p = -(-n_cols // block_cols) * block_cols
  # Padded neurons gather index 0 with weight 0; both paddings are sliced off.
  idx_t = jnp.pad(indices, ((0, n_p - n), (0, 0))).T  # (k, n_p)
  val_t = jnp.pad(values.astype(dtype), ((0, n_p - n), (0, 0))).T
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as plgpu  # GPU-only import

    compiler_params = plgpu.CompilerParams(
        num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages
    )
  whole = (0,) * data.ndim
  sums = pl.pallas_call(
      functools.partial(_kernel, gather=gather, k=k, unroll=block_sizes.unroll),
      grid=(n_p // bn, cols_p // block_cols),
      in_specs=[
          pl.BlockSpec(data.shape, lambda i, j: whole),
          pl.BlockSpec((k, bn), lambda i, j: (0, i)),
          pl.BlockSpec((k, bn), lambda i, j: (0, i)),
      ],
      out_specs=pl.BlockSpec((bn, block_cols), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((n_p, cols_p), dtype),
      interpret=interpret,
      compiler_params=compiler_params,
  )(data, idx_t, val_t)
  return sums[:n, :n_cols]


def _grouped_kernel(
    data_ref, idx_ref, val_ref, out_ref, *, gather: Gather, k_blocks: int, block_k: int, tf32: bool
):
  block_cols = out_ref.shape[1]
  cols = pl.program_id(1) * block_cols + jnp.arange(block_cols, dtype=jnp.int32)
  # Triton's dot takes fp32 or bf16 operands; fp32 runs as TF32 on tensor
  # cores (JAX's default GPU precision) unless tf32 is off.
  precision = None if data_ref.dtype == jnp.bfloat16 else _fp32_precision(tf32)
  for g in range(out_ref.shape[0]):

    def step(kb, acc, g=g):
      ks = pl.ds(pl.multiple_of(kb * block_k, block_k), block_k)
      tile = gather(data_ref, idx_ref[g, ks], cols)  # (block_k, block_cols)
      w = val_ref[g, ks, :]  # (block_k, G padded)
      # tile.T @ w, contracting the fan-in axis of both; Triton transposes
      # the tile in registers.
      return acc + jax.lax.dot_general(
          tile,
          w,
          (((0,), (0,)), ((), ())),
          precision=precision,
          preferred_element_type=jnp.float32,
      )

    acc = jnp.zeros(out_ref.shape[1:], jnp.float32)
    acc = jax.lax.fori_loop(0, k_blocks, step, acc)
    out_ref[g] = acc.astype(out_ref.dtype)


def _fp32_precision(tf32: bool):
  return jax.lax.Precision.HIGH if tf32 else jax.lax.Precision.HIGHEST


def grouped_pallas_sums(
    data: jax.Array,
    indices: jax.Array,
    values: jax.Array,
    gather: Gather,
    n_cols: int,
    block_cols: int,
    block_sizes,
    interpret: bool,
) -> jax.Array:
  """The grouped program: every group's sums ``(n_groups, n_cols, G)``.

  Grid: (group blocks, column blocks). A program walks ``block_groups``
  groups; for each it gathers ``block_k`` of the group's shared input rows at
  a time (a ``(block_k, block_cols)`` tile) and multiplies it with the
  group's ``(block_k, G)`` weights on the tensor cores,
  ``(block_cols x block_k) @ (block_k x G)``, accumulating in float32. The
  fan-in is padded to a multiple of ``block_k`` and G to a power of two of at
  least 16 (what Triton's dot takes) with index-0, zero-weight entries.

  Args:
    data: what ``gather`` reads, in the dtype of the computation, with room
      for the padded columns.
    indices: ``(n_groups, k)`` the gather index shared by each group.
    values: ``(n_groups, k, G)`` weights.
    gather: the tile gather (see `Gather`).
    n_cols: columns to keep.
    block_cols: the column block from `column_blocks`.
    block_sizes: the kernel's block-size dataclass (``block_groups``,
      ``block_k``, ``tf32`` and the `LaunchOptions`).
    interpret: run in the Pallas interpreter.

  Returns:
    ``(n_groups, n_cols, G)`` sums in the dtype of ``data``, no bias.
  """
  dtype = data.dtype
  n, k, g = values.shape
  bg, bk = block_sizes.block_groups, block_sizes.block_k
  n_p = -(-n // bg) * bg
  k_p = -(-k // bk) * bk
  g_p = max(16, _next_pow2(g))
  cols_p = -(-n_cols // block_cols) * block_cols
  idx = jnp.pad(indices.astype(jnp.int32), ((0, n_p - n), (0, k_p - k)))
  val = jnp.pad(values.astype(dtype), ((0, n_p - n), (0, k_p - k), (0, g_p - g)))
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as plgpu  # GPU-only import

    compiler_params = plgpu.CompilerParams(
        num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages
    )
  whole = (0,) * data.ndim
  kernel = functools.partial(
      _grouped_kernel, gather=gather, k_blocks=k_p // bk, block_k=bk, tf32=block_sizes.tf32
  )
  sums = pl.pallas_call(
      kernel,
      grid=(n_p // bg, cols_p // block_cols),
      in_specs=[
          pl.BlockSpec(data.shape, lambda i, j: whole),
          pl.BlockSpec((bg, k_p), lambda i, j: (i, 0)),
          pl.BlockSpec((bg, k_p, g_p), lambda i, j: (i, 0, 0)),
      ],
      out_specs=pl.BlockSpec((bg, block_cols, g_p), lambda i, j: (i, j, 0)),
      out_shape=jax.ShapeDtypeStruct((n_p, cols_p, g_p), dtype),
      interpret=interpret,
      compiler_params=compiler_params,
  )(data, idx, val)
  return sums[:n, :n_cols, :g]
