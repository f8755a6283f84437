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
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from srigl_jax.condensed._outputs import check_grouped_rows, check_rows, finish_outputs
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

  def validate(self) -> ConvertedModel:
    """Checks every condensed and structured layer's arrays on the host; returns the model.

    What `CondensedLayer.validate` (`GroupedCondensedLayer.validate` for a
    layer with ``group_size`` > 1 in the plan) checks, for each layer the
    plan stores condensed: shapes that agree, indices (taps) within the
    layer's fan-in, neuron (group) ids strictly increasing within its
    outputs (groups); for each layer stored structured, one neuron id per
    kept neuron, strictly increasing within its outputs, and a bias of its
    output width. `convert_model` calls it on what it built, and
    `srigl_jax.serving`'s loader on the variables it reads, so that no
    kernel meets an index out of range.

    Returns:
      This model.

    Raises:
      ValueError: naming the first layer that fails, the array, and for a
        value out of range its position, the value and the valid range.
    """
    params = self.variables.get("params", {})
    for path, entry in self.plan["layers"].items():
      if entry["format"] not in ("condensed", "structured"):
        continue
      name = f"layer '{path}'"
      # Plans written before grouped formats existed have no group_size.
      g = entry.get("group_size", 1)
      if isinstance(g, bool) or not isinstance(g, int) or g < 1:
        raise ValueError(f"{name}: the plan's group_size {g!r} is not an integer >= 1.")
      node = params
      for key in path.split("/"):
        node = node.get(key) if isinstance(node, Mapping) else None
      if entry["format"] == "structured":
        _check_structured(name, node, entry["neurons"])
        continue
      index_key = "taps" if entry["kind"] == "conv" else "indices"
      id_key = "group_ids" if g > 1 else "neuron_ids"
      want = ("values", index_key, id_key, "bias")
      if not isinstance(node, Mapping) or any(k not in node for k in want):
        have = sorted(node) if isinstance(node, Mapping) else []
        raise ValueError(f"{name}: stored condensed, its params need {list(want)}, got {have}.")
      # The kernel size of a conv belongs to the module definition; the taps
      # index the flat (kh, kw, cin) fan-in, which the plan records (and which
      # `_apply_condensed_layer` checks against the module).
      arrays = dict(
          name=name,
          values=node["values"],
          indices=node[index_key],
          bias=node["bias"],
          fan_in=entry["dense_fan_in"],
          n_outputs=entry["neurons"],
          index_name=index_key,
      )
      if g > 1:
        check_grouped_rows(**arrays, group_ids=node["group_ids"], group_size=g)
      else:
        check_rows(**arrays, neuron_ids=node["neuron_ids"])
    return self

  def apply(self, x, impl: str = "auto"):
    """Logits of the converted model (not jitted; wrap it in `jax.jit`)."""
    return condensed_apply(self.model, self.variables, self.plan, x, impl=impl)

  __call__ = apply


def _check_structured(name: str, node, neurons: int) -> None:
  """Checks a structured layer's neuron ids: one per kept neuron, strictly increasing."""
  want = ("kernel", "neuron_ids", "bias")
  if not isinstance(node, Mapping) or any(k not in node for k in want):
    have = sorted(node) if isinstance(node, Mapping) else []
    raise ValueError(f"{name}: stored structured, its params need {list(want)}, got {have}.")
  kept = int(np.shape(node["kernel"])[-1]) if np.ndim(node["kernel"]) else -1
  ids = np.asarray(node["neuron_ids"])
  if ids.shape != (kept,):
    raise ValueError(
        f"{name}: neuron_ids has shape {ids.shape} but the kernel keeps {kept} neurons."
    )
  # The rows checked are empty: only the ids and the bias are.
  empty = np.zeros((kept, 0), np.float32)
  check_rows(
      name,
      values=empty,
      indices=empty.astype(np.int32),
      neuron_ids=ids,
      bias=node["bias"],
      fan_in=1,
      n_outputs=neurons,
  )


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
  # The fan-in spelled out: -1 cannot be inferred when lead holds a 0 (batch 0).
  return lead, x.reshape(*lead, math.prod(entry["in_shape"]))


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
    if in_channels * kernel_size[0] * kernel_size[1] != entry["dense_fan_in"]:
      raise ValueError(
          f"{name}: the plan's fan-in {entry['dense_fan_in']} is not a multiple of the "
          f"module's {kernel_size[0]}x{kernel_size[1]} kernel."
      )
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
  bias = p["bias"].astype(y.dtype)
  # neuron_ids is strictly increasing within the outputs (structured_from_mask
  # builds it so), so as many kept neurons as outputs means nothing moves.
  y = finish_outputs(y, p["neuron_ids"], bias, compact=y.shape[-1] == bias.shape[0])
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
