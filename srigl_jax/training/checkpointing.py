"""Checkpoints of a training run: orbax, the run's fingerprint, preemption.

`Checkpointer` wraps one orbax `CheckpointManager` over `WORKDIR/checkpoints`:

  * saves are asynchronous: `save` returns once the arrays are copied to the
    host, and orbax writes them in the background into a temporary directory
    that it renames when complete, so a kill at any moment (during a write
    included) leaves the newest complete checkpoint as it was;
  * every checkpoint carries the run's `fingerprint` (the config fields that
    decide what it holds) as its orbax custom metadata; `check_workdir`
    refuses to resume one written by another run before anything is compiled;
  * `reached_preemption(step)` says when to stop: on SIGTERM the trainer
    finishes the step, saves it and exits normally. In a multi-process job
    JAX's preemption sync service (which catches SIGTERM itself) makes every
    process return True at the same step, so all save the same one; a single
    process, which has no such service, catches SIGTERM here.

`fingerprint.json` next to `checkpoints/` is a readable copy of the
fingerprint for tools that read the workdir without orbax (`srigl_jax.export`
records it in the inference manifest); `checkpoint_fingerprint` reads the one a
checkpoint carries.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

CHECKPOINT_DIR = 'checkpoints'
FINGERPRINT_FILE = 'fingerprint.json'
_FINGERPRINT_VERSION = 1
# The order in which the input pipeline reads and augments examples: a numpy
# permutation per epoch and augmentation draws per batch. A checkpoint that
# records another order (or none) was trained on other batches.
DATA_ORDER = 'grain-shuffled-batches/2'

# The fields that decide the shapes and meaning of what a checkpoint holds:
# params (model), masks and their budgets (sparsity), optimizer moments; and
# the data a resumed run goes on to read (the batches of step s depend on
# these and the seed, not on data_dir, worker or thread counts).
FINGERPRINT_FIELDS = (
    'model.name',
    'model.kwargs',
    'model.dtype',
    'input.name',
    'input.image_shape',
    'input.image_size',
    'input.num_classes',
    'input.augment',
    'input.crop_padding',
    'input.randaugment',
    'input.mixup_alpha',
    'input.cutmix_alpha',
    'input.num_train_examples',
    'input.synthetic_seed',
    'batch_size',
    'sparsity.method',
    'sparsity.sparsity',
    'sparsity.distribution',
    'sparsity.erk_power_scale',
    'sparsity.sparse_rule',
    'sparsity.dense_layers',
    'sparsity.no_ablation',
    'sparsity.grad_accumulation',
    'sparsity.group_size',
    'optim.name',
    'seed',
)


class WorkdirMismatchError(ValueError):
  """The workdir holds checkpoints of a run with a different model/optimizer."""


def _jsonable(value: Any) -> Any:
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in sorted(value.items())}
  if isinstance(value, (tuple, list)):
    return [_jsonable(v) for v in value]
  return value


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config fields that define the checkpointed state, as JSON values.

  Args:
    config: the full config.

  Returns:
    Dotted field -> JSON value, plus a format version.
  """
  out: dict[str, Any] = {'version': _FINGERPRINT_VERSION}
  for key in FINGERPRINT_FIELDS:
    node = config
    try:
      for part in key.split('.'):
        node = node[part]
    except (KeyError, AttributeError):
      node = None
    out[key] = _jsonable(node)
  # What a resumed run goes on to read depends on the order of the batch
  # stream too.
  out['data_order'] = DATA_ORDER
  # Momentum on/off changes the optimizer state's structure.
  out['optim.momentum>0'] = bool(config.optim.get('momentum') or 0.0)
  return out


def checkpoint_fingerprint(workdir: str, step: int) -> dict[str, Any] | None:
  """The fingerprint the checkpoint of `step` carries as orbax metadata, or None.

  Args:
    workdir: the run's directory (holding `checkpoints/`).
    step: a complete checkpoint's step.

  Returns:
    The fingerprint; None for a checkpoint without metadata or one that cannot
    be read.
  """
  manager = ocp.CheckpointManager(
      os.path.join(workdir, CHECKPOINT_DIR),
      options=ocp.CheckpointManagerOptions(read_only=True, create=False),
  )
  try:
    custom = getattr(manager.metadata(step), 'custom_metadata', None)
  except Exception:  # pylint: disable=broad-except
    custom = None  # Checkpoints written without metadata; not an error.
  finally:
    manager.close()
  return dict(custom) if custom else None


