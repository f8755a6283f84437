"""Numerical faults: detect a non-finite loss or gradient, stop or skip.

Inside the jitted train step (no host sync):

    flags = faults.finite_flags(grads)              # bool[n_leaves]
    new_state = state.apply_gradients(grads=grads)
    if skip_bad_steps:
      new_state = faults.keep_if_finite(faults.step_ok(loss, flags),
                                        new_state, state)
    metrics = {'loss': loss, ..., faults.GRAD_FINITE: flags}

On the host, when the step metrics are fetched anyway (every `log_every`
steps), `FaultMonitor.check` raises `NonFiniteError` naming the step and the
first layer whose gradient is not finite, or, in skip mode, counts the skipped
steps and stops only after too many in a row. A run that stops here never
writes a checkpoint of a poisoned state: the trainer checks the metrics of all
pending steps before it saves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from srigl_jax.sparsity import layers as layers_lib
from srigl_jax.sparsity import transform as sparse_transform

GRAD_FINITE = 'grad_finite'


class NonFiniteError(FloatingPointError):
  """The loss or a gradient became NaN or infinite.

  Attributes:
    step: the train step (1-based) where it first appeared.
    layer: the first parameter (input side first) with a non-finite gradient,
      or None when only the loss was non-finite.
  """

  def __init__(self, message: str, step: int, layer: str | None):
    super().__init__(message)
    self.step = step
    self.layer = layer


def leaf_paths(tree: Any) -> list[str]:
  """'/'-joined paths of the leaves of `tree`, in `jax.tree.leaves` order."""
  return [layers_lib.path_str(kp) for kp, _ in jax.tree_util.tree_leaves_with_path(tree)]


def finite_flags(tree: Any) -> jax.Array:
  """bool[n_leaves]: whether every entry of each leaf is finite (jittable)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.ones((0,), bool)
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def step_ok(loss: jax.Array, flags: jax.Array) -> jax.Array:
  """Scalar bool: the loss and all gradients are finite."""
  return jnp.isfinite(loss) & jnp.all(flags)


def keep_if_finite(ok: jax.Array, new_state: Any, old_state: Any) -> Any:
  """Skips a bad step: the old params/moments/masks, the new step counters.

  The step counters (the TrainState's `step` and the sparse optimizer's
  `count`) advance anyway so that the data order, the learning-rate schedule
  and the mask-update schedule stay aligned with the trainer's step; a mask
  update due at a skipped step is skipped with it.

  Args:
    ok: scalar bool, `step_ok(...)`.
    new_state: the state after the step (a flax TrainState).
    old_state: the state before it.

  Returns:
    `new_state` if ok, else `old_state` with the new counters.
  """
  kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new_state, old_state)
  return kept.replace(
      step=new_state.step,
      opt_state=sparse_transform.with_counts_of(kept.opt_state, new_state.opt_state),
  )


def describe(flags: np.ndarray, names: Sequence[str]) -> str:
  """Names the layers whose gradient is not finite (input side first)."""
  bad = [names[i] for i in np.flatnonzero(~np.asarray(flags, bool))]
  if not bad:
    return 'all gradients finite'
  more = f' and {len(bad) - 1} more' if len(bad) > 1 else ''
  return f'first non-finite gradient in layer {bad[0]!r}{more}'


class FaultMonitor:
  """Host-side check of the fetched step metrics; see the module doc.

  Args:
    param_names: `leaf_paths(params)`, the order of the `GRAD_FINITE` flags.
    layer_order: optional path -> rank to report the input-side layer first
      (pytrees sort dict keys, which puts 'head' before 'stem').
    skip_bad_steps: count bad steps instead of stopping (the train step must
      then use `keep_if_finite`).
    max_consecutive_skips: stop anyway after this many bad steps in a row
      (a run that diverged will not recover by skipping).
  """

  def __init__(
      self,
      param_names: Sequence[str],
      layer_order: dict[str, int] | None = None,
      skip_bad_steps: bool = False,
      max_consecutive_skips: int = 20,
  ):
    order = layer_order or {}
    rank = {n: (order.get(n.rsplit('/', 1)[0], len(order)), i) for i, n in enumerate(param_names)}
    self._perm = sorted(range(len(param_names)), key=lambda i: rank[param_names[i]])
    self._names = [param_names[i] for i in self._perm]
    self.skip_bad_steps = skip_bad_steps
    self.max_consecutive_skips = max_consecutive_skips
    self.skipped_steps = 0
    self._in_a_row = 0

  def check(
      self, steps: Sequence[int], values: Sequence[dict[str, Any]], last_checkpoint: int | None
  ) -> list[bool]:
    """Checks fetched step metrics in step order.

    Args:
      steps: the 1-based steps of `values`.
      values: per step {'loss', GRAD_FINITE (optional), ...} as numpy.
      last_checkpoint: the latest saved step, for the message.

    Returns:
      Per step, whether it was applied (False: skipped).

    Raises:
      NonFiniteError: the first bad step (not in skip mode, or too many
        skipped in a row).
    """
    applied = []
    for step, v in zip(steps, values):
      loss = float(np.asarray(v['loss']))
      flags = (
          np.asarray(v.get(GRAD_FINITE, np.ones(len(self._names), bool)), bool)[self._perm]
          if len(self._names)
          else np.ones(0, bool)
      )
      if np.isfinite(loss) and flags.all():
        self._in_a_row = 0
        applied.append(True)
        continue
      head = (
          f'Non-finite training loss ({loss}) at step {step}'
          if not np.isfinite(loss)
          else f'Non-finite gradient at step {step} (loss {loss})'
      )
      what = describe(flags, self._names)
      bad = np.flatnonzero(~flags)
      layer = self._names[bad[0]] if bad.size else None
      if self.skip_bad_steps and self._in_a_row < self.max_consecutive_skips:
        self._in_a_row += 1
        self.skipped_steps += 1
        logging.warning('%s; %s. Skipped it (%d skipped so far).', head, what, self.skipped_steps)
        applied.append(False)
        continue
      extra = f' after {self._in_a_row} skipped steps in a row' if self.skip_bad_steps else ''
      ckpt = (
          'no checkpoint was saved yet'
          if last_checkpoint is None
          else f'the latest checkpoint (step {last_checkpoint}) predates it and ' 'is kept'
      )
      raise NonFiniteError(
          f'{head}{extra}; {what}; stopping: {ckpt}. Lower optim.learning_rate, set '
          'optim.grad_clip_norm, or check the input data, then rerun the '
          'same command to resume (or set skip_bad_steps=True to drop such '
          'steps).',
          step,
          layer,
      )
    return applied
