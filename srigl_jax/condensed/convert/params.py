"""`condense()`: the sparse layers of a params tree in their inference format.

It sees only parameters and masks, not the model: it knows a Dense kernel
(rank 2) fully, but not a convolution's strides, padding or input size, nor
which axes of a higher-rank kernel are its fan-in. So it condenses Dense
kernels only; convolutions are condensed by `convert_model` (the whole model)
or `condense_conv(kernel, mask, strides=..., padding=...)` (one layer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np

from srigl_jax.condensed.dense import condense_dense, fan_in_counts
from srigl_jax.condensed.structured import structured_from_mask

__all__ = ["condense"]

_ON_UNSUPPORTED = ("error", "structured")


def condense(
    params: Mapping[str, Any],
    masks: Mapping[str, Any],
    *,
    on_unsupported: Literal["error", "structured"] = "error",
) -> dict:
  """Converts every sparse Dense layer of a params tree into a `CondensedLayer`.

  A layer is a dict with a ``'kernel'`` (and optionally a ``'bias'``) whose
  mask is a bool array. A rank-2 kernel with a constant fan-in mask becomes
  a `CondensedLayer` in place of the dict. Every other sparse kernel cannot
  be condensed here: a mask that is not constant fan-in (RigL, SET), a Conv
  kernel (rank 4: this function does not know its strides, padding or input
  size) or a kernel of another rank (e.g. a 3-D attention kernel). For those
  ``on_unsupported`` decides: ``'error'`` raises, naming the layer and the
  fix; ``'structured'`` returns a `StructuredLayer` (ablated neurons, those
  with no active weight along the last axis, removed; the kernel kept dense).
  Dense leaves (mask None) are copied unchanged; a masked leaf outside a
  kernel is returned with its masked entries zeroed. The result is a plain
  pytree: save it with orbax and serve it without training code.

  Args:
    params: the params tree (nested dicts, as Flax produces).
    masks: a tree of the same structure, bool arrays for sparse leaves and
      None for dense ones.
    on_unsupported: ``'error'`` or ``'structured'`` (see above).

  Returns:
    A nested dict mirroring ``params``.

  Raises:
    ValueError: a sparse layer cannot be condensed while
      ``on_unsupported='error'`` (for a Conv kernel the message points to
      `convert_model` and `condense_conv`), a layer has parameters besides
      kernel and bias, or the masks do not mirror the params.
  """
  if on_unsupported not in _ON_UNSUPPORTED:
    raise ValueError(
        f"condense: on_unsupported must be one of {_ON_UNSUPPORTED}, got {on_unsupported!r}"
    )
  return _condense_node(params, masks, (), on_unsupported)


def _name(path) -> str:
  return "/".join(str(p) for p in path) or "<root>"


def _why_not_condensable(kernel: np.ndarray, mask: np.ndarray) -> str | None:
  if kernel.ndim == 4:
    return (
        f"is a Conv kernel {kernel.shape}; condense() does not know its strides, "
        "padding or input size. Condense convolutions with convert_model(model, "
        "variables, masks, sample_input) for the whole model, or condense_conv("
        "kernel, mask, bias, strides=..., padding=...) for one layer"
    )
  if kernel.ndim != 2:
    return (
        f"has a sparse kernel of rank {kernel.ndim} (shape {kernel.shape}); only "
        "Dense (in, out) kernels are condensed here. Reshape it to (fan_in, "
        "neurons) and use condense_dense(), or convert the whole model with "
        "convert_model()"
    )
  if mask.shape != kernel.shape:
    return None  # condense_dense names the mismatch
  counts = fan_in_counts(mask)
  active = counts[counts > 0]
  if active.size and active.min() != active.max():
    return (
        f"is not constant fan-in: its active neurons have between {int(active.min())} "
        f"and {int(active.max())} non-zero inputs (they must all have the same "
        "count; ablated neurons have 0). Condense only masks produced by "
        "SRigL's constant fan-in update (srigl_jax.sparsity), not RigL/SET masks"
    )
  return None


def _condense_node(node, mask_node, path, on_unsupported):
  if not isinstance(node, Mapping):
    if mask_node is None:
      return node
    return jnp.asarray(np.where(np.asarray(mask_node), np.asarray(node), 0))
  if mask_node is None:
    mask_node = {}
  if not isinstance(mask_node, Mapping):
    raise ValueError(
        f"condense: masks at '{_name(path)}' is a leaf but params is a dict; "
        "masks must mirror the params tree."
    )
  kernel_mask = mask_node.get("kernel")
  if "kernel" in node and kernel_mask is not None:
    name = _name(path)
    others = set(node) - {"kernel", "bias"}
    if others:
      raise ValueError(
          f"condense: layer '{name}' has parameters {sorted(others)} besides "
          "kernel and bias; only Dense and Conv layers have a sparse inference form."
      )
    kernel, mask, bias = np.asarray(node["kernel"]), np.asarray(kernel_mask), node.get("bias")
    why_not = _why_not_condensable(kernel, mask)
    if why_not is None:
      return condense_dense(kernel, mask, bias, name=name)
    if on_unsupported == "error":
      raise ValueError(
          f"condense: layer '{name}' {why_not}. Or pass on_unsupported='structured' "
          "to keep it with its ablated neurons removed and a dense kernel."
      )
    return structured_from_mask(kernel, mask, bias, name=name)
  return {
      key: _condense_node(value, mask_node.get(key), path + (key,), on_unsupported)
      for key, value in node.items()
  }