def _saved_fingerprint(workdir: str) -> tuple[int | None, dict | None]:
  """(newest complete step, its fingerprint) of the workdir's checkpoints.

  The fingerprint comes from the checkpoint's orbax metadata; for a
  checkpoint saved without metadata it comes from `fingerprint.json`. Both
  are None when the workdir holds no complete checkpoint.
  """
  ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(ckpt_dir):
    return None, None
  manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True))
  try:
    step = manager.latest_step()
    if step is None:
      return None, None
    custom = manager.metadata(step).custom_metadata or {}
  finally:
    manager.close()
  if custom:
    return step, dict(custom)
  path = os.path.join(workdir, FINGERPRINT_FILE)
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      return step, json.load(f)
  return step, None


def check_workdir(workdir: str, config: ml_collections.ConfigDict, write: bool = True) -> None:
  """Refuses to resume checkpoints written with another model or sparsity.

  Compares the config's fingerprint with the one stored in the newest
  complete checkpoint; on a workdir without checkpoints it (re)writes
  `fingerprint.json`.

  Args:
    workdir: the run's directory (holding `checkpoints/`).
    config: the full config.
    write: write `fingerprint.json` (only process 0 should).

  Raises:
    WorkdirMismatchError: naming every differing field, both values and the
      fixes.
  """
  mine = json.loads(json.dumps(fingerprint(config)))  # Tuples as lists.
  step, theirs = _saved_fingerprint(workdir)
  if theirs is not None:
    diff = [
        k
        for k in sorted(set(mine) | set(theirs))
        if k != 'version' and mine.get(k) != theirs.get(k)
    ]
    if diff:
      lines = '; '.join(
          f'{k}: checkpoint {theirs.get(k)!r} vs config {mine.get(k)!r}' for k in diff
      )
      raise WorkdirMismatchError(
          f'workdir {workdir} holds checkpoints of a different run ({lines}). '
          'Resuming would mix two models. Use a new --workdir, or run with '
          "the checkpoint's settings, or delete "
          f'{os.path.join(workdir, CHECKPOINT_DIR)} and '
          f'{os.path.join(workdir, FINGERPRINT_FILE)} to start over.'
      )
    return
  if step is not None:
    logging.warning(
        '%s has checkpoints without a fingerprint (written by an ' 'older version); trusting them.',
        workdir,
    )
    return
  if write:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, FINGERPRINT_FILE)
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump(mine, f, indent=1, sort_keys=True)
    os.replace(tmp, path)  # Atomic: a kill never leaves half a fingerprint.


class Checkpointer:
  """Async orbax checkpoints tagged with the run's fingerprint; see module doc.

  Use as a context manager: on exit it waits for the last save to complete
  and puts back the previous SIGTERM handler.

  Args:
    workdir: the run's directory; checkpoints go to `workdir/checkpoints`.
    config: the full config (`keep_checkpoints`, and the fingerprint).
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.directory = os.path.join(workdir, CHECKPOINT_DIR)
    self._metadata = fingerprint(config)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=int(config.keep_checkpoints), create=True, enable_async_checkpointing=True
        ),
    )
    self._sigterm = threading.Event()
    self._previous_handler = None

  def __enter__(self) -> Checkpointer:
    # Several processes: JAX's preemption service owns SIGTERM (a Python
    # handler would replace its C++ one). One process: no service, catch it.
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc_info) -> None:
    self.manager.close()  # Waits for an async save in flight.
    if self._previous_handler is not None:
      signal.signal(signal.SIGTERM, self._previous_handler)
      self._previous_handler = None

  def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning('SIGTERM: saving a checkpoint after the current step.')
    self._sigterm.set()

  def latest_step(self) -> int | None:
    """The newest checkpoint's step (one being written included), or None."""
    return self.manager.latest_step()

  def restore(self, step: int, target: Any) -> Any:
    """The checkpoint at `step`, laid out as `target` (ShapeDtypeStructs)."""
    return self.manager.restore(step, args=ocp.args.StandardRestore(target))

  def save(self, step: int, state: Any) -> None:
    """Starts an async save of `state` at `step`; returns after the D2H copy."""
    self.manager.save(
        step, args=ocp.args.StandardSave(state), custom_metadata=self._metadata, force=True
    )

  def reached_preemption(self, step: int) -> bool:
    """Whether to save at `step` and stop; the same on every process.

    Call it once per step, with increasing steps, on every process.
    """
    # orbax asks JAX's preemption sync service (multi-process); it answers
    # False where the service is not running (one process).
    return bool(self.manager.reached_preemption(step)) or self._sigterm.is_set()
