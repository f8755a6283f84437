"""Condensed matmul as a Pallas kernel for GPUs (Triton lowering).

Grid: (neuron blocks, batch blocks). Each program keeps a ``(block_neurons,
block_batch)`` float32 accumulator and walks the fan-in: at step ``kk`` it
reads one row of the transposed indices/values (``block_neurons`` contiguous
entries) and gathers ``x.T[indices, batch_block]``. With x transposed to
``(in, batch)`` the gathered elements of one input index are contiguous across
the batch, so each warp's loads coalesce. The output is produced transposed,
``(n_active, batch)``, and placed into the full width by XLA.

Inference-only contract: no derivative rule is defined (use ``impl="xla"`` to
differentiate). On CPU run it with ``interpret=True`` (the tests do).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from srigl_jax.condensed.layer import CondensedLayer
from srigl_jax.condensed.xla import condensed_matmul_reference, scatter_to_outputs

__all__ = ["BlockSizes", "condensed_matmul_pallas", "condensed_matmul_pallas_reference"]

condensed_matmul_pallas_reference = condensed_matmul_reference


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes of the Pallas kernel (powers of two, as Triton requires).

  Attributes:
    block_neurons: active neurons per program.
    block_batch: batch rows per program (capped to the padded batch).
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages.
    unroll: fan-in steps unrolled per loop iteration.
  """

  # Defaults from a sweep on an H200 (docs/benchmarks/gpu/gpu_tune.json, 96
  # configurations at 90% sparsity, 3072 -> 768): best mean over batch 1 and
  # 256, fp32 and bf16; the former (32, 64, 4 warps, unroll 4) was 4.4x slower
  # at batch 256 fp32.
  block_neurons: int = 64
  block_batch: int = 16
  num_warps: int = 8
  num_stages: int = 2
  unroll: int = 1


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _kernel(xt_ref, idx_ref, val_ref, out_ref, *, k, block_batch, unroll):
  batch_ids = pl.program_id(1) * block_batch + jnp.arange(block_batch, dtype=jnp.int32)

  def step(kk, acc):
    cols = idx_ref[kk, :].astype(jnp.int32)  # (block_neurons,)
    vals = val_ref[kk, :].astype(jnp.float32)
    rows = xt_ref[cols[:, None], batch_ids[None, :]].astype(jnp.float32)
    return acc + rows * vals[:, None]

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
  for kk in range(groups * unroll, k):
    acc = step(kk, acc)
  out_ref[...] = acc.astype(out_ref.dtype)


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
    x: ``(..., in_features)`` input.
    layer: the condensed layer.
    block_sizes: tile configuration.
    interpret: run the kernel in the Pallas interpreter (CPU tests).

  Returns:
    ``(..., out_features)`` in the promoted dtype of x and the values.
  """
  lead = x.shape[:-1]
  dtype = jnp.result_type(x.dtype, layer.values.dtype)
  x2 = x.reshape(-1, x.shape[-1]).astype(dtype)
  batch = x2.shape[0]
  n, k = layer.values.shape
  bias = layer.bias_or_zeros(dtype)
  if n == 0 or batch == 0 or k == 0:
    y = jnp.broadcast_to(bias[layer.neuron_ids], (batch, n))
    return scatter_to_outputs(y, layer).reshape(*lead, layer.out_features)
  bb = min(block_sizes.block_batch, max(16, _next_pow2(batch)))
  bn = block_sizes.block_neurons
  batch_p = -(-batch // bb) * bb
  n_p = -(-n // bn) * bn
  # Padding: extra batch columns are zeros, extra neurons gather input 0 with
  # weight 0; both are sliced off after the kernel.
  xt = jnp.pad(x2, ((0, batch_p - batch), (0, 0))).T  # (in, batch_p)
  idx_t = jnp.pad(layer.indices, ((0, n_p - n), (0, 0))).T  # (k, n_p)
  val_t = jnp.pad(layer.values.astype(dtype), ((0, n_p - n), (0, 0))).T
  kernel = functools.partial(_kernel, k=k, block_batch=bb, unroll=block_sizes.unroll)
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as plgpu  # GPU-only import

    compiler_params = plgpu.CompilerParams(
        num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages
    )
  yt = pl.pallas_call(
      kernel,
      grid=(n_p // bn, batch_p // bb),
      in_specs=[
          pl.BlockSpec(xt.shape, lambda i, j: (0, 0)),
          pl.BlockSpec((k, bn), lambda i, j: (0, i)),
          pl.BlockSpec((k, bn), lambda i, j: (0, i)),
      ],
      out_specs=pl.BlockSpec((bn, bb), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((n_p, batch_p), dtype),
      interpret=interpret,
      compiler_params=compiler_params,
  )(xt, idx_t, val_t)
  y = yt[:n, :batch].T + bias[layer.neuron_ids]
  return scatter_to_outputs(y, layer).reshape(*lead, layer.out_features)
