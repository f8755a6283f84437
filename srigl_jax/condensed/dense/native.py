"""Condensed matmul with the native C++ CPU kernel, called from inside jit via XLA FFI.

The kernel (``csrc/dense/``, loaded by `srigl_jax.condensed._native_lib`)
splits the active neurons, and for batches > 1 16/32/64-wide batch tiles of
the transposed input, over XLA's intra-op thread pool, and uses AVX-512/AVX2
code where the CPU has it. It writes the full output itself, ablated neurons
included. It trusts no operand: every call checks the shapes, that
neuron_ids is strictly increasing within the outputs, and each work item's
indices before it reads through them (3-6% of a batch-1 call, nothing
measurable at batch 256; see ``csrc/dense/ffi.cc``), and fails with an error
that names the array, position, value and valid range.

The grouped kernel (``csrc/dense/grouped_*``) reads each gathered input once
for the G neurons of a group: at batches up to 4 it broadcasts x[idx] and
multiplies it with the group's G contiguous weights (no gather instruction,
G accumulators in registers); at larger batches one row of a transposed
batch tile feeds G neurons' accumulators. It checks its arrays (shapes,
index range, sorted group ids) before it reads through them.

Inference-only: the FFI calls have no derivative rule; use
`condensed_matmul_xla` / `grouped_matmul_xla` to differentiate.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from srigl_jax.condensed import _native_lib
from srigl_jax.condensed.dense.format import CondensedLayer, GroupedCondensedLayer

__all__ = ["condensed_matmul_native", "grouped_matmul_native"]


@functools.partial(jax.jit, static_argnames=("max_threads", "isa"))
def condensed_matmul_native(
    x: jax.Array, layer: CondensedLayer, *, max_threads: int = 0, isa: str = "auto"
) -> jax.Array:
  """Condensed matmul with the native multithreaded C++ kernel (CPU only).

  Accumulates in float32. bfloat16 values are read as bfloat16 (fewer bytes
  per weight); other value dtypes, the input and the bias are converted to
  float32, and the float32 result to the promoted dtype of x and the values.

  Args:
    x: ``(..., in_features)`` input (`condensed_matmul` checks it).
    layer: the condensed layer (int16 or int32 indices).
    max_threads: cap on threads (0 = XLA's intra-op pool size).
    isa: kernel variant: 'auto', 'generic', 'avx2' or 'avx512'.

  Returns:
    ``(..., out_features)`` in the promoted dtype of x and the values.

  Raises:
    RuntimeError: the library is not available (see `native_error`).
    ValueError: an unknown ``isa``.
    jax.errors.JaxRuntimeError: (when the call runs) an index outside
      ``[0, x.shape[-1])``, neuron ids not strictly increasing within
      ``[0, out_features)``, or shapes that disagree; the message names the
      array, the position, the value and the valid range.
  """
  lead = x.shape[:-1]
  out_dtype = jnp.result_type(x.dtype, layer.values.dtype)
  x2 = x.reshape(-1, x.shape[-1])
  out_shape = (x2.shape[0], layer.out_features)
  y = _native_lib.ffi_call(
      "dense", out_shape, x2, layer.indices, layer, max_threads=max_threads, isa=isa
  )
  return y.astype(out_dtype).reshape(*lead, layer.out_features)


@functools.partial(jax.jit, static_argnames=("max_threads", "isa"))
def grouped_matmul_native(
    x: jax.Array, layer: GroupedCondensedLayer, *, max_threads: int = 0, isa: str = "auto"
) -> jax.Array:
  """Grouped condensed matmul with the native multithreaded C++ kernel (CPU only).

  Dtypes as in `condensed_matmul_native`: bfloat16 values are read as
  bfloat16, everything else goes in and is accumulated as float32.

  Args:
    x: ``(..., in_features)`` input (`condensed_matmul` checks it).
    layer: the grouped condensed layer (int16 or int32 indices, any G).
    max_threads: cap on threads (0 = XLA's intra-op pool size).
    isa: kernel variant: 'auto', 'generic', 'avx2' or 'avx512'.

  Returns:
    ``(..., out_features)`` in the promoted dtype of x and the values.

  Raises:
    RuntimeError: the library is not available (see `native_error`).
    ValueError: an unknown ``isa``.
  """
  lead = x.shape[:-1]
  out_dtype = jnp.result_type(x.dtype, layer.values.dtype)
  x2 = x.reshape(-1, x.shape[-1])
  out_shape = (x2.shape[0], layer.out_features)
  y = _native_lib.ffi_call(
      "grouped_dense",
      out_shape,
      x2,
      layer.indices,
      layer,
      ids=layer.group_ids,
      max_threads=max_threads,
      isa=isa,
  )
  return y.astype(out_dtype).reshape(*lead, layer.out_features)
