"""The state of a training workdir: its lock, checkpoints, fingerprint, preemption.

`workdir_lock(workdir)` holds an OS lock (`fcntl.flock`) on
`WORKDIR/trainer.lock` for a whole training run, so a second trainer started
on the same workdir stops at once (`WorkdirLockedError`, naming the PID and
host that hold it). The OS drops the lock when its process dies, however it
dies, so a killed run never leaves a lock that blocks the next one. Reading a
workdir (export, reports) takes no lock.

`Checkpointer` wraps one orbax `CheckpointManager` over `WORKDIR/checkpoints`:

  * saves are asynchronous: `save` returns once the arrays are copied to the
    host, and orbax writes them in the background into a temporary directory
    that it renames when complete, so a kill at any moment (during a write
    included) leaves the newest complete checkpoint as it was;
  * every checkpoint carries the run's `fingerprint` (every config field that
    decides the trajectory) as its orbax custom metadata; `check_workdir`
    refuses to resume one written by another run before anything is compiled;
  * `restore_newest` restores the newest checkpoint that reads back: a damaged
    one (files cut short or missing) is skipped with a warning and moved to
    `WORKDIR/damaged_checkpoints/`, and the previous complete one is used;
  * `reached_preemption(step)` says when to stop: on SIGTERM the trainer
    finishes the step, saves it and exits normally. In a multi-process job
    JAX's preemption sync service (which catches SIGTERM itself) makes every
    process return True at the same step, so all save the same one; a single
    process, which has no such service, catches SIGTERM here.

`fingerprint.json` next to `checkpoints/` is a readable copy of the
fingerprint for tools that read the workdir without orbax (`srigl_jax.export`
records it in the inference manifest). `read_fingerprint` reads it, or the
checkpoint's metadata where the file is missing or damaged; the trainer
rewrites a damaged one when it starts.

The fingerprint holds every field of the config schema
(`config_lib.base_config`) except `RESUMABLE_FIELDS`, the fields that change
how a run is watched, saved or read but not what it trains; a field added to
the schema is fingerprinted unless it is added there.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from srigl_jax import config_lib

CHECKPOINT_DIR = 'checkpoints'
DAMAGED_DIR = 'damaged_checkpoints'
FINGERPRINT_FILE = 'fingerprint.json'
LOCK_FILE = 'trainer.lock'
# 1: a hand-picked list of fields (model, sparsity, data, optim.name, seed).
# 2: every schema field but RESUMABLE_FIELDS.
_FINGERPRINT_VERSION = 2
# The order in which the input pipeline reads and augments examples: a numpy
# permutation per epoch and augmentation draws per batch. A checkpoint that
# records another order (or none) was trained on other batches.
DATA_ORDER = 'grain-shuffled-batches/2'

# The config fields a resumed run may change, and why each leaves the
# trajectory (params, masks, optimizer state and the batches of every step)
# as it was. Every other schema field is in the fingerprint.
RESUMABLE_FIELDS = {
    'log_every': 'when train metrics are logged and checked for NaN',
    'eval_every': 'when the model is evaluated',
    'checkpoint_every': 'when checkpoints are saved',
    'keep_checkpoints': 'how many checkpoints are kept',
    'halt_after_step': 'where this invocation stops (the next one resumes)',
    'write_plots': 'the plots written at the end',
    'export': 'the inference artefact written at the end',
    'eval_batch_size': 'the batch size of evaluation only',
    'skip_bad_steps': (
        'on a finite step both settings apply the same update; it decides only whether a '
        'non-finite step stops the run or is dropped (turning it on to get past one is the '
        'fix a NaN error suggests)'
    ),
    'mesh.data': (
        'the devices the global batch is split over: the same global batches and the same '
        'math (BatchNorm statistics over the global batch), equal up to float reduction order'
    ),
    'input.data_dir': 'where the same data is read from',
    'input.num_workers': 'how batches are prepared (a batch depends on (seed, step) only)',
    'input.num_threads': 'how batches are prepared (a batch depends on (seed, step) only)',
    'input.prefetch': 'how far ahead batches are prepared',
    'input.cache': 'whether the decoded split is held in memory',
    'input.num_eval_examples': 'the eval split only (eval metrics of later steps use the new size)',
}

# The fields fingerprint version 1 recorded whenever the schema had them: a
# version-1 fingerprint without one was written before the field existed, so
# its run had the field's default behaviour.
_V1_FIELDS = frozenset("""
    model.name model.kwargs model.dtype input.name input.image_shape input.image_size
    input.num_classes input.augment input.crop_padding input.randaugment input.mixup_alpha
    input.cutmix_alpha input.num_train_examples input.synthetic_seed batch_size
    sparsity.method sparsity.sparsity sparsity.distribution sparsity.erk_power_scale
    sparsity.sparse_rule sparsity.dense_layers sparsity.no_ablation sparsity.grad_accumulation
    sparsity.group_size optim.name seed data_order optim.momentum>0
    """.split())
# Keys of older fingerprints that are not config fields: how to compute them.
_LEGACY_KEYS = {'optim.momentum>0': lambda config: bool(config.optim.get('momentum') or 0.0)}


class WorkdirMismatchError(ValueError):
  """The workdir holds checkpoints of a run with other settings.

  Attributes:
    fields: the differing fingerprint fields.
  """

  def __init__(self, message: str, fields: tuple[str, ...] = ()):
    super().__init__(message)
    self.fields = fields

  def __reduce__(self):
    return type(self), (str(self), self.fields)


class WorkdirLockedError(RuntimeError):
  """Another trainer holds the workdir's lock.

  Attributes:
    holder: what the lock file records of the trainer holding it (pid, host,
      started), {} if it could not be read.
  """

  def __init__(self, message: str, holder: dict[str, Any] | None = None):
    super().__init__(message)
    self.holder = holder or {}

  def __reduce__(self):
    return type(self), (str(self), self.holder)


class DamagedWorkdirError(ValueError):
  """A file of the workdir cannot be read; the message names it and the fix."""


# ---------------------------------------------------------------- fingerprint


def _jsonable(value: Any) -> Any:
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in sorted(value.items())}
  if isinstance(value, (tuple, list)):
    return [_jsonable(v) for v in value]
  return value


def _as_json(value: Any) -> Any:
  """`value` as it reads back from JSON (tuples become lists)."""
  return json.loads(json.dumps(_jsonable(value)))


def schema_fields(dataset: str) -> list[str]:
  """Every dotted field of the config schema of `dataset` (`model.kwargs` as one).

  Args:
    dataset: the input pipeline's dataset name (the input group's fields
      differ between datasets).

  Returns:
    The dotted field names, in schema order.
  """

  def walk(node, prefix):
    for key in node.keys():
      dotted = prefix + key
      value = node[key]
      if isinstance(value, ml_collections.ConfigDict) and dotted != 'model.kwargs':
        yield from walk(value, dotted + '.')
      else:
        yield dotted

  return list(walk(config_lib.base_config(dataset), ''))


def fingerprinted_fields(dataset: str) -> list[str]:
  """The schema fields of `dataset` recorded in the fingerprint."""
  return [f for f in schema_fields(dataset) if f not in RESUMABLE_FIELDS]


def _lookup(node: Any, dotted: str) -> Any:
  for part in dotted.split('.'):
    node = node[part]
  return node


def _schema_default(config: ml_collections.ConfigDict, dotted: str) -> Any:
  """The schema's default of a field (None for a field it does not have)."""
  try:
    return _lookup(config_lib.base_config(config.input.name), dotted)
  except (KeyError, AttributeError):
    return None


