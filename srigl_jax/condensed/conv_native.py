"""Native CPU condensed convolution: a C++ kernel called from inside jit via XLA FFI.

The kernel (``csrc/conv_*``) lives in the same ``libsrigl_condensed.so`` as
the native condensed matmul. It is a direct convolution in the plane layout
of `conv_layer`: every tap of an output channel is one contiguous run over
output pixels (and the whole batch), so the kernel vectorises over pixels
with a broadcast weight and keeps a block of 256 (AVX-512) or 96 (AVX2)
output pixels in registers across all taps. It builds the planes from the
NHWC input itself, block by block in L2-sized scratch, and writes the NHWC
output directly, 16 channels of a pixel at a time through register
transposes (ablated channels get their bias), so there is no im2col buffer
and no XLA pad/transpose around the call. Work is split over XLA's intra-op
thread pool.

1x1 convolutions without padding are a Dense layer over pixels: with more
than `_POINTWISE_DENSE_MIN_PIXELS` output pixels they go through
`condensed_matmul_native` (strided ones after subsampling the input), which
measured 10-25% faster than the conv kernel at batch 64 on ResNet-50's 1x1
layers; at batch 1 the conv kernel measured as fast or 10-30% faster
(interleaved runs on a 2-core Zen 4, 90% sparsity).

Inference-only contract: the FFI call has no derivative rule; use
`condensed_conv_xla` to differentiate.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from srigl_jax.condensed import native
from srigl_jax.condensed.conv_layer import CondensedConv, plane_layout
from srigl_jax.condensed.conv_xla import condensed_conv_reference

__all__ = [
    "condensed_conv_native",
    "condensed_conv_native_reference",
    "conv_native_available",
    "conv_native_error",
    "conv_native_isas",
]

_TARGET = "srigl_condensed_conv_f32"

condensed_conv_native_reference = condensed_conv_reference
# 1x1 convolutions with at least this many output pixels (batch included)
# go through the Dense kernel, smaller ones through the conv kernel; see the
# module docstring. 0 sends every 1x1 conv through the Dense kernel.
_POINTWISE_DENSE_MIN_PIXELS = 8192


@functools.cache
def _register() -> str:
  """Registers the conv FFI target once; returns '' or why it is unavailable."""
  lib, err = native._load()  # pylint: disable=protected-access
  if lib is None:
    return err
  try:
    jax.ffi.register_ffi_target(
        _TARGET, jax.ffi.pycapsule(lib.SriglCondensedConvF32), platform="cpu"
    )
  except AttributeError as e:
    return f"the native library predates the conv kernel ({e}); rebuild it"
  return ""


def conv_native_available() -> bool:
  """Whether the native conv kernel is built and loadable."""
  return _register() == ""


def conv_native_error() -> str:
  """Why the native conv kernel is unavailable ('' when it is available)."""
  return _register()


def conv_native_isas() -> dict[str, str]:
  """Conv kernel variants usable here, e.g. ``{'auto': 'avx512', ...}``."""
  if not conv_native_available():
    return {}
  import ctypes  # pylint: disable=import-outside-toplevel

  lib = native._load()[0]  # pylint: disable=protected-access
  fn = lib.SriglCondensedConvKernelName
  fn.restype = ctypes.c_char_p
  fn.argtypes = [ctypes.c_int64]
  names = {isa: fn(code).decode() for isa, code in native.ISAS.items()}
  return {isa: name for isa, name in names.items() if name}


def _pointwise(x, layer: CondensedConv, max_threads: int, isa: str):
  """A 1x1 convolution without padding: the Dense kernel over pixels."""
  sh, sw = layer.strides
  if (sh, sw) != (1, 1):
    x = x[:, ::sh, ::sw, :]
  return native.condensed_matmul_native(x, layer.as_dense_layer(), max_threads=max_threads, isa=isa)


@functools.partial(jax.jit, static_argnames=("max_threads", "isa"))
def condensed_conv_native(
    x: jax.Array, layer: CondensedConv, *, max_threads: int = 0, isa: str = "auto"
) -> jax.Array:
  """Condensed convolution with the native multithreaded C++ kernel (CPU only).

  Computes in float32 (other dtypes are converted and the result converted
  back).

  Args:
    x: ``(b, h, w, cin)`` NHWC input.
    layer: the condensed conv (int16 or int32 taps; any kernel size, stride
      and zero padding; a bias map is added after the kernel).
    max_threads: cap on threads (0 = XLA's intra-op pool size).
    isa: kernel variant: 'auto', 'generic', 'avx2' or 'avx512'.

  Returns:
    ``(b, oh, ow, cout)`` in the promoted dtype of x and the values.

  Raises:
    RuntimeError: the library is not available (see `conv_native_error`).
  """
  err = _register()
  if err:
    raise RuntimeError(f"srigl_jax native conv kernel unavailable: {err}")
  if isa not in native.ISAS:
    raise ValueError(f"isa must be one of {sorted(native.ISAS)}, got {isa!r}")
  layer.check_input(x.shape)
  out_dtype = jnp.result_type(x.dtype, layer.values.dtype)
  lo = plane_layout(x.shape, layer.kernel_size, layer.strides, layer.padding)
  pixels = lo.batch * lo.oh * lo.ow
  if layer.is_pointwise and lo.pads == ((0, 0), (0, 0)) and pixels >= _POINTWISE_DENSE_MIN_PIXELS:
    y = _pointwise(x, layer, max_threads, isa)
  else:
    taps = layer.taps
    if taps.dtype not in (jnp.int16, jnp.int32):
      taps = taps.astype(jnp.int32)
    call = jax.ffi.ffi_call(
        _TARGET,
        jax.ShapeDtypeStruct((lo.batch, lo.oh, lo.ow, layer.out_channels), jnp.float32),
        vmap_method="sequential",
    )
    (pt, pb), (pl, pr) = lo.pads
    y = call(
        x.astype(jnp.float32),
        taps,
        layer.values.astype(jnp.float32),
        layer.neuron_ids.astype(jnp.int32),
        layer.bias_or_zeros(jnp.float32),
        kh=np.int64(lo.kh),
        kw=np.int64(lo.kw),
        sh=np.int64(lo.sh),
        sw=np.int64(lo.sw),
        pad_top=np.int64(pt),
        pad_bottom=np.int64(pb),
        pad_left=np.int64(pl),
        pad_right=np.int64(pr),
        max_threads=np.int64(max_threads),
        isa=np.int64(native.ISAS[isa]),
    )
  if layer.bias_map is not None:
    y = y + layer.bias_map.astype(jnp.float32)
  return y.astype(out_dtype)
