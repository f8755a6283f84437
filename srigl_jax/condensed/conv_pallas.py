"""Condensed convolution as a Pallas kernel for GPUs (Triton lowering).

Works in the plane layout of `conv_layer`: output channel ``j``'s grid row is
``y_grid[j, q] = sum_t values[j, t] * planes_flat[src[j, t] + q]`` with
``src = tap_sources(taps, layout)``. That is the Dense Pallas kernel's
structure with a different gather address. Grid: (channel blocks, grid-column
blocks). Each program keeps a ``(block_neurons, block_cols)`` float32
accumulator and walks the fan-in: at step ``kk`` it reads one row of the
transposed sources/values (``block_neurons`` contiguous entries) and gathers
``planes_flat[src[:, None] + q[None, :]]``. Every row of that tile is a run
of ``block_cols`` contiguous inputs, so each warp's loads coalesce, for every
kernel size, stride, padding and batch size, with no im2col buffer.

Inference-only contract: no derivative rule is defined (use
`condensed_conv_xla` to differentiate). On CPU run it with ``interpret=True``
(the tests do).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from srigl_jax.condensed.conv_layer import (
    CondensedConv,
    from_planes,
    plane_layout,
    tap_sources,
    to_planes,
)
from srigl_jax.condensed.conv_xla import condensed_conv_reference, finish_conv_output

__all__ = ["ConvBlockSizes", "condensed_conv_pallas", "condensed_conv_pallas_reference"]

condensed_conv_pallas_reference = condensed_conv_reference


@dataclasses.dataclass(frozen=True)
class ConvBlockSizes:
  """Tile sizes of the Pallas conv kernel (powers of two, as Triton requires).

  Attributes:
    block_neurons: active output channels per program.
    block_cols: output-grid columns per program (capped to the padded grid,
      so small images and batch 1 do not compute a mostly empty tile).
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages.
    unroll: fan-in steps unrolled per loop iteration (written out by hand:
      the Triton lowering rejects ``fori_loop(unroll > 1)``).
  """

  # Defaults from a sweep on an H200 (docs/benchmarks/gpu/gpu_tune.json, a
  # 3x3 conv 28x28x128 at batch 64, 90% sparse): 1.26x faster than the former
  # (32, 128, 4 warps), but still 6.5x slower than cuDNN's dense conv, which
  # is why condensed_conv(impl='auto') uses the densified kernel on GPUs.
  block_neurons: int = 64
  block_cols: int = 64
  num_warps: int = 8
  num_stages: int = 2
  unroll: int = 4


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _check_pow2(name: str, n: int) -> None:
  if n < 1 or n & (n - 1):
    raise ValueError(
        f"condensed_conv_pallas: {name}={n} must be a power of two (Triton " "block shapes are)."
    )


def _kernel(planes_ref, src_ref, val_ref, out_ref, *, k, block_cols, unroll):
  cols = pl.program_id(1) * block_cols + jnp.arange(block_cols, dtype=jnp.int32)

  def step(kk, acc):
    src = src_ref[kk, :]  # (block_neurons,) int32 run starts
    vals = val_ref[kk, :].astype(jnp.float32)
    runs = planes_ref[src[:, None] + cols[None, :]].astype(jnp.float32)
    return acc + runs * vals[:, None]

  # Each loop iteration does `unroll` fan-in steps written out, and the
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
    x: ``(b, h, w, cin)`` NHWC input.
    layer: the condensed conv.
    block_sizes: tile configuration.
    interpret: run the kernel in the Pallas interpreter (CPU tests).

  Returns:
    ``(b, oh, ow, cout)`` in the promoted dtype of x and the values.

  Raises:
    ValueError: the input does not fit the layer, a block size is not a
      power of two, or the planes are too large for int32 addresses.
  """
  layer.check_input(x.shape, "condensed_conv_pallas")
  _check_pow2("block_neurons", block_sizes.block_neurons)
  _check_pow2("block_cols", block_sizes.block_cols)
  dtype = jnp.result_type(x.dtype, layer.values.dtype)
  lo = plane_layout(x.shape, layer.kernel_size, layer.strides, layer.padding)
  n, k = layer.values.shape
  if n == 0 or lo.batch == 0 or k == 0:
    zeros = jnp.zeros((lo.batch, lo.oh, lo.ow, n), dtype)
    return finish_conv_output(zeros, layer)
  bc = min(block_sizes.block_cols, max(16, _next_pow2(lo.grid)))
  bn = block_sizes.block_neurons
  grid_p = -(-lo.grid // bc) * bc
  n_p = -(-n // bn) * bn
  if lo.rows * lo.row_len + grid_p - lo.grid >= 2**31:
    # Gather addresses are int32 (as in `tap_sources`).
    raise ValueError(
        f"condensed_conv_pallas: the plane buffer of this call has "
        f"{lo.rows * lo.row_len} elements, beyond int32 addressing; split the "
        "batch into smaller calls."
    )
  planes = to_planes(x.astype(dtype), lo).reshape(-1)
  # Every run src + [0, grid_p) must stay inside the buffer; the extra
  # columns read zeros (or the next row) and are sliced off below.
  planes = jnp.pad(planes, (0, grid_p - lo.grid))
  # Padded channels read run 0 with weight 0 and are sliced off below.
  src_t = jnp.pad(tap_sources(layer.taps, lo), ((0, n_p - n), (0, 0))).T  # (k, n_p)
  val_t = jnp.pad(layer.values.astype(dtype), ((0, n_p - n), (0, 0))).T
  kernel = functools.partial(_kernel, k=k, block_cols=bc, unroll=block_sizes.unroll)
  compiler_params = None
  if not interpret:
    from jax.experimental.pallas import triton as plgpu  # GPU-only import

    compiler_params = plgpu.CompilerParams(
        num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages
    )
  y_grid = pl.pallas_call(
      kernel,
      grid=(n_p // bn, grid_p // bc),
      in_specs=[
          pl.BlockSpec(planes.shape, lambda i, j: (0,)),
          pl.BlockSpec((k, bn), lambda i, j: (0, i)),
          pl.BlockSpec((k, bn), lambda i, j: (0, i)),
      ],
      out_specs=pl.BlockSpec((bn, bc), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((n_p, grid_p), dtype),
      interpret=interpret,
      compiler_params=compiler_params,
  )(planes, src_t, val_t)
  y_grid = y_grid[:n, : lo.grid]
  return finish_conv_output(from_planes(y_grid, lo), layer)