def _value(config: ml_collections.ConfigDict, dotted: str) -> Any:
  """A field's value as the run uses it; the schema default where `config` lacks it."""
  if dotted == 'sparsity.stop_step':
    # T_end as trained: a reference to stop_fraction * num_train_steps or a pin.
    return config_lib.resolve_stop_step(config)
  if dotted in _LEGACY_KEYS:
    return _LEGACY_KEYS[dotted](config)
  try:
    return _lookup(config, dotted)
  except (KeyError, AttributeError):
    return _schema_default(config, dotted)


def fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config fields that decide the run's trajectory, as JSON values.

  Args:
    config: the full config.

  Returns:
    Dotted field -> JSON value for every schema field except
    `RESUMABLE_FIELDS`, plus the format version and the data order.
  """
  out: dict[str, Any] = {'version': _FINGERPRINT_VERSION, 'data_order': DATA_ORDER}
  for field in fingerprinted_fields(config.input.name):
    out[field] = _jsonable(_value(config, field))
  return out


def _differences(
    theirs: dict[str, Any], config: ml_collections.ConfigDict
) -> tuple[list[tuple[str, Any, Any]], list[str]]:
  """Compares a stored fingerprint with the config's.

  A field missing from the stored fingerprint did not exist when it was
  written, so that run had the field's default (for `data_order`: an older
  order); the exception is a version-1 fingerprint, which left out fields
  that did exist (`unchecked`).

  Returns:
    ([(field, stored value, config value)] of the differing fields,
    [fields a version-1 fingerprint does not record]).
  """
  mine = _as_json(fingerprint(config))
  version = theirs.get('version', 1)
  diffs, unchecked = [], []
  for key in sorted((set(mine) | set(theirs)) - {'version'}):
    want = mine[key] if key in mine else _as_json(_value(config, key))
    if key in theirs:
      have = theirs[key]
    elif version >= 2 or key in _V1_FIELDS:
      have = None if key == 'data_order' else _as_json(_schema_default(config, key))
    else:
      unchecked.append(key)
      continue
    if have != want:
      diffs.append((key, have, want))
  return diffs, unchecked


def _load_json(path: str) -> tuple[dict[str, Any] | None, str | None]:
  """(content, None) of a JSON object file; (None, why) if missing or damaged."""
  try:
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
  except FileNotFoundError:
    return None, 'missing'
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    return None, f'not valid JSON: {e}'
  if not isinstance(value, dict):
    return None, f'not a JSON object but {type(value).__name__}'
  return value, None


def _write_json(path: str, value: dict[str, Any]) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(value, f, indent=1, sort_keys=True)
  os.replace(tmp, path)  # Atomic: a kill never leaves half a file.


def _read_manager(workdir: str) -> ocp.CheckpointManager | None:
  ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
  if not os.path.isdir(ckpt_dir):
    return None
  return ocp.CheckpointManager(
      ckpt_dir,
      options=ocp.CheckpointManagerOptions(
          read_only=True, create=False, enable_async_checkpointing=False
      ),
  )


def _custom_metadata(manager: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
  try:
    custom = getattr(manager.metadata(step), 'custom_metadata', None)
  except Exception:  # pylint: disable=broad-except
    custom = None  # Unreadable metadata: as if there were none.
  return dict(custom) if custom else None


def _stored_fingerprint(workdir: str, step: int | None = None) -> tuple[bool, dict | None]:
  """(whether there are complete checkpoints, the fingerprint one carries or None).

  `step` None: the newest checkpoint carrying a fingerprint (the checkpoints
  of one workdir belong to one run, so a newest one whose metadata is damaged
  does not hide the others').
  """
  manager = _read_manager(workdir)
  if manager is None:
    return False, None
  try:
    steps = sorted(manager.all_steps(), reverse=True)
    for s in [step] if step is not None else steps:
      custom = _custom_metadata(manager, s)
      if custom:
        return True, custom
    return bool(steps), None
  finally:
    manager.close()


def checkpoint_fingerprint(workdir: str, step: int | None = None) -> dict[str, Any] | None:
  """The fingerprint a checkpoint carries as orbax metadata, or None.

  Args:
    workdir: the run's directory (holding `checkpoints/`).
    step: a complete checkpoint's step; None: the newest one that carries a
      fingerprint.

  Returns:
    The fingerprint; None where no such checkpoint carries one that can be
    read.
  """
  return _stored_fingerprint(workdir, step)[1]


def read_fingerprint(workdir: str, step: int | None = None) -> dict[str, Any] | None:
  """The run's fingerprint: `fingerprint.json`, else a checkpoint's metadata.

  Reads only. A damaged `fingerprint.json` is replaced by the fingerprint the
  checkpoints carry, with a warning (the next training run rewrites the file).

  Args:
    workdir: the run's directory.
    step: the checkpoint to take it from where the file cannot be read (None:
      the newest one carrying a fingerprint).

  Returns:
    The fingerprint, or None where neither can be read.
  """
  path = os.path.join(workdir, FINGERPRINT_FILE)
  value, problem = _load_json(path)
  if value is not None:
    return value
  value = checkpoint_fingerprint(workdir, step) or (
      checkpoint_fingerprint(workdir) if step is not None else None
  )
  if problem != 'missing':
    logging.warning(
        '%s is damaged (%s); %s. Run the training command again to rewrite it.',
        path,
        problem,
        "using the checkpoint's own fingerprint" if value else 'no checkpoint carries one either',
    )
  return value


def check_workdir(workdir: str, config: ml_collections.ConfigDict, write: bool = True) -> None:
  """Refuses to resume checkpoints written with settings that alter the run.

  Compares the config's fingerprint with the one stored in the newest
  complete checkpoint that carries one (orbax metadata), or for checkpoints
  without one (older versions) with `fingerprint.json`. Then (re)writes
  `fingerprint.json` where it is missing, damaged or out of date; a refused
  resume writes nothing.

  Args:
    workdir: the run's directory (holding `checkpoints/`).
    config: the full config.
    write: write `fingerprint.json` (only process 0 should).

  Raises:
    WorkdirMismatchError: naming every differing field, both values and the
      fixes.
    DamagedWorkdirError: checkpoints without a fingerprint next to a damaged
      `fingerprint.json`: nothing tells which run they belong to.
  """
  path = os.path.join(workdir, FINGERPRINT_FILE)
  in_file, problem = _load_json(path)
  steps, theirs = _stored_fingerprint(workdir)
  if theirs is None and steps:
    if problem not in (None, 'missing'):
      raise DamagedWorkdirError(
          f'{path} is {problem}, and the checkpoints in '
          f'{os.path.join(workdir, CHECKPOINT_DIR)} carry no fingerprint (an older '
          'version wrote them): nothing tells which run they belong to. Fix: if they are '
          f'a run of this config, delete {path} (the checkpoints are then trusted); '
          'otherwise use a new --workdir.'
      )
    theirs = in_file
  if theirs is not None:
    diffs, unchecked = _differences(theirs, config)
    if diffs:
      lines = '; '.join(f'{k}: checkpoint {a!r} vs config {b!r}' for k, a, b in diffs)
      raise WorkdirMismatchError(
          f'workdir {workdir} holds checkpoints of a different run ({lines}). '
          'Resuming would mix two runs. Use a new --workdir, or run with '
          "the checkpoint's settings, or delete "
          f'{os.path.join(workdir, CHECKPOINT_DIR)} and {path} to start over. (Fields that '
          'may change on a resume: ' + ', '.join(sorted(RESUMABLE_FIELDS)) + '.)',
          fields=tuple(k for k, _, _ in diffs),
      )
    if unchecked:
      logging.warning(
          '%s: the checkpoints carry a version-1 fingerprint, which does not record %s; '
          'resuming trusts that they are unchanged. New checkpoints record every field.',
          workdir,
          ', '.join(unchecked),
      )
  elif steps:
    logging.warning(
        '%s has checkpoints without a fingerprint (written by an older version); trusting them.',
        workdir,
    )
  mine = _as_json(fingerprint(config))
  if write and in_file != mine:
    if problem not in (None, 'missing'):
      logging.warning(
          '%s was %s; rebuilt it%s.',
          path,
          problem,
          " (checked against the fingerprint in the checkpoints' metadata)"
          if theirs is not None
          else '',
      )
    os.makedirs(workdir, exist_ok=True)
    _write_json(path, mine)


# ----------------------------------------------------------------- the lock


class WorkdirLock:
  """An exclusive `fcntl.flock` on `WORKDIR/trainer.lock` (one process).

  The lock file records who holds it: {'pid', 'host', 'started'}. The OS
  releases the lock when the holding process exits or is killed; a record
  left by a killed holder is taken over with a warning. A lock excludes
  other hosts only where the filesystem shares flock locks (local disks; NFS
  emulates them); a FUSE mount such as gcsfuse keeps them per host, and where
  flock fails outright training goes on unguarded, with a warning.

  Args:
    workdir: the run's directory (must exist).
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: int | None = None
    self._locked = False

  @staticmethod
  def _record(fd: int) -> dict[str, Any]:
    try:
      data = os.pread(fd, 4096, 0)
      value = json.loads(data.decode('utf-8')) if data.strip() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
      value = {}
    return value if isinstance(value, dict) else {}

  def acquire(self) -> None:
    """Takes the lock at once, or raises.

    Raises:
      WorkdirLockedError: another process holds it; the message names its PID,
        host and start time (as recorded) and the fixes.
    """
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      self._locked = True
    except BlockingIOError:  # Held by another open file of it.
      holder = self._record(fd)
      os.close(fd)
      who = (
          f'PID {holder.get("pid")} on host {holder.get("host")}, started '
          f'{holder.get("started")}'
          if holder
          else 'a process that is starting (it has not recorded its PID yet)'
      )
      raise WorkdirLockedError(
          f'workdir {os.path.dirname(self.path)} is in use by another trainer: {who} '
          f'(lock file {self.path}). Two trainers on one workdir would log every step twice '
          "and overwrite each other's checkpoints. Fix: wait for that run to finish or stop "
          'it, or pass another --workdir. (Exporting a workdir while it trains is fine: '
          'python -m srigl_jax.export only reads it.)',
          holder,
      ) from None
    except OSError as e:
      # A filesystem without locks (ENOLCK, EOPNOTSUPP): train unguarded
      # rather than not at all.
      logging.warning(
          'Cannot lock %s (%s): nothing stops a second trainer on this workdir.', self.path, e
      )
    previous = self._record(fd)
    if previous:
      logging.warning(
          'Took over %s from PID %s on host %s (started %s), which ended without releasing '
          'it (killed or crashed).',
          self.path,
          previous.get('pid'),
          previous.get('host'),
          previous.get('started'),
      )
    record = {
        'pid': os.getpid(),
        'host': socket.gethostname(),
        'started': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + '\n').encode('utf-8'), 0)
    os.fsync(fd)
    self._fd = fd

  def release(self) -> None:
    """Empties the record (a clean end leaves nothing to take over) and unlocks."""
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
      if self._locked:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
    finally:
      os.close(self._fd)  # Closing the last descriptor unlocks anyway.
      self._fd, self._locked = None, False


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[WorkdirLock]:
  """Holds the workdir's lock for the body; on several processes, process 0's.

  Every process of a multi-process job learns whether process 0 got it, so
  all stop together when it did not.

  Args:
    workdir: the run's directory (on process 0, it must exist).

  Yields:
    The lock (held by process 0 only).

  Raises:
    WorkdirLockedError: another trainer holds the workdir.
  """
  lock = WorkdirLock(workdir)
  error = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except WorkdirLockedError as e:
      error = e
  if jax.process_count() > 1:
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok and error is None:
      error = WorkdirLockedError(
          f'process 0 could not lock workdir {workdir}: another trainer uses it (process 0 '
          'names it). Fix: wait for it or pass another --workdir.'
      )
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    lock.release()


