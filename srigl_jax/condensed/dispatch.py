"""`condensed_matmul` and `condensed_conv`: the public entry points, which pick a kernel.

They check their input against the layer once, here, and hand the kernels a
layer set up for it (for a conv: with the `ConvGeometry` of the input size).
Each format (plain or grouped) has its own kernels; the layer's type picks
them. An empty batch gets an empty result without a kernel call. The XLA and
Pallas kernels trust the layer's arrays, which ``validate()`` checks once
where a layer comes from outside (`convert_model`, the serving loader); the
native kernels check them on every call and refuse what is out of range.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from srigl_jax.condensed import _native_lib
from srigl_jax.condensed.conv import (
    CondensedConv,
    GroupedCondensedConv,
    condensed_conv_native,
    condensed_conv_pallas,
    condensed_conv_reference,
    condensed_conv_xla,
    grouped_conv_native,
    grouped_conv_pallas,
    grouped_conv_xla,
)
from srigl_jax.condensed.dense import (
    CondensedLayer,
    GroupedCondensedLayer,
    condensed_matmul_native,
    condensed_matmul_pallas,
    condensed_matmul_reference,
    condensed_matmul_xla,
    grouped_matmul_native,
    grouped_matmul_pallas,
    grouped_matmul_xla,
)

__all__ = ["IMPLS", "condensed_conv", "condensed_matmul", "resolve_impl"]

IMPLS = ("auto", "native", "pallas", "xla", "reference")

# Layer type -> kernel per concrete impl.
_MATMUL = {
    CondensedLayer: {
        "native": condensed_matmul_native,
        "pallas": condensed_matmul_pallas,
        "xla": condensed_matmul_xla,
        "reference": condensed_matmul_reference,
    },
    GroupedCondensedLayer: {
        "native": grouped_matmul_native,
        "pallas": grouped_matmul_pallas,
        "xla": grouped_matmul_xla,
        "reference": condensed_matmul_reference,
    },
}
_CONV = {
    CondensedConv: {
        "native": condensed_conv_native,
        "pallas": condensed_conv_pallas,
        "xla": condensed_conv_xla,
        "reference": condensed_conv_reference,
    },
    GroupedCondensedConv: {
        "native": grouped_conv_native,
        "pallas": grouped_conv_pallas,
        "xla": grouped_conv_xla,
        "reference": condensed_conv_reference,
    },
}


def _kernels(table, layer, what: str):
  kernels = table.get(type(layer))
  if kernels is None:
    raise TypeError(
        f"{what}: expects one of {sorted(t.__name__ for t in table)}, got {type(layer).__name__}."
    )
  return kernels


_log = logging.getLogger(__name__)
_noticed = False


def _notice_fallback() -> None:
  global _noticed
  if not _noticed:
    _noticed = True
    _log.warning(
        "srigl_jax: native CPU condensed kernels unavailable (%s); using the "
        "slower XLA kernels.",
        _native_lib.native_error(),
    )


def _out_dtype(x: jax.Array, layer) -> jnp.dtype:
  """What every kernel returns: the promoted dtype of the input and the values."""
  return jnp.result_type(x.dtype, layer.values.dtype)


def resolve_impl(impl: str = "auto", backend: str | None = None) -> str:
  """The concrete kernel that ``impl`` means on ``backend``.

  Args:
    impl: one of `IMPLS`.
    backend: 'cpu', 'gpu', 'tpu'; default `jax.default_backend()`.

  Returns:
    'native', 'pallas', 'xla' or 'reference'.

  Raises:
    ValueError: ``impl`` is not one of `IMPLS`.
  """
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  backend = backend or jax.default_backend()
  if backend == "cpu":
    if _native_lib.native_available():
      return "native"
    _notice_fallback()
    return "xla"
  if backend in ("gpu", "cuda", "rocm"):
    return "pallas"
  return "xla"


def condensed_matmul(
    x: jax.Array,
    layer: CondensedLayer | GroupedCondensedLayer,
    impl: str = "auto",
    *,
    name: str = "condensed_matmul",
) -> jax.Array:
  """``x @ W + b`` for a condensed layer, with the fastest available kernel.

  ``impl='auto'`` uses the native C++ kernel on CPU (the XLA kernel, after a
  one-line notice, when it was not built), the Pallas kernel on GPU and the
  XLA kernel elsewhere. Only 'xla' and 'reference' are differentiable.

  Args:
    x: ``(..., in_features)`` input.
    layer: a `CondensedLayer` (from `condense_dense` or `condense`) or a
      `GroupedCondensedLayer` (from `condense_grouped_dense`).
    impl: 'auto', 'native', 'pallas', 'xla' or 'reference'.
    name: what an error about the input names.

  Returns:
    ``(..., out_features)``; ablated neurons output their bias.

  Raises:
    ValueError: ``x`` does not have ``in_features`` features, or an unknown
      ``impl``.
    TypeError: ``layer`` is not a condensed Dense layer.
  """
  kernels = _kernels(_MATMUL, layer, "condensed_matmul")
  layer = layer.for_input(x.shape, name)
  which = resolve_impl(impl)
  if 0 in x.shape[:-1]:
    # An empty batch: no kernel is called (some cannot size their work for it).
    return jnp.zeros((*x.shape[:-1], layer.out_features), _out_dtype(x, layer))
  return kernels[which](x, layer)


def condensed_conv(
    x: jax.Array,
    layer: CondensedConv | GroupedCondensedConv,
    impl: str = "auto",
    *,
    name: str = "condensed_conv",
) -> jax.Array:
  """A condensed convolution with the fastest available kernel.

  ``impl='auto'`` uses the native C++ kernel on CPU (the XLA kernel when it
  was not built) and the XLA kernel on TPU. On GPUs it runs the densified
  kernel under cuDNN (`condensed_conv_reference` at default precision): the
  Pallas conv kernel measured 6.5x slower than cuDNN's dense convolution at
  90% sparsity (docs/benchmarks/gpu/gpu_tune.json); ``impl='pallas'`` still
  selects it. Only 'xla' and 'reference' are differentiable.

  Args:
    x: ``(b, h, w, cin)`` NHWC input.
    layer: a `CondensedConv` (from `condense_conv` or `convert_model`) or a
      `GroupedCondensedConv` (from `condense_grouped_conv`).
    impl: 'auto', 'native', 'pallas', 'xla' or 'reference'.
    name: what an error about the input names.

  Returns:
    ``(b, oh, ow, cout)``; ablated channels output their bias.

  Raises:
    ValueError: ``x`` is not NHWC with ``in_channels`` channels, the layer
      has a bias map built for another input size, the kernel does not fit
      the padded input, or an unknown ``impl``.
    TypeError: ``layer`` is not a condensed conv.
  """
  kernels = _kernels(_CONV, layer, "condensed_conv")
  layer = layer.for_input(x.shape, name)
  which = resolve_impl(impl)
  if x.shape[0] == 0:
    # An empty batch: no kernel is called (some cannot size their work for it).
    geo = layer.geometry_for(x.shape)
    return jnp.zeros((0, geo.oh, geo.ow, layer.out_channels), _out_dtype(x, layer))
  if which == "pallas" and impl == "auto":
    return condensed_conv_reference(x, layer, precision=None)
  return kernels[which](x, layer)
