"""Group-shared fan-in in a mask: checking it, detecting it, condensing it.

With group-shared fan-in (`srigl(..., group_size=G)`, notes section 10) G
consecutive output neurons (columns of the ``(fan_in, out)`` mask) share one
mask column. The grouped condensed formats store that column once per group
(the input indices) and each neuron's own weights, G contiguous weights per
fan-in entry. Structure always comes from the mask.
"""

from __future__ import annotations

import numpy as np

__all__ = ["condense_groups", "detect_group_size", "grouped_by", "validate_group_size"]


def validate_group_size(group_size, what: str) -> int:
  """Checks that ``group_size`` is an int >= 1 (bools refused); returns it."""
  if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)):
    raise ValueError(f"{what}: group_size must be an integer >= 1, got {group_size!r}.")
  if group_size < 1:
    raise ValueError(f"{what}: group_size must be an integer >= 1, got {group_size}.")
  return int(group_size)


def _same_as_next(mask2d: np.ndarray) -> np.ndarray:
  """``(out - 1,)``: whether column j of the mask equals column j + 1."""
  return (mask2d[:, 1:] == mask2d[:, :-1]).all(axis=0)


def grouped_by(mask2d: np.ndarray, group_size: int) -> int | None:
  """None when every group of ``group_size`` columns is uniform, else the first bad group.

  Args:
    mask2d: ``(fan_in, out)`` bool; ``out`` must be a multiple of the group size.
    group_size: G.

  Returns:
    None, or the index of the first group whose G columns are not identical.
  """
  if group_size == 1:
    return None
  same = _same_as_next(mask2d)
  # Column j and j + 1 must agree unless j + 1 starts a new group.
  inside = (np.arange(1, mask2d.shape[1]) % group_size) != 0
  bad = np.nonzero(inside & ~same)[0]
  return None if bad.size == 0 else int(bad[0] // group_size)


def detect_group_size(mask2d: np.ndarray) -> int:
  """The largest G > 1 dividing the width whose groups' columns are all identical, else 1.

  A mask without any active weight is left ungrouped (1): nothing in it says
  how it was trained, and it needs no kernel.

  Args:
    mask2d: ``(fan_in, out)`` bool.

  Returns:
    The group size.
  """
  out = mask2d.shape[1]
  if out < 2 or not mask2d.any():
    return 1
  same = _same_as_next(mask2d)
  for g in range(out, 1, -1):
    if out % g == 0:
      inside = (np.arange(1, out) % g) != 0
      if same[inside].all():
        return g
  return 1


def condense_groups(
    kernel: np.ndarray,
    mask: np.ndarray,
    group_size: int,
    *,
    name: str,
    what: str,
    allow_ragged: bool,
    index_dtype: np.dtype,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(values (n_groups, k, G), indices (n_groups, k), group_ids)`` of a grouped mask.

  Args:
    kernel: ``(fan_in, out)`` weights.
    mask: ``(fan_in, out)`` bool.
    group_size: G; must divide ``out``.
    name: the layer, for error messages.
    what: the function, for error messages.
    allow_ragged: pad groups with fewer inputs up to the largest count
      (index 0, value 0) instead of raising.
    index_dtype: dtype of the indices.

  Returns:
    Each active group's inputs in increasing order and its neurons' weights
    there, G contiguous weights per input; the sorted ids of the active groups.

  Raises:
    ValueError: G does not divide the width, the mask's columns differ inside
      a group, or active groups differ in fan-in (without ``allow_ragged``).
  """
  fan_in, out = mask.shape
  g = group_size
  if out % g:
    raise ValueError(
        f"{what}: layer '{name}' has {out} output neurons, not a multiple of "
        f"group_size={g}; such a layer trains ungrouped, so condense it with "
        "group_size=1 (condense_dense / condense_conv)."
    )
  bad = grouped_by(mask, g)
  if bad is not None:
    raise ValueError(
        f"{what}: layer '{name}' is not grouped by group_size={g}: the mask "
        f"columns of neurons {bad * g}..{bad * g + g - 1} (group {bad}) differ, "
        "but a group's neurons must share one set of inputs. Pass the group "
        "size the layer was trained with (srigl(..., group_size=G)), or "
        "condense it ungrouped."
    )
  n_groups = out // g
  gmask = mask[:, ::g]  # (fan_in, n_groups): one column per group
  counts = gmask.sum(axis=0)
  active = counts > 0
  group_ids = np.nonzero(active)[0].astype(np.int32)
  k = int(counts[active].max()) if group_ids.size else 0
  if group_ids.size and int(counts[active].min()) != k and not allow_ragged:
    raise ValueError(
        f"{what}: layer '{name}' is not constant fan-in: its active groups "
        f"have between {int(counts[active].min())} and {k} inputs (they must "
        "all have the same count; ablated groups have 0). Condense only masks "
        "produced by SRigL's constant fan-in update (srigl_jax.sparsity)."
    )
  cols = gmask.T[active]  # (n_active_groups, fan_in)
  # A stable argsort of ~mask puts each group's inputs first, in increasing
  # order; groups shorter than k are padded with index 0 and value 0.
  order = np.argsort(~cols, axis=1, kind="stable")[:, :k]
  valid = np.take_along_axis(cols, order, axis=1)
  indices = np.where(valid, order, 0).astype(index_dtype)
  per_group = kernel.reshape(fan_in, n_groups, g)[:, active].transpose(1, 0, 2)
  values = np.take_along_axis(per_group, order[:, :, None], axis=1)
  values = np.where(valid[:, :, None], values, 0).astype(kernel.dtype)
  return values, indices, group_ids