# ------------------------------------------------------------ checkpoints


def _short(error: BaseException) -> str:
  """The first line of an error, cut to 300 characters (orbax's can be pages)."""
  text = str(error).strip().split('\n', 1)[0]
  text = text if len(text) <= 300 else text[:300] + '...'
  return f'{type(error).__name__}: {text}'


def restore_newest(
    manager: ocp.CheckpointManager, target: Any
) -> tuple[int | None, Any, list[int]]:
  """Restores the newest complete checkpoint that reads back.

  Orbax lists only finalised checkpoints (one cut off by a kill stays in a
  temporary folder). A listed one that fails to restore (files cut short,
  missing or corrupted) is skipped with a warning naming its folder, and the
  next older one is tried.

  Args:
    manager: the checkpoints' manager.
    target: the state's layout (ShapeDtypeStructs with shardings).

  Returns:
    (step, state, damaged steps skipped); (None, None, []) without any
    checkpoint.

  Raises:
    DamagedWorkdirError: no checkpoint restores; names each one's error and
      the fixes.
  """
  failed = []
  directory = str(manager.directory)
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      state = manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception as e:  # pylint: disable=broad-except
      # Orbax raises whatever its reader meets (tensorstore, JSON, missing
      # files); each means this checkpoint cannot be used.
      failed.append((step, _short(e)))
      logging.warning(
          'Checkpoint %s cannot be restored (%s); trying the previous one.',
          os.path.join(directory, str(step)),
          failed[-1][1],
      )
      continue
    return step, state, [s for s, _ in failed]
  if failed:
    errors = '; '.join(f'{os.path.join(directory, str(s))}: {e}' for s, e in failed)
    raise DamagedWorkdirError(
        f'No checkpoint in {directory} can be restored ({errors}). If every one fails '
        'alike, they were written by another version or config (compare config.json with '
        f'yours); otherwise the files are damaged. Fix: move {directory} aside to start '
        'over, or use a new --workdir.'
    )
  return None, None, []


