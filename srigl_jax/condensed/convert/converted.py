"""A converted model, and running it: `ConvertedModel` and `condensed_apply`.

The converted model runs the *unchanged* Flax model definition under a method
interceptor that routes every converted layer (per the plan) to its kernel:
condensed layers to `condensed_matmul` / `condensed_conv` (grouped layers,
``group_size > 1`` in the plan, in their grouped format), structured ones to
a dense matmul or convolution of the kept neurons, and folded BatchNorms to
the identity. The variables hold arrays only, so orbax saves them as they
are, and ``ConvertedModel(model, variables, plan)`` rebuilds the model from a
saved plan.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from srigl_jax.condensed.conv import (
    CondensedConv,
    GroupedCondensedConv,
    conv_geometry,
    normalize_padding,
)
from srigl_jax.condensed.convert.analysis import module_path
from srigl_jax.condensed.dense import CondensedLayer, GroupedCondensedLayer
from srigl_jax.condensed.dispatch import condensed_conv, condensed_matmul

__all__ = ["ConvertedModel", "as_pair", "condensed_apply"]


@dataclasses.dataclass
class ConvertedModel:
  """A model converted for inference.

  Attributes:
    model: the original Flax module (its definition is unchanged).
    variables: ``{'params': ..., 'batch_stats': ...}`` with converted layers;
      arrays only, so orbax saves it as it is.
    plan: a JSON-serialisable description: per layer its kind, format,
      group size, neurons, active neurons, fan-in and density; the folded
      BatchNorms; the input size a per-position bias map was built for.
  """

  model: nn.Module
  variables: Any
  plan: dict

  def apply(self, x, impl: str = "auto"):
    """Logits of the converted model (not jitted; wrap it in `jax.jit`)."""
    return condensed_apply(self.model, self.variables, self.plan, x, impl=impl)

  __call__ = apply


def as_pair(v) -> tuple[int, int]:
  """A Flax conv's strides or dilation (None, an int or a pair) as a pair."""
  if v is None:
    return (1, 1)
  if isinstance(v, int):
    return (v, v)
  return tuple(int(s) for s in v)


def _flatten_dense_input(module, entry, x):
  """``(lead shape, x as (..., fan_in))``; checks x ends in the converted fan-in shape."""
  n_in = len(entry["in_shape"])
  if tuple(x.shape[x.ndim - n_in :]) != tuple(entry["in_shape"]):
    raise ValueError(
        f"layer '{module_path(module)}': input of shape {tuple(x.shape)} does "
        f"not end in the converted fan-in shape {tuple(entry['in_shape'])}."
    )
  lead = x.shape[: x.ndim - n_in]
  return lead, x.reshape(*lead, -1)


def _apply_condensed_layer(module, entry, x, impl):
  p = module.variables["params"]
  name = f"layer '{module_path(module)}'"
  # Plans written before grouped formats existed have no group_size.
  g = entry.get("group_size", 1)
  rows = (
      {"group_ids": p["group_ids"], "group_size": g} if g > 1 else {"neuron_ids": p["neuron_ids"]}
  )
  if entry["kind"] == "conv":
    kernel_size = as_pair(module.kernel_size)
    strides = as_pair(module.strides)
    padding = normalize_padding(module.padding)
    in_channels = entry["dense_fan_in"] // (kernel_size[0] * kernel_size[1])
    geometry = None
    if entry.get("input_hw") is not None:
      geometry = conv_geometry(tuple(entry["input_hw"]), in_channels, kernel_size, strides, padding)
    layer_type = GroupedCondensedConv if g > 1 else CondensedConv
    layer = layer_type(
        values=p["values"],
        taps=p["taps"],
        bias=p["bias"],
        bias_map=p.get("bias_map"),
        kernel_size=kernel_size,
        in_channels=in_channels,
        out_channels=int(p["bias"].shape[0]),
        strides=strides,
        padding=padding,
        geometry=geometry,
        **rows,
    )
    return condensed_conv(x, layer, impl, name=name)
  lead, x2 = _flatten_dense_input(module, entry, x)
  layer_type = GroupedCondensedLayer if g > 1 else CondensedLayer
  layer = layer_type(
      values=p["values"],
      indices=p["indices"],
      bias=p["bias"],
      in_features=entry["dense_fan_in"],
      out_features=int(p["bias"].shape[0]),
      **rows,
  )
  y = condensed_matmul(x2, layer, impl, name=name)
  return y.reshape(*lead, *entry["out_shape"])


def _apply_structured_layer(module, entry, x):
  p = module.variables["params"]
  if entry["kind"] == "conv":
    y = jax.lax.conv_general_dilated(
        x,
        p["kernel"].astype(x.dtype),
        window_strides=as_pair(module.strides),
        padding=normalize_padding(module.padding),
        lhs_dilation=as_pair(module.input_dilation),
        rhs_dilation=as_pair(module.kernel_dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
  else:
    lead, x2 = _flatten_dense_input(module, entry, x)
    y = x2 @ p["kernel"].astype(x.dtype)
  bias = p["bias"]
  full = jnp.broadcast_to(bias.astype(y.dtype), (*y.shape[:-1], bias.shape[0]))
  y = full.at[..., p["neuron_ids"]].add(y)
  if p.get("bias_map") is not None:
    y = y + p["bias_map"].astype(y.dtype)
  if entry["kind"] != "conv":
    y = y.reshape(*lead, *entry["out_shape"])
  return y


def _interceptor(plan: Mapping[str, Any], impl: str):
  layers = plan["layers"]
  folded = set(plan.get("folded_batchnorms", {}))

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    path = module_path(context.module)
    if path in folded:
      return args[0]
    entry = layers.get(path)
    if entry is None or entry["format"] == "dense":
      return next_fun(*args, **kwargs)
    x = jnp.asarray(args[0])
    if entry["format"] == "condensed":
      return _apply_condensed_layer(context.module, entry, x, impl)
    return _apply_structured_layer(context.module, entry, x)

  return interceptor


def condensed_apply(model: nn.Module, variables, plan, x, *, impl: str = "auto", **kwargs):
  """Runs ``model`` on converted variables (see `convert_model`).

  Args:
    model: the original Flax module.
    variables: `ConvertedModel.variables`.
    plan: `ConvertedModel.plan`.
    x: the model input.
    impl: kernel choice: 'auto', 'native', 'pallas', 'xla' or 'reference'.
    **kwargs: passed to ``model.apply`` (the eval mode is the default).

  Returns:
    What ``model.apply`` returns.
  """
  with nn.intercept_methods(_interceptor(plan, impl)):
    return model.apply(variables, x, **kwargs)
