"""`condensed_matmul`: one entry point that picks the fastest kernel."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from srigl_jax.condensed import native
from srigl_jax.condensed.layer import CondensedLayer
from srigl_jax.condensed.pallas_gpu import condensed_matmul_pallas
from srigl_jax.condensed.xla import condensed_matmul_reference, condensed_matmul_xla

__all__ = ["IMPLS", "condensed_conv", "condensed_matmul", "resolve_impl"]

IMPLS = ("auto", "native", "pallas", "xla", "reference")

_log = logging.getLogger(__name__)
_noticed = False


def _notice_fallback() -> None:
  global _noticed
  if not _noticed:
    _noticed = True
    _log.warning(
        "srigl_jax: native CPU condensed kernel unavailable (%s); using the "
        "slower XLA gather-matmul.",
        native.native_error(),
    )


def resolve_impl(impl: str = "auto", backend: str | None = None) -> str:
  """The concrete kernel that ``impl`` means on ``backend``.

  Args:
    impl: one of `IMPLS`.
    backend: 'cpu', 'gpu', 'tpu'; default `jax.default_backend()`.

  Returns:
    'native', 'pallas', 'xla' or 'reference'.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  backend = backend or jax.default_backend()
  if backend == "cpu":
    if native.native_available():
      return "native"
    _notice_fallback()
    return "xla"
  if backend in ("gpu", "cuda", "rocm"):
    return "pallas"
  return "xla"


def condensed_matmul(x: jax.Array, layer: CondensedLayer, impl: str = "auto") -> jax.Array:
  """``x @ W + b`` for a condensed layer, with the fastest available kernel.

  ``impl='auto'`` uses the native C++ kernel on CPU (the XLA path, after a
  one-line notice, when it was not built), the Pallas kernel on GPU and the
  XLA gather-matmul elsewhere. Only 'xla' and 'reference' are differentiable.

  Args:
    x: ``(..., in_features)`` input.
    layer: a `CondensedLayer` (from `condense`).
    impl: 'auto', 'native', 'pallas', 'xla' or 'reference'.

  Returns:
    ``(..., out_features)``; ablated neurons output their bias.
  """
  if x.shape[-1] != layer.in_features:
    raise ValueError(
        f"condensed_matmul: x has {x.shape[-1]} features but the layer expects "
        f"{layer.in_features}"
    )
  which = resolve_impl(impl)
  if which == "native":
    return native.condensed_matmul_native(x, layer)
  if which == "pallas":
    return condensed_matmul_pallas(x, layer)
  if which == "xla":
    return condensed_matmul_xla(x, layer)
  return condensed_matmul_reference(x, layer)


def _conv_native_available() -> bool:
  from srigl_jax.condensed import conv_native

  return conv_native.conv_native_available()


def condensed_conv(x: jax.Array, layer, impl: str = "auto") -> jax.Array:
  """A condensed convolution (`CondensedConv`) with the fastest available kernel.

  ``impl='auto'`` uses the native C++ kernel on CPU (XLA when it was not
  built), the Pallas kernel on GPU and the XLA kernel elsewhere. Only 'xla'
  and 'reference' are differentiable.

  Args:
    x: ``(b, h, w, cin)`` NHWC input.
    layer: the `CondensedConv`.
    impl: 'auto', 'native', 'pallas', 'xla' or 'reference'.

  Returns:
    ``(b, oh, ow, cout)``; ablated channels output their bias.
  """
  from srigl_jax.condensed.conv_xla import condensed_conv_reference, condensed_conv_xla

  layer.check_input(x.shape)
  which = resolve_impl(impl)
  if which == "native":
    if impl == "native" or _conv_native_available():
      from srigl_jax.condensed.conv_native import condensed_conv_native

      return condensed_conv_native(x, layer)
    which = "xla"
  if which == "pallas" and impl == "auto":
    # Measured on an H200 (docs/benchmarks/gpu/gpu_tune.json): the Pallas conv
    # is 6.5x slower than cuDNN's dense conv at 90% sparsity, so 'auto' runs
    # the densified kernel there; impl='pallas' still selects the kernel.
    return _conv_densified(x, layer)
  if which == "pallas":
    from srigl_jax.condensed.conv_pallas import condensed_conv_pallas

    return condensed_conv_pallas(x, layer)
  if which == "xla":
    return condensed_conv_xla(x, layer)
  return condensed_conv_reference(x, layer)


@jax.jit
def _conv_densified(x, layer):
  """The condensed conv as a dense convolution of its densified kernel."""
  from srigl_jax.condensed.conv_layer import plane_layout

  dtype = jnp.result_type(x.dtype, layer.values.dtype)
  lo = plane_layout(x.shape, layer.kernel_size, layer.strides, layer.padding)
  y = jax.lax.conv_general_dilated(
      x.astype(dtype),
      layer.to_dense().astype(dtype),
      layer.strides,
      lo.pads,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  y = y + layer.bias_or_zeros(dtype)
  if layer.bias_map is not None:
    y = y + layer.bias_map.astype(dtype)
  return y