class Checkpointer:
  """Async orbax checkpoints tagged with the run's fingerprint; see module doc.

  Use as a context manager: on exit it waits for the last save to complete
  and puts back the previous SIGTERM handler.

  Args:
    workdir: the run's directory; checkpoints go to `workdir/checkpoints`.
    config: the full config (`keep_checkpoints`, and the fingerprint).
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.workdir = workdir
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

  def restore_newest(self, target: Any) -> tuple[int | None, Any]:
    """(step, state) of the newest checkpoint that restores; (None, None) if none.

    Damaged checkpoints skipped on the way (`restore_newest`) are moved to
    `WORKDIR/damaged_checkpoints/STEP`, so that this run saves those steps
    anew; every process of a job restores the same step.

    Args:
      target: the state's layout (ShapeDtypeStructs with shardings).

    Raises:
      DamagedWorkdirError: no checkpoint restores, or processes disagree.
    """
    step, state, damaged = restore_newest(self.manager, target)
    if jax.process_count() > 1:
      steps = np.asarray(multihost_utils.process_allgather(np.int64(-1 if step is None else step)))
      if len(set(steps.tolist())) > 1:
        raise DamagedWorkdirError(
            f'The processes restored different checkpoints of {self.directory} '
            f'(steps {steps.tolist()}): some cannot read the newest ones. Fix: check that '
            'every host sees the same files, or move the damaged step folders aside.'
        )
    if not damaged:
      return step, state
    if jax.process_index() == 0:
      aside = os.path.join(self.workdir, DAMAGED_DIR)
      os.makedirs(aside, exist_ok=True)
      for s in damaged:
        dest = os.path.join(aside, str(s))
        if os.path.exists(dest):
          dest += f'-{time.time_ns()}'
        os.rename(os.path.join(self.directory, str(s)), dest)
        logging.warning(
            'Moved damaged checkpoint %s to %s.', os.path.join(self.directory, str(s)), dest
        )
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('srigl_jax: damaged checkpoints moved')
    self.manager.reload()
    logging.warning(
        'Resuming from step %s, the newest checkpoint that restores; steps %s are trained again.',
        step,
        damaged,
    )
    return step, state

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
