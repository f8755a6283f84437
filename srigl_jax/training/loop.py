"""The training loop: `train_and_evaluate(config, workdir)` and its `preflight`.

`train_and_evaluate` trains with SRigL (or a baseline) under data parallelism
over all devices and leaves in `workdir`:

  checkpoints/       orbax checkpoints (params, batch stats, optimizer state
                     with the masks, step; the run's fingerprint as metadata),
                     saved asynchronously; a second run of the same command
                     resumes from the latest one that restores, data order
                     included. On SIGTERM the run saves the step it finished
                     and returns (see `training.checkpointing`).
  trainer.lock       locked (flock) while a trainer runs here: a second one
                     started on this workdir stops at once.
  fingerprint.json   the run's fingerprint, readable without orbax.
  metrics.jsonl      one JSON object per line: {'step': ..., ...}.
  events.out.tfevents.*  the same scalars for TensorBoard.
  config.json        the resolved config (rewritten by a resume that the
                     fingerprint accepts, never by a refused one).
  inference/         the condensed model, verified and timed (`srigl_jax.export`).
  accuracy.png, active_neurons.png, summary.json   written at the end.

metrics.jsonl holds one record per logged step, with the fields due at that
step: every `log_every` steps (and at every mask update, eval and checkpoint)
`train_loss`, `train_accuracy` (means since the previous record),
`learning_rate`, `steps_per_sec`; at step 0, after every mask update and at
every eval `global_sparsity` and, per sparse layer `L` (a '/'-joined param
path), `L/density`, `L/active_neurons`, `L/neurons`, `L/fan_in` (largest
fan-in of a neuron), `L/min_fan_in` (smallest over active neurons); at every
eval `eval_accuracy` and `eval_loss`.

`train_and_evaluate` first locks the workdir (`checkpointing.workdir_lock`);
`preflight` then runs every check before anything is compiled: `training.build`
(the config, checked by the owner of each group, and every layer's fan-in),
the workdir's checkpoints (`training.checkpointing.check_workdir`), and only
then opens the Dataset. This module adds the mesh and shardings, the jitted
steps (`training.steps`), the progress clock and the loop; `reports` writes
summary.json and the plots at the end.

Sharding: a 1-D ('data',) mesh; batches are split over it, and the train
state (params, batch stats, optimizer state with the masks) is replicated, so
every mask has its param's sharding. BatchNorm statistics are computed over
the global batch, which keeps runs on 1 and N devices equal up to float
reduction order.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from srigl_jax import config_lib, export, reports
from srigl_jax.serving.report import summary_line
from srigl_jax.sparsity import transform as sparse_transform
from srigl_jax.training import build as build_lib
from srigl_jax.training import checkpointing, faults, metric_writers
from srigl_jax.training.state import TrainState
from srigl_jax.training.steps import make_eval_step, make_train_step, sparsity_metrics

# ------------------------------------------------------------------ helpers


def create_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """A 1-D ('data',) mesh over `config.mesh.data` devices (-1: all)."""
  devices = jax.devices()
  n = int(config.mesh.data)
  if n == -1:
    n = len(devices)
  if not 1 <= n <= len(devices):
    raise config_lib.ConfigError(
        f'mesh.data={config.mesh.data} but {len(devices)} devices are available.',
        field='mesh.data',
    )
  if jax.process_count() > 1 and n != len(devices):
    raise config_lib.ConfigError(
        'A multi-process run must use all devices (mesh.data=-1).', field='mesh.data'
    )
  return jax.sharding.Mesh(np.asarray(devices[:n]), ('data',))


def _to_global(batch, sharding):
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


class Progress:
  """Training throughput and ETA; compilation, evals and saves excluded.

  Args:
    total_steps: the run's `num_train_steps`, for the ETA.
    clock: seconds as a float (tests pass their own).
  """

  def __init__(self, total_steps: int, clock=time.perf_counter):
    self.total_steps = total_steps
    self._clock = clock
    self.train_time, self.timed_steps = 0.0, 0
    self._start: float | None = None
    self._steps = 0

  def step_done(self, step: jax.Array) -> None:
    """Counts a dispatched train step (`step`: its state's step counter)."""
    if self._start is None:
      # The first step after a (re)start or a pause may include compilation:
      # the clock starts once it is done.
      jax.block_until_ready(step)
      self._start, self._steps = self._clock(), 0
    else:
      self._steps += 1

  def _stop(self) -> float | None:
    """Adds the running interval to the totals; its steps/s, if any."""
    if self._start is None or not self._steps:
      return None
    elapsed = self._clock() - self._start
    self.train_time += elapsed
    self.timed_steps += self._steps
    return self._steps / max(elapsed, 1e-9)

  def pause(self, step: jax.Array) -> None:
    """Stops the clock before eval or checkpoint work."""
    if self._start is not None and self._steps:
      jax.block_until_ready(step)
    self._stop()
    self._start, self._steps = None, 0

  def lap(self) -> float | None:
    """Steps/s since the last lap (None if unknown); restarts the clock."""
    rate = self._stop()
    self._start, self._steps = self._clock(), 0
    return rate

  def eta(self, step: int, rate: float | None) -> str:
    """H:MM:SS left at `rate` steps/s ('?' if unknown)."""
    if not rate:
      return '?'
    seconds = int(max(0, (self.total_steps - step) / rate))
    return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'

  @property
  def steps_per_sec(self) -> float | None:
    """Mean training throughput of the run so far."""
    return self.timed_steps / self.train_time if self.train_time > 0 else None


def _train_scalars(pending, monitor, last_checkpoint, progress, step, learning_rate):
  """Fetches the pending step metrics: NaN check, means, progress line.

  Args:
    pending: (step, metrics) of the steps since the last record.
    monitor: the `faults.FaultMonitor`.
    last_checkpoint: the latest saved step, for a fault's message.
    progress: the `Progress`.
    step: the current step.
    learning_rate: the learning rate of the last pending step.

  Returns:
    train_loss, train_accuracy, learning_rate, steps_per_sec (when known), skipped_steps (in
    skip mode); {} if nothing is pending.

  Raises:
    faults.NonFiniteError: a non-finite loss or gradient (unless skipped).
  """
  if not pending:
    return {}
  values = jax.device_get([m for _, m in pending])
  applied = monitor.check([s for s, _ in pending], values, last_checkpoint)
  values = [v for v, ok in zip(values, applied) if ok]
  rate = progress.lap()
  scalars = {
      'train_loss': (
          float(np.mean(np.array([v['loss'] for v in values], np.float64)))
          if values
          else float('nan')
      ),
      'train_accuracy': (
          float(np.mean([v['accuracy'] for v in values])) if values else float('nan')
      ),
      'learning_rate': learning_rate,
  }
  if monitor.skip_bad_steps:
    scalars['skipped_steps'] = monitor.skipped_steps
  if rate is not None:
    scalars['steps_per_sec'] = rate
  logging.info(
      'step %d/%d  loss %.4f  train acc %.4f  %s steps/s  ETA %s',
      step,
      progress.total_steps,
      scalars['train_loss'],
      scalars['train_accuracy'],
      f'{rate:.2f}' if rate else '?',
      progress.eta(step, rate),
  )
  return scalars


def _scalars(tree) -> dict[str, float]:
  return {k: np.asarray(v).item() for k, v in jax.device_get(tree).items()}


def _write_config(config, workdir):
  with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
    f.write(config.to_json_best_effort(indent=2))


# -------------------------------------------------------------------- main


@dataclasses.dataclass(frozen=True)
class Trainer:
  """A built run on a mesh: its shardings and jitted steps (nothing compiled yet).

  Attributes:
    run: the run (`training.build`), its Dataset open.
    state_sharding: the train state's sharding (replicated).
    batch_sharding: the batches' sharding (split over 'data').
    train_step, eval_step, stats_fn: the jitted steps.
    n_devices: devices of the mesh.
  """

  run: build_lib.Run
  state_sharding: Any
  batch_sharding: jax.sharding.NamedSharding
  train_step: Callable
  eval_step: Callable
  stats_fn: Callable
  n_devices: int

  @classmethod
  def create(cls, run: build_lib.Run, mesh: jax.sharding.Mesh) -> Trainer:
    """Shardings over `mesh` and the jitted steps of `run`."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    state_sharding = jax.tree.map(lambda _: replicated, run.abstract_state)
    return cls(
        run=run,
        state_sharding=state_sharding,
        batch_sharding=batch_sharding,
        train_step=jax.jit(
            make_train_step(run.model, run.config, run.dropout_key, batch_sharding),
            in_shardings=(state_sharding, batch_sharding),
            out_shardings=(state_sharding, replicated),
            donate_argnums=(0,),
        ),
        eval_step=jax.jit(
            make_eval_step(run.model),
            in_shardings=(state_sharding, batch_sharding),
            out_shardings=replicated,
        ),
        stats_fn=jax.jit(
            sparsity_metrics, in_shardings=(state_sharding,), out_shardings=replicated
        ),
        n_devices=mesh.devices.size,
    )

  @property
  def config(self) -> ml_collections.ConfigDict:
    return self.run.config

  @property
  def num_train_steps(self) -> int:
    return int(self.config.num_train_steps)

  def evaluate(self, state: TrainState) -> dict[str, float]:
    """Accuracy and loss over the eval split."""
    totals = None
    batches = self.run.dataset.eval_batches()
    try:
      for batch in batches:
        sums = self.eval_step(state, _to_global(batch, self.batch_sharding))
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    finally:
      batches.close()  # Stops worker processes at once, not at garbage collection.
    totals = _scalars(totals)
    count = max(totals['count'], 1.0)
    return {'eval_accuracy': totals['correct'] / count, 'eval_loss': totals['loss'] / count}


def _initial_state(t: Trainer, ckpt: checkpointing.Checkpointer) -> TrainState:
  """The newest checkpoint's state that restores (damaged ones skipped), or a fresh one."""
  if ckpt.latest_step() is None:
    return jax.jit(t.run.init, out_shardings=t.state_sharding)(t.run.init_key)
  target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      t.run.abstract_state,
      t.state_sharding,
  )
  step, state = ckpt.restore_newest(target)
  logging.info('Resumed from %s at step %d.', ckpt.directory, step)
  return state


