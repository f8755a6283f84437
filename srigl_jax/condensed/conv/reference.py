"""The plain-jnp reference of the condensed convolution, which the tests compare against."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from srigl_jax.condensed.conv.format import CondensedConv, GroupedCondensedConv

__all__ = ["condensed_conv_reference"]


@functools.partial(jax.jit, static_argnames=("precision",))
def condensed_conv_reference(
    x: jax.Array,
    layer: CondensedConv | GroupedCondensedConv,
    *,
    precision=jax.lax.Precision.HIGHEST,
) -> jax.Array:
  """Densifies the kernel and runs `lax.conv_general_dilated` with the layer's padding.

  It does not use the plane layout, so it checks the kernels' geometry too.
  With ``precision=None`` (the backend's default) it is what
  `condensed_conv(impl='auto')` runs on GPUs.

  Args:
    x: ``(b, h, w, cin)`` NHWC input.
    layer: the condensed conv, grouped or not.
    precision: of the convolution (full fp32 by default).

  Returns:
    ``(b, oh, ow, cout)`` in the promoted dtype of x and the values;
    differentiable.
  """
  dtype = jnp.result_type(x.dtype, layer.values.dtype)
  y = jax.lax.conv_general_dilated(
      x.astype(dtype),
      layer.to_dense().astype(dtype),
      window_strides=layer.strides,
      padding=layer.padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=precision,
  )
  y = y + layer.bias_or_zeros(dtype)
  if layer.bias_map is not None:
    y = y + layer.bias_map.astype(dtype)
  return y
