"""Condensed convolution with the native C++ CPU kernel, called from inside jit via XLA FFI.

The kernel (``csrc/conv/``, loaded by `srigl_jax.condensed._native_lib`) is a
direct convolution in the plane layout of `srigl_jax.condensed.conv.format`:
every tap of an output channel is one contiguous run over output pixels (and
the whole batch), so it vectorises over pixels with a broadcast weight and
keeps a block of 256 (AVX-512) or 96 (AVX2) output pixels in registers across
all taps. It builds the planes from the NHWC input itself, block by block in
L2-sized scratch, and writes the full NHWC output directly (ablated channels
get their bias), so there is no im2col buffer and no XLA pad/transpose around
the call. Work is split over XLA's intra-op thread pool. It trusts no
operand: every call checks the shapes, the geometry attributes, that every
tap lies in ``[0, kh * kw * cin)`` of the input it is given and that
neuron_ids is strictly increasing within the output channels, and fails with
an error naming the problem.

A 1x1 convolution without padding is a Dense layer over (subsampled) pixels;
from `_POINTWISE_DENSE_MIN_PIXELS` output pixels on it runs on the native
Dense kernel instead.

The grouped kernel (``csrc/conv/grouped_*``) runs the same plan and planes;
each vector of a tap's run is loaded once and feeds the G output channels of
its group (a register block of pixel vectors x channels). It checks its
arrays (shapes, tap range, sorted group ids) before it reads through them.

Inference-only: the FFI calls have no derivative rule; use
`condensed_conv_xla` / `grouped_conv_xla` to differentiate.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from srigl_jax.condensed import _native_lib
from srigl_jax.condensed.conv.format import CondensedConv, ConvGeometry, GroupedCondensedConv
from srigl_jax.condensed.dense.native import condensed_matmul_native, grouped_matmul_native

__all__ = ["condensed_conv_native", "grouped_conv_native"]

# 1x1 convolutions with at least this many output pixels (batch included)
# run on the Dense kernel: measured 10-25% faster than the conv kernel at
# batch 64 on ResNet-50's 1x1 layers, while at batch 1 the conv kernel was as
# fast or 10-30% faster (interleaved runs on a 2-core Zen 4, 90% sparsity).
# 0 sends every 1x1 convolution to the Dense kernel.
_POINTWISE_DENSE_MIN_PIXELS = 8192


@functools.partial(jax.jit, static_argnames=("max_threads", "isa"))
def condensed_conv_native(
    x: jax.Array, layer: CondensedConv, *, max_threads: int = 0, isa: str = "auto"
) -> jax.Array:
  """Condensed convolution with the native multithreaded C++ kernel (CPU only).

  The kernel writes every output channel with its bias; a bias map is added
  after it. Operand dtypes are those of `_native_lib.ffi_call` (bfloat16
  values stay bfloat16, the rest is float32, and so is the accumulation).

  Args:
    x: ``(b, h, w, cin)`` NHWC input, of the layer's input size when it has
      one (`condensed_conv` checks it).
    layer: the condensed conv (int16 or int32 taps; any kernel size, stride
      and zero padding).
    max_threads: cap on threads (0 = XLA's intra-op pool size).
    isa: kernel variant: 'auto', 'generic', 'avx2' or 'avx512'.

  Returns:
    ``(b, oh, ow, cout)`` in the promoted dtype of x and the values.

  Raises:
    RuntimeError: the library is not available (see `native_error`).
    ValueError: an unknown ``isa``.
    jax.errors.JaxRuntimeError: (when the call runs) a tap outside
      ``[0, kh * kw * cin)``, neuron ids not strictly increasing within
      ``[0, out_channels)``, or shapes that disagree; the message names the
      array, the position, the value and the valid range.
  """
  return _conv(x, layer, "conv", layer.neuron_ids, condensed_matmul_native, max_threads, isa)


@functools.partial(jax.jit, static_argnames=("max_threads", "isa"))
def grouped_conv_native(
    x: jax.Array, layer: GroupedCondensedConv, *, max_threads: int = 0, isa: str = "auto"
) -> jax.Array:
  """Grouped condensed convolution with the native multithreaded C++ kernel (CPU only).

  Dtypes and the 1x1 route as in `condensed_conv_native` (a large pointwise
  convolution runs on `grouped_matmul_native`).

  Args:
    x: ``(b, h, w, cin)`` NHWC input, of the layer's input size when it has
      one (`condensed_conv` checks it).
    layer: the grouped condensed conv (int16 or int32 taps, any G, kernel
      size, stride and zero padding).
    max_threads: cap on threads (0 = XLA's intra-op pool size).
    isa: kernel variant: 'auto', 'generic', 'avx2' or 'avx512'.

  Returns:
    ``(b, oh, ow, cout)`` in the promoted dtype of x and the values.

  Raises:
    RuntimeError: the library is not available (see `native_error`).
    ValueError: an unknown ``isa``.
  """
  return _conv(x, layer, "grouped_conv", layer.group_ids, grouped_matmul_native, max_threads, isa)


def _conv(x, layer, kind, ids, dense_kernel, max_threads, isa):
  """The conv kernel ``kind`` on x, or ``dense_kernel`` over pixels for a large 1x1."""
  geo: ConvGeometry = layer.geometry_for(x.shape)
  batch = x.shape[0]
  out_dtype = jnp.result_type(x.dtype, layer.values.dtype)
  if geo.is_pointwise and batch * geo.oh * geo.ow >= _POINTWISE_DENSE_MIN_PIXELS:
    pixels = x[:, :: geo.sh, :: geo.sw, :] if (geo.sh, geo.sw) != (1, 1) else x
    y = dense_kernel(pixels, layer.as_dense_layer(), max_threads=max_threads, isa=isa)
  else:
    (pt, pb), (pl, pr) = geo.pads
    shape = dict(kh=geo.kh, kw=geo.kw, sh=geo.sh, sw=geo.sw)
    pads = dict(pad_top=pt, pad_bottom=pb, pad_left=pl, pad_right=pr)
    out_shape = (batch, geo.oh, geo.ow, layer.out_channels)
    y = _native_lib.ffi_call(
        kind,
        out_shape,
        x,
        layer.taps,
        layer,
        ids=ids,
        max_threads=max_threads,
        isa=isa,
        **shape,
        **pads,
    )
  if layer.bias_map is not None:
    y = y + layer.bias_map.astype(y.dtype)
  return y.astype(out_dtype)