def _open_writer(workdir: str, config, start_step: int):
  """metrics.jsonl (cut back to `start_step`) and TensorBoard, on process 0."""
  if jax.process_index() != 0:
    return metric_writers.NoOpWriter()
  jsonl_path = os.path.join(workdir, 'metrics.jsonl')
  metric_writers.truncate_jsonl(jsonl_path, start_step)
  _write_config(config, workdir)
  return metric_writers.MultiWriter(
      [metric_writers.TensorBoardWriter(workdir), metric_writers.JsonlWriter(jsonl_path)]
  )


def _train_loop(t: Trainer, state: TrainState, ckpt, writer, progress):
  """Trains until the end, `halt_after_step` or a preemption.

  Returns:
    (state, step, last eval metrics or {}).
  """
  config = t.config
  monitor = faults.FaultMonitor(
      faults.leaf_paths(t.run.abstract_state.params),
      t.run.call_order,
      skip_bad_steps=bool(config.get('skip_bad_steps', False)),
  )
  method, _ = config_lib.optimizer_method(config)
  dynamic, stop_step = method in ('set', 'rigl', 'srigl'), config_lib.resolve_stop_step(config)
  log_every, eval_every = max(1, int(config.log_every)), int(config.eval_every)
  ckpt_every = int(config.checkpoint_every)
  end_step = t.num_train_steps
  if config.halt_after_step is not None:
    end_step = min(end_step, int(config.halt_after_step))
  step = int(jax.device_get(state.step))
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  last_eval: dict[str, float] = {}
  if step == 0:
    writer.write_scalars(0, _scalars(t.stats_fn(state)))  # The initial masks.
  train_iter = t.run.dataset.train_batches(start_step=step)
  try:
    while step < end_step:
      state, metrics = t.train_step(state, _to_global(next(train_iter), t.batch_sharding))
      step += 1
      pending.append((step, metrics))
      progress.step_done(state.step)
      is_last = step == t.num_train_steps
      # Every process asks at every step: they all stop at the same one.
      preempted = not is_last and ckpt.reached_preemption(step)
      halting = (step == end_step and not is_last) or preempted
      do_eval = is_last or (eval_every > 0 and step % eval_every == 0)
      do_ckpt = is_last or halting or (ckpt_every > 0 and step % ckpt_every == 0)
      mask_update = dynamic and step % config.sparsity.update_every == 0 and step < stop_step
      record = {}  # One metrics.jsonl line per step, all fields together.
      if step % log_every == 0 or do_eval or do_ckpt or mask_update:
        record.update(
            _train_scalars(
                pending,
                monitor,
                ckpt.latest_step(),
                progress,
                step,
                float(t.run.learning_rate(step - 1)),
            )
        )
        pending.clear()
      if mask_update or do_eval:
        progress.pause(state.step)
        record.update(_scalars(t.stats_fn(state)))
      if do_eval:
        last_eval = t.evaluate(state)
        record.update(last_eval)
        logging.info(
            'step %d  eval accuracy %.4f  eval loss %.4f  global ' 'sparsity %.4f',
            step,
            last_eval['eval_accuracy'],
            last_eval['eval_loss'],
            record['global_sparsity'],
        )
      if record:
        writer.write_scalars(step, record)
      if do_ckpt:
        progress.pause(state.step)
        ckpt.save(step, state)
        writer.flush()
      if halting:
        logging.info(
            '%s after step %d, checkpoint saved; run the same ' 'command again to continue.',
            'Preempted (SIGTERM)' if preempted else 'Halting (halt_after_step)',
            step,
        )
        break
  finally:
    if hasattr(train_iter, 'close'):
      train_iter.close()
    writer.close()
  return state, step, last_eval


