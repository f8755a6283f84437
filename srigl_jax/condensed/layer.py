"""Condensed storage of constant fan-in sparse layers, and `condense()`.

A Dense kernel trained with SRigL has, for every *active* output neuron, the
same number ``k`` of non-zero inputs; *ablated* neurons have none. The
condensed form stores only what a forward pass needs::

    values   (n_active, k)   the non-zero weights of each active neuron
    indices  (n_active, k)   their input positions (int16 when in <= 32768)
    neuron_ids (n_active,)   which output column each row feeds
    bias     (out,) or None  the full bias; ablated columns output only this

    y[b, neuron_ids[j]] = sum_k x[b, indices[j, k]] * values[j, k] + bias[...]

Structure always comes from the mask, never from weight values, so a trained
weight that happens to be exactly zero is still stored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import flax.struct
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CondensedLayer",
    "StructuredLayer",
    "condense",
    "condense_dense",
    "structured_from_mask",
    "index_dtype_for",
]

# The largest input dimension whose indices fit in int16.
_INT16_LIMIT = 2**15


def index_dtype_for(in_features: int) -> np.dtype:
  """The narrowest index dtype that can address `in_features` inputs.

  Args:
    in_features: the layer's input dimension.

  Returns:
    ``np.int16`` when every index fits (``in_features <= 32768``), else
    ``np.int32``.
  """
  return np.dtype(np.int16 if in_features <= _INT16_LIMIT else np.int32)


@flax.struct.dataclass
class CondensedLayer:
  """A constant fan-in sparse Dense layer in condensed form (a pytree).

  Attributes:
    values: ``(n_active, k)`` weights of the active neurons.
    indices: ``(n_active, k)`` int16/int32 input index of each weight.
    neuron_ids: ``(n_active,)`` int32, sorted output column of each row.
    bias: ``(out_features,)`` or None.
    in_features: input dimension (static).
    out_features: output dimension, ablated neurons included (static).
  """

  values: Any
  indices: Any
  neuron_ids: Any
  bias: Any
  in_features: int = flax.struct.field(pytree_node=False)
  out_features: int = flax.struct.field(pytree_node=False)

  @property
  def n_active(self) -> int:
    return int(self.values.shape[0])

  @property
  def fan_in(self) -> int:
    return int(self.values.shape[1])

  @property
  def is_compact(self) -> bool:
    """True when every output column is active (no scatter is needed)."""
    # neuron_ids are sorted and unique, so equal counts mean ids == arange.
    return self.n_active == self.out_features

  def bias_or_zeros(self, dtype=jnp.float32):
    """The full ``(out_features,)`` bias, zeros when the layer has none."""
    if self.bias is None:
      return jnp.zeros((self.out_features,), dtype)
    return jnp.asarray(self.bias, dtype)

  def to_dense(self) -> jnp.ndarray:
    """The equivalent masked dense kernel ``(in_features, out_features)``."""
    kernel = jnp.zeros((self.in_features, self.out_features), self.values.dtype)
    cols = jnp.broadcast_to(self.neuron_ids[:, None], self.indices.shape)
    # .add, not .set: padded entries (value 0 at index 0) must not overwrite.
    return kernel.at[self.indices.astype(jnp.int32), cols].add(self.values)


@flax.struct.dataclass
class StructuredLayer:
  """A sparse layer with its ablated output neurons removed (a pytree).

  The kept kernel is still dense (masked weights are zero) but only has the
  active neurons on its last axis, so a plain dense matmul or convolution
  computes the active outputs; ``neuron_ids`` places them in the full output.

  Attributes:
    kernel: ``(..., n_active)`` masked kernel of the active neurons.
    neuron_ids: ``(n_active,)`` int32 output position of each kept neuron.
    bias: ``(out_features,)`` or None.
    out_features: output dimension, ablated neurons included (static).
  """

  kernel: Any
  neuron_ids: Any
  bias: Any
  out_features: int = flax.struct.field(pytree_node=False)


def _name(path) -> str:
  if isinstance(path, str):
    return path
  return "/".join(str(p) for p in path) or "<root>"


def _active_and_counts(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  counts = mask.reshape(-1, mask.shape[-1]).sum(axis=0)
  return counts > 0, counts


def condense_dense(
    kernel,
    mask,
    bias=None,
    *,
    name: str = "<layer>",
    allow_ragged: bool = False,
    drop_ablated: bool = False,
    index_dtype=None,
) -> CondensedLayer:
  """Condenses one Dense kernel from its constant fan-in mask (on the host).

  Args:
    kernel: ``(in, out)`` weights (Flax Dense layout).
    mask: ``(in, out)`` bool; True where a weight is active.
    bias: optional ``(out,)`` bias.
    name: layer name used in error messages.
    allow_ragged: pad neurons with fewer non-zeros up to the largest fan-in
      (index 0, value 0) instead of raising. Only the model converter uses
      this, after it has removed the inputs of ablated neurons.
    drop_ablated: return a compact layer of the active neurons only
      (``out_features == n_active``); their bias is kept, ablated ones are
      dropped, so the caller must account for the ablated outputs.
    index_dtype: override the index dtype (default: `index_dtype_for`).

  Returns:
    The `CondensedLayer`.

  Raises:
    ValueError: the kernel is not 2-D, shapes disagree, or active neurons do
      not all have the same fan-in.
  """
  kernel = np.asarray(kernel)
  mask = np.asarray(mask)
  if kernel.ndim != 2:
    raise ValueError(
        f"condense: layer '{name}' has a kernel of rank {kernel.ndim} (shape "
        f"{kernel.shape}); condensing needs a Dense kernel of shape (in, out). "
        "Reshape it to (fan_in, neurons) first, or keep it masked-dense "
        "(condense(..., on_unsupported='mask'))."
    )
  if mask.shape != kernel.shape:
    raise ValueError(
        f"condense: layer '{name}' has mask shape {mask.shape} but kernel "
        f"shape {kernel.shape}; pass the mask that belongs to this kernel."
    )
  if mask.dtype != np.bool_:
    raise ValueError(
        f"condense: layer '{name}' mask has dtype {mask.dtype}; masks must be "
        "bool arrays (True = active weight)."
    )
  in_features, out_features = kernel.shape
  active, counts = _active_and_counts(mask)
  neuron_ids = np.nonzero(active)[0].astype(np.int32)
  active_counts = counts[active]
  k = int(active_counts.max()) if active_counts.size else 0
  if active_counts.size and int(active_counts.min()) != k and not allow_ragged:
    raise ValueError(
        f"condense: layer '{name}' is not constant fan-in: its active neurons "
        f"have between {int(active_counts.min())} and {k} non-zero inputs "
        "(they must all have the same count; ablated neurons have 0). "
        "Condense only masks produced by SRigL's constant fan-in update "
        "(srigl_jax.sparsity), not RigL/SET masks."
    )
  index_dtype = np.dtype(index_dtype or index_dtype_for(in_features))
  cols = mask.T[active]  # (n_active, in), one row per active neuron
  # Stable argsort of ~mask puts each row's active inputs first, in
  # increasing input order; rows shorter than k are padded with inactive
  # positions that then get value 0 and index 0.
  order = np.argsort(~cols, axis=1, kind="stable")[:, :k]
  valid = np.take_along_axis(cols, order, axis=1)
  indices = np.where(valid, order, 0).astype(index_dtype)
  values = np.where(valid, kernel.T[active][np.arange(len(order))[:, None], order], 0)
  values = values.astype(kernel.dtype)
  bias_out = None if bias is None else np.asarray(bias)
  if drop_ablated:
    if bias_out is not None:
      bias_out = bias_out[neuron_ids]
    out_features = int(neuron_ids.size)
    neuron_ids = np.arange(out_features, dtype=np.int32)
  return CondensedLayer(
      values=jnp.asarray(values),
      indices=jnp.asarray(indices),
      neuron_ids=jnp.asarray(neuron_ids),
      bias=None if bias_out is None else jnp.asarray(bias_out),
      in_features=int(in_features),
      out_features=int(out_features),
  )


def structured_from_mask(kernel, mask, bias=None, *, name: str = "<layer>") -> StructuredLayer:
  """Removes the ablated output neurons (last axis) of a sparse kernel.

  Works for Dense ``(in, out)`` and Conv ``(kh, kw, cin, cout)`` kernels and
  does not need constant fan-in.

  Args:
    kernel: the weights; neurons on the last axis.
    mask: bool array of the same shape.
    bias: optional ``(out,)`` bias.
    name: layer name used in error messages.

  Returns:
    The `StructuredLayer` holding the masked kernel of the active neurons.

  Raises:
    ValueError: on a shape or dtype mismatch.
  """
  kernel = np.asarray(kernel)
  mask = np.asarray(mask)
  if mask.shape != kernel.shape or mask.dtype != np.bool_:
    raise ValueError(
        f"condense: layer '{name}' needs a bool mask of the kernel's shape "
        f"{kernel.shape}, got {mask.dtype} {mask.shape}."
    )
  if kernel.ndim < 2:
    raise ValueError(
        f"condense: layer '{name}' kernel has rank {kernel.ndim}; sparse "
        "kernels have their neurons on the last axis and at least 2 axes."
    )
  active, _ = _active_and_counts(mask)
  ids = np.nonzero(active)[0].astype(np.int32)
  kept = np.where(mask, kernel, 0)[..., ids]
  return StructuredLayer(
      kernel=jnp.asarray(kept),
      neuron_ids=jnp.asarray(ids),
      bias=None if bias is None else jnp.asarray(bias),
      out_features=int(kernel.shape[-1]),
  )


def condense(
    params: Mapping[str, Any],
    masks: Mapping[str, Any],
    *,
    on_unsupported: Literal["error", "mask"] = "error",
) -> dict:
  """Converts every sparse layer of a params tree into its inference form.

  Sparse Dense kernels (rank 2, mask is a bool array) become a
  `CondensedLayer` in place of the layer's ``{'kernel', 'bias'}`` dict; sparse
  Conv kernels (rank 4) become a `StructuredLayer` with the ablated output
  channels removed. Dense leaves (mask None) are copied unchanged. The result
  is a plain pytree: save it with orbax and serve it without training code.

  Args:
    params: the params tree (nested dicts, as Flax produces).
    masks: a tree of the same structure, bool arrays for sparse leaves and
      None for dense ones.
    on_unsupported: what to do with a sparse kernel of another rank (e.g. a
      3-D attention kernel): ``'error'`` raises, ``'mask'`` keeps it as a
      masked dense kernel.

  Returns:
    A nested dict mirroring ``params``.

  Raises:
    ValueError: a mask is not constant fan-in, or a kernel has an
      unsupported rank while ``on_unsupported='error'``.
  """
  if on_unsupported not in ("error", "mask"):
    raise ValueError(f"on_unsupported must be 'error' or 'mask', got {on_unsupported!r}")
  return _condense_node(params, masks, (), on_unsupported)


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
    kernel = np.asarray(node["kernel"])
    others = set(node) - {"kernel", "bias"}
    if others:
      raise ValueError(
          f"condense: layer '{name}' has parameters {sorted(others)} besides "
          "kernel and bias; only Dense/Conv layers can be condensed."
      )
    if kernel.ndim == 2:
      return condense_dense(kernel, kernel_mask, node.get("bias"), name=name)
    if kernel.ndim == 4:
      return structured_from_mask(kernel, kernel_mask, node.get("bias"), name=name)
    if on_unsupported == "error":
      raise ValueError(
          f"condense: layer '{name}' has a sparse kernel of rank {kernel.ndim} "
          f"(shape {kernel.shape}); only Dense (in, out) kernels are condensed "
          "and Conv (kh, kw, cin, cout) kernels structured. Pass "
          "on_unsupported='mask' to keep it as a masked dense kernel, or "
          "reshape it to (fan_in, neurons) and use condense_dense()."
      )
  return {
      key: _condense_node(value, mask_node.get(key), path + (key,), on_unsupported)
      for key, value in node.items()
  }