def _finish(t: Trainer, state, step, last_eval, workdir, progress):
  """Process 0 at the end of training: export, summary.json and the plots.

  Raises:
    Exception: the export's error, once the summary and plots are written.
  """
  config = t.config
  last_eval = last_eval or t.evaluate(state)
  inference, export_error = None, None
  if config.get('export', True) and jax.process_count() > 1:
    # export_model runs on this process only, and its orbax save waits for
    # every process of the job: it would never return.
    logging.warning(
        'Multi-process run: not exported. Export the final '
        'checkpoint from one process: python -m srigl_jax.export '
        '--workdir=%s',
        workdir,
    )
  elif config.get('export', True):
    # The payoff of sparse training: a verified, faster inference model.
    try:
      inference = export.export_model(
          t.run.model,
          state.params,
          state.batch_stats,
          sparse_transform.get_masks(state.opt_state),
          config,
          os.path.join(workdir, 'inference'),
          step=step,
          workdir=workdir,
          dataset=t.run.dataset,
      )
    except Exception as e:  # pylint: disable=broad-except
      export_error = e
  reports.write_summary_and_plots(
      workdir,
      config,
      _scalars(t.stats_fn(state)),
      last_eval,
      steps_per_sec=progress.steps_per_sec,
      n_devices=t.n_devices,
      num_params=t.run.num_params,
      call_order=t.run.call_order,
      inference=inference,
  )
  if inference is not None:
    logging.info('%s', summary_line(inference))
  if export_error is not None:
    logging.error(
        'Export failed; training finished and is checkpointed. '
        'Retry with: python -m srigl_jax.export --workdir=%s',
        workdir,
    )
    raise export_error


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains and evaluates a (sparse) model, resuming from `workdir` if possible.

  Args:
    config: an experiment config (see `srigl_jax.config_lib.base_config`).
    workdir: directory for checkpoints, metrics, plots and the summary.

  Returns:
    The final TrainState (of the step saved on SIGTERM, if preempted).

  Raises:
    ValueError: a workdir that is a URL, not a path.
    checkpointing.WorkdirLockedError: another trainer uses the workdir
      (before anything is built).
    config_lib.ConfigError: an invalid config (before anything is compiled).
    checkpointing.WorkdirMismatchError: the workdir holds another run.
    checkpointing.DamagedWorkdirError: no checkpoint of the workdir restores,
      or its fingerprint cannot be read.
    faults.NonFiniteError: the training loss or a gradient became NaN or
      infinite (a FloatingPointError).
    Exception: the export's error, after summary.json and the plots.
  """
  if '://' in workdir:
    raise ValueError(
        f'workdir={workdir!r}: use a local or mounted path (e.g. a GCS bucket '
        'mounted with gcsfuse at /gcs/BUCKET); metrics and plots are written '
        'with plain file I/O.'
    )
  workdir = os.path.abspath(workdir)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
  # Held until the end of the export: one trainer per workdir.
  with checkpointing.workdir_lock(workdir):
    return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """`train_and_evaluate` once the workdir is locked."""
  t = preflight(config, workdir)
  # On the way out (a failed restore included) it waits for the last async
  # save; SIGTERM is handled while it is open.
  with checkpointing.Checkpointer(workdir, config) as ckpt:
    state = _initial_state(t, ckpt)
    writer = _open_writer(workdir, config, int(jax.device_get(state.step)))
    _log_run(t)
    progress = Progress(t.num_train_steps)
    state, step, last_eval = _train_loop(t, state, ckpt, writer, progress)
  if step >= t.num_train_steps and jax.process_index() == 0:
    _finish(t, state, step, last_eval, workdir, progress)
  return state


def preflight(
    config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh | None = None
) -> Trainer:
  """Every check before anything is compiled; returns the trainer, built.

  In order, all before any data is read: the config and every layer's fan-in
  (`training.build`), then the workdir's checkpoints (same run); then the
  Dataset is opened.

  Args:
    config: the full config.
    workdir: the run's directory (absolute).
    mesh: the device mesh (default: `create_mesh(config)`).

  Returns:
    The `Trainer`.

  Raises:
    config_lib.ConfigError: an invalid config, naming the field and the fix.
    checkpointing.WorkdirMismatchError: the workdir holds another run.
    checkpointing.DamagedWorkdirError: checkpoints whose run cannot be told.
    data.DatasetNotFoundError, data.DataFormatError: the data.
  """
  mesh = create_mesh(config) if mesh is None else mesh
  run = build_lib.build(config, n_devices=mesh.devices.size, open_dataset=False)
  checkpointing.check_workdir(workdir, config, write=jax.process_index() == 0)
  if jax.process_count() > 1:
    # Every process has looked at checkpoints/ before process 0's Checkpointer
    # may create it: orbax's managers pass different barriers for a folder
    # they find and one they create, so all must find the same.
    multihost_utils.sync_global_devices('srigl_jax: workdir checked')
  return Trainer.create(build_lib.with_dataset(run), mesh)


def _log_run(t: Trainer) -> None:
  config = t.config
  logging.info(
      'Model %s (%d params), %s at sparsity %.3f, %d devices, global batch %d, '
      '%d steps (%d per epoch), masks updated every %d steps until step %d.',
      config.model.name,
      t.run.num_params,
      config.sparsity.method,
      config.sparsity.sparsity,
      t.n_devices,
      config.batch_size,
      t.num_train_steps,
      t.run.dataset.steps_per_epoch,
      config.sparsity.update_every,
      config_lib.resolve_stop_step(config),
  )
