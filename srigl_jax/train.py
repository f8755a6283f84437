"""Training loop: config -> data -> model -> sparse optimizer -> trained state.

`train_and_evaluate(config, workdir)` trains with SRigL (or a baseline) under
data parallelism over all devices and leaves in `workdir`:

  checkpoints/       orbax checkpoints (params, batch stats, optimizer state
                     with the masks, step; the run's fingerprint as metadata),
                     saved asynchronously; a second run of the same command
                     resumes from the latest one, data order included. On
                     SIGTERM the run saves the step it finished and returns
                     (see `srigl_jax.checkpointing`).
  metrics.jsonl      one JSON object per line: {'step': ..., ...}.
  events.out.tfevents.*  the same scalars for TensorBoard.
  config.json        the resolved config.
  accuracy.png, active_neurons.png, summary.json   written at the end.

metrics.jsonl holds one record per logged step, with the fields due at that
step: every `log_every` steps (and at every mask update, eval and checkpoint)
`train_loss`, `train_accuracy` (means since the previous record),
`learning_rate`, `steps_per_sec`; at step 0, after every mask update and at
every eval `global_sparsity` and, per sparse layer `L` (a '/'-joined param
path), `L/density`, `L/active_neurons`, `L/neurons`, `L/fan_in` (largest
fan-in of a neuron), `L/min_fan_in` (smallest over active neurons); at every
eval `eval_accuracy` and `eval_loss`.

Sharding: a 1-D ('data',) mesh; batches are split over it, and the train
state (params, batch stats, optimizer state with the masks) is replicated, so
every mask has its param's sharding. BatchNorm statistics are computed over
the global batch, which keeps runs on 1 and N devices equal up to float
reduction order.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import time
from typing import Any, Callable

from absl import logging
import flax
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import srigl_jax
from srigl_jax import checkpointing
from srigl_jax import checks
from srigl_jax import config_lib
from srigl_jax import data as data_lib
from srigl_jax import export as export_lib
from srigl_jax import faults
from srigl_jax import metric_writers
from srigl_jax import models

_LAYER_FIELDS = ('density', 'active_neurons', 'neurons', 'fan_in', 'min_fan_in')


class TrainState(train_state.TrainState):
  """Flax TrainState plus BatchNorm statistics.

  `opt_state` holds the sparse optimizer's `SparseState` (masks included), so
  `srigl_jax.get_masks(state)` and `srigl_jax.layer_stats(state)` work on it.
  """

  batch_stats: Any = flax.struct.field(default_factory=dict)


# --------------------------------------------------------------- schedules


def create_learning_rate_fn(
    optim: ml_collections.ConfigDict, steps_per_epoch: int, num_train_steps: int
) -> Callable[[jax.Array], jax.Array]:
  """The learning rate as a function of the optimizer step.

  Schedules (epoch fields are converted with `steps_per_epoch`):
    'constant'.
    'step': times `decay_factor` every `decay_every_epochs` (the paper's CIFAR
      runs: x0.2 every 77 epochs).
    'multistep': times `decay_factor` at each of `boundaries_epochs`
      (ResNet-50: x0.1 at 30/70/90).
    'cosine': cosine decay to 0 at `num_train_steps`.
  All start with a linear warm-up from 0 over `warmup_epochs` when it is > 0.

  Args:
    optim: the `optim` config group.
    steps_per_epoch: train steps per epoch.
    num_train_steps: total train steps.

  Returns:
    A jittable schedule `step -> learning rate`.

  Raises:
    ValueError: an unknown schedule.
  """
  base = float(optim.learning_rate)
  warmup = int(round(optim.warmup_epochs * steps_per_epoch))
  schedule = optim.schedule
  if schedule not in config_lib.SCHEDULES:
    raise ValueError(f'Unknown optim.schedule {schedule!r}; valid: '
                     f'{list(config_lib.SCHEDULES)}.')
  factor = float(optim.decay_factor)
  every = max(1, int(round(optim.decay_every_epochs * steps_per_epoch)))
  boundaries = [int(round(e * steps_per_epoch)) for e in optim.boundaries_epochs]

  def lr_fn(step):
    step = jnp.asarray(step, jnp.float32)
    if schedule == 'constant':
      lr = jnp.full_like(step, base)
    elif schedule == 'step':
      lr = base * factor ** jnp.floor(step / every)
    elif schedule == 'multistep':
      passed = sum((step >= b).astype(jnp.float32) for b in boundaries)
      lr = base * factor ** jnp.asarray(passed, jnp.float32)
    else:
      span = max(1, num_train_steps - warmup)
      progress = jnp.clip((step - warmup) / span, 0.0, 1.0)
      lr = 0.5 * base * (1.0 + jnp.cos(jnp.pi * progress))
    if warmup > 0:
      lr = jnp.where(step < warmup, base * step / warmup, lr)
    return lr

  return lr_fn


def _decay_mask(pattern: str | None):
  if pattern is None:
    return None
  regex = re.compile(pattern)

  def mask_fn(params):
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: bool(regex.search(srigl_jax.sparsity.layers.path_str(kp))),
        params)

  return mask_fn


def create_optimizer(
    config: ml_collections.ConfigDict, lr_fn: Callable, key: jax.Array
) -> optax.GradientTransformationExtraArgs:
  """The inner optax optimizer wrapped by the sparse optimizer.

  SGD applies weight decay to the gradient before momentum (PyTorch's SGD, as
  in the paper's runs); AdamW decouples it. Clipping acts on the (masked)
  gradient first.

  Args:
    config: the full config.
    lr_fn: the learning-rate schedule.
    key: PRNG key of the sparse optimizer (initial masks, SET growth).

  Returns:
    The sparse optimizer.

  Raises:
    ValueError: an unknown optimizer or sparsity setting.
  """
  optim = config.optim
  parts = []
  if optim.grad_clip_norm is not None:
    parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  mask = _decay_mask(optim.decay_pattern)
  if optim.name == 'sgd':
    if optim.weight_decay:
      parts.append(optax.add_decayed_weights(optim.weight_decay, mask=mask))
    parts.append(optax.sgd(lr_fn, momentum=optim.momentum or None,
                           nesterov=optim.nesterov))
  elif optim.name == 'adamw':
    parts.append(optax.adamw(lr_fn, b1=optim.momentum, b2=optim.b2,
                             eps=optim.eps, weight_decay=optim.weight_decay,
                             mask=mask))
  else:
    raise ValueError(f'Unknown optim.name {optim.name!r}; valid: '
                     f'{list(config_lib.OPTIMIZERS)}.')
  inner = optax.chain(*parts)
  sp = config.sparsity
  method, gamma_sal = config_lib.optimizer_method(config)
  return srigl_jax.sparse_optimizer(
      inner,
      method=method,
      sparsity=float(sp.sparsity),
      key=key,
      stop_step=config_lib.resolve_stop_step(config),
      distribution=sp.distribution,
      erk_power_scale=float(sp.erk_power_scale),
      update_every=int(sp.update_every),
      drop_fraction=float(sp.drop_fraction),
      gamma_sal=gamma_sal,
      grad_accumulation=int(sp.grad_accumulation),
      sparse_rule=sp.sparse_rule,
      dense_layers=tuple(sp.dense_layers),
      no_ablation=tuple(sp.no_ablation),
  )


def make_init_fn(config, model, tx, image_shape, reinit_key,
                 call_order: dict[str, int] | None = None):
  """Builds `init(key) -> TrainState` (for `jax.eval_shape` and `jax.jit`).

  Args:
    config: the full config (`sparsity.init` picks the sparse re-init).
    model: the Flax module.
    tx: the sparse optimizer.
    image_shape: (H, W, C) of the inputs.
    reinit_key: PRNG key of the sparse He re-initialisation.
    call_order: if given, filled with module path -> call index during the
      first trace, to list layers input side first (pytrees sort dict keys,
      which puts 'head' before 'stem' and 'block10' before 'block2').

  Returns:
    The init function.

  Raises:
    ValueError: an unknown `sparsity.init`.
  """
  if config.sparsity.init not in ('sparse_he', 'masked'):
    raise ValueError("sparsity.init must be 'sparse_he' or 'masked', got "
                     f'{config.sparsity.init!r}.')
  order = {} if call_order is None else call_order

  def record_call(next_fun, args, kwargs, context):
    if context.method_name == '__call__':
      order.setdefault('/'.join(context.module.path), len(order))
    return next_fun(*args, **kwargs)

  def init(key):
    params_key, dropout_init_key = jax.random.split(key)
    dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    with flax.linen.intercept_methods(record_call):
      variables = model.init(
          {'params': params_key, 'dropout': dropout_init_key}, dummy,
          train=False)
    params = variables['params']
    opt_state = tx.init(params)
    if config.sparsity.init == 'sparse_he':
      params = srigl_jax.sparse_init(params, opt_state, reinit_key)
    else:
      params = srigl_jax.apply_masks(params, opt_state)
    return TrainState(step=jnp.zeros([], jnp.int32), apply_fn=model.apply,
                      params=params, tx=tx, opt_state=opt_state,
                      batch_stats=variables.get('batch_stats', {}))

  return init


# ------------------------------------------------------------------- steps


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy; labels are int ids or soft targets."""
  num_classes = logits.shape[-1]
  if labels.ndim == logits.ndim:
    targets = labels.astype(jnp.float32)
  else:
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _hard_labels(labels):
  return jnp.argmax(labels, -1) if labels.ndim == 2 else labels


def _variables(params, batch_stats):
  return {'params': params, 'batch_stats': batch_stats} if batch_stats else {
      'params': params}


def make_train_step(model, config, dropout_key, batch_sharding):
  """Builds `train_step(state, batch) -> (state, metrics)` (not yet jitted)."""
  accum = int(config.optim.grad_accum_steps)
  smoothing = float(config.optim.label_smoothing)
  skip_bad_steps = bool(config.get('skip_bad_steps', False))

  def loss_fn(params, batch_stats, batch, rng):
    logits, new_vars = model.apply(
        _variables(params, batch_stats), batch['image'], train=True,
        mutable=['batch_stats'], rngs={'dropout': rng})
    loss = jnp.mean(cross_entropy(logits, batch['label'], smoothing))
    correct = jnp.mean(
        (jnp.argmax(logits, -1) == _hard_labels(batch['label'])).astype(
            jnp.float32))
    return loss, (new_vars.get('batch_stats', batch_stats), correct)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch):
    rng = jax.random.fold_in(dropout_key, state.step)
    if accum == 1:
      (loss, (batch_stats, acc)), grads = grad_fn(
          state.params, state.batch_stats, batch, rng)
    else:
      # Micro-batch i takes rows i, i + accum, ... so that every device holds
      # its share of every micro-batch (a contiguous split would put each
      # micro-batch on a few devices only).
      def split(x):
        x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        return jax.lax.with_sharding_constraint(
            x, jax.sharding.NamedSharding(
                batch_sharding.mesh, jax.sharding.PartitionSpec(None, 'data')))

      micro = jax.tree.map(split, batch)
      zeros = jax.tree.map(jnp.zeros_like, state.params)

      def body(carry, xs):
        g_sum, loss_sum, acc_sum, bs = carry
        mb, i = xs
        (loss, (bs, acc)), g = grad_fn(
            state.params, bs, mb, jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, g_sum, g), loss_sum + loss,
                acc_sum + acc, bs), None

      (grads, loss, acc, batch_stats), _ = jax.lax.scan(
          body, (zeros, 0.0, 0.0, state.batch_stats),
          (micro, jnp.arange(accum)))
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss, acc = loss / accum, acc / accum
    finite = faults.finite_flags(grads)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if skip_bad_steps:
      new_state = faults.keep_if_finite(faults.step_ok(loss, finite),
                                        new_state, state)
    return new_state, {'loss': loss, 'accuracy': acc,
                       faults.GRAD_FINITE: finite}

  return train_step


def make_eval_step(model):
  """Builds `eval_step(state, batch) -> sums` over the real (mask 1) rows."""

  def eval_step(state, batch):
    logits = model.apply(_variables(state.params, state.batch_stats),
                         batch['image'], train=False)
    mask = batch['mask']
    correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
    loss = cross_entropy(logits, batch['label'])
    return {'correct': jnp.sum(correct * mask), 'loss': jnp.sum(loss * mask),
            'count': jnp.sum(mask)}

  return eval_step


def sparsity_metrics(state: TrainState) -> dict[str, jax.Array]:
  """Global sparsity and per-layer mask statistics as flat scalar metrics."""
  out = {'global_sparsity': srigl_jax.global_sparsity(state.opt_state,
                                                      state.params)}
  for path, stats in srigl_jax.layer_stats(state.opt_state).items():
    for field in _LAYER_FIELDS:
      out[f'{path}/{field}'] = stats[field]
  return out


# ------------------------------------------------------------------ helpers


def create_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """A 1-D ('data',) mesh over `config.mesh.data` devices (-1: all)."""
  devices = jax.devices()
  n = int(config.mesh.data)
  if n == -1:
    n = len(devices)
  if not 1 <= n <= len(devices):
    raise ValueError(f'mesh.data={config.mesh.data} but {len(devices)} devices '
                     'are available.')
  if jax.process_count() > 1 and n != len(devices):
    raise ValueError('A multi-process run must use all devices (mesh.data=-1).')
  return jax.sharding.Mesh(np.asarray(devices[:n]), ('data',))


def _to_global(batch, sharding):
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def _format_eta(seconds: float) -> str:
  seconds = int(max(0, seconds))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def _scalars(tree) -> dict[str, float]:
  return {k: np.asarray(v).item() for k, v in jax.device_get(tree).items()}


def _write_config(config, workdir):
  with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
    f.write(config.to_json_best_effort(indent=2))


# -------------------------------------------------------------------- main


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
  """Makes glibc keep freed memory for reuse instead of handing it back.

  XLA:CPU allocates the temporaries of a compiled step afresh on every call.
  Above glibc's mmap threshold (at most 32 MiB) each such allocation is a new
  mapping whose pages fault in again on every step. The SRigL step of the
  Fashion-MNIST MLP (44 MiB of temporaries, most of them for the mask update
  that runs once per `update_every` steps) took 10.3 ms against RigL's 6.1 ms
  (30 MiB) for that reason alone, and 6.6 ms with this setting. Serving every
  allocation from the heap and not trimming it keeps the pages mapped; the
  process then holds on to its peak memory, which a training job does anyway.

  `train_and_evaluate` calls it on CPU backends; a trainer of your own on a
  CPU host can call it once at start. Set SRIGL_JAX_SYSTEM_MALLOC=1 to keep
  glibc's defaults.

  Returns:
    Whether the setting took (False off glibc, or when opted out).
  """
  if os.environ.get('SRIGL_JAX_SYSTEM_MALLOC') == '1':
    return False
  name = ctypes.util.find_library('c')
  try:
    libc = ctypes.CDLL(name) if name else None
  except OSError:
    libc = None
  if libc is None or not hasattr(libc, 'mallopt'):
    return False
  return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(
      libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> TrainState:
  """Trains and evaluates a (sparse) model, resuming from `workdir` if possible.

  Args:
    config: an experiment config (see `srigl_jax.config_lib.base_config`).
    workdir: directory for checkpoints, metrics, plots and the summary.

  Returns:
    The final TrainState (of the step saved on SIGTERM, if preempted).

  Raises:
    FloatingPointError: the training loss became NaN or infinite.
    ValueError: an invalid config (before anything is compiled).
  """
  if '://' in workdir:
    raise ValueError(
        f'workdir={workdir!r}: use a local or mounted path (e.g. a GCS bucket '
        'mounted with gcsfuse at /gcs/BUCKET); metrics and plots are written '
        'with plain file I/O.')
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
  if jax.default_backend() == 'cpu' and keep_freed_memory():
    logging.info('glibc malloc: freed memory kept for reuse '
                 '(SRIGL_JAX_SYSTEM_MALLOC=1 turns this off).')

  mesh = create_mesh(config)
  n_devices = mesh.devices.size
  # Keys, types, ranges, layer fan-ins and the workdir's checkpoints, before
  # any data is read or anything compiled.
  checks.preflight(config, workdir, n_devices)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec('data'))

  dataset = data_lib.create_dataset(
      config.input, seed=config.seed, global_batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size or config.batch_size)
  num_train_steps = int(config.num_train_steps)
  model = models.get_model(config.model.name, dataset.num_classes,
                           dtype=jnp.dtype(config.model.dtype),
                           **config.model.kwargs.to_dict())
  root = jax.random.key(config.seed)
  init_key, sparse_key, reinit_key, dropout_key = jax.random.split(root, 4)
  lr_fn = create_learning_rate_fn(config.optim, dataset.steps_per_epoch,
                                  num_train_steps)
  tx = create_optimizer(config, lr_fn, sparse_key)

  call_order: dict[str, int] = {}
  init = make_init_fn(config, model, tx, tuple(dataset.image_shape), reinit_key,
                      call_order)

  # Shapes first: a bad sparsity setting fails here, before any compile.
  abstract_state = jax.eval_shape(init, init_key)
  state_sharding = jax.tree.map(lambda _: replicated, abstract_state)
  monitor = faults.FaultMonitor(
      faults.leaf_paths(abstract_state.params), call_order,
      skip_bad_steps=bool(config.get('skip_bad_steps', False)))

  ckpt = checkpointing.Checkpointer(workdir, config)
  latest = ckpt.latest_step()
  if latest is not None:
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_state, state_sharding)
    state = ckpt.restore(latest, target)
    logging.info('Resumed from %s at step %d.', ckpt.directory, latest)
  else:
    state = jax.jit(init, out_shardings=state_sharding)(init_key)
  start_step = int(jax.device_get(state.step))

  jsonl_path = os.path.join(workdir, 'metrics.jsonl')
  if is_main:
    metric_writers.truncate_jsonl(jsonl_path, start_step)
    _write_config(config, workdir)
    writer = metric_writers.MultiWriter([
        metric_writers.TensorBoardWriter(workdir),
        metric_writers.JsonlWriter(jsonl_path),
    ])
  else:
    writer = metric_writers.NoOpWriter()

  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
      abstract_state.params))
  method, _ = config_lib.optimizer_method(config)
  stop_step = config_lib.resolve_stop_step(config)
  dynamic = method in ('set', 'rigl', 'srigl')
  logging.info(
      'Model %s (%d params), %s at sparsity %.3f, %d devices, global batch %d, '
      '%d steps (%d per epoch), masks updated every %d steps until step %d.',
      config.model.name, n_params, config.sparsity.method,
      config.sparsity.sparsity, n_devices, config.batch_size, num_train_steps,
      dataset.steps_per_epoch, config.sparsity.update_every, stop_step)

  train_step = jax.jit(
      make_train_step(model, config, dropout_key, batch_sharding),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, replicated), donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(model),
                      in_shardings=(state_sharding, batch_sharding),
                      out_shardings=replicated)
  stats_fn = jax.jit(sparsity_metrics, in_shardings=(state_sharding,),
                     out_shardings=replicated)

  def evaluate(state):
    totals = None
    for batch in dataset.eval_batches():
      sums = eval_step(state, _to_global(batch, batch_sharding))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = _scalars(totals)
    count = max(totals['count'], 1.0)
    return {'eval_accuracy': totals['correct'] / count,
            'eval_loss': totals['loss'] / count}

  log_every = max(1, int(config.log_every))
  eval_every = int(config.eval_every)
  ckpt_every = int(config.checkpoint_every)
  halt_after = config.halt_after_step
  pending: list[tuple[int, dict[str, jax.Array]]] = []
  train_time, timed_steps = 0.0, 0  # Excludes compilation, eval, checkpoints.
  interval_start, interval_steps = None, 0
  last_eval: dict[str, float] = {}

  def flush_train_metrics(step) -> dict[str, float]:
    """Fetches the pending step metrics: NaN check, progress line, means."""
    nonlocal interval_start, interval_steps, train_time, timed_steps
    if not pending:
      return {}
    values = jax.device_get([m for _, m in pending])
    # Raises faults.NonFiniteError (a FloatingPointError) naming the step
    # and layer, unless skip_bad_steps dropped the step.
    applied = monitor.check([s for s, _ in pending], values,
                            ckpt.latest_step())
    values = [v for v, ok in zip(values, applied) if ok]
    losses = np.array([v['loss'] for v in values], np.float64)
    now = time.perf_counter()
    rate = None
    if interval_start is not None and interval_steps:
      elapsed = now - interval_start
      rate = interval_steps / max(elapsed, 1e-9)
      train_time += elapsed
      timed_steps += interval_steps
    scalars = {
        'train_loss': float(np.mean(losses)) if values else float('nan'),
        'train_accuracy': (float(np.mean([v['accuracy'] for v in values]))
                           if values else float('nan')),
        'learning_rate': float(lr_fn(step - 1))}
    if monitor.skip_bad_steps:
      scalars['skipped_steps'] = monitor.skipped_steps
    if rate is not None:
      scalars['steps_per_sec'] = rate
    eta = (_format_eta((num_train_steps - step) / rate) if rate else '?')
    logging.info('step %d/%d  loss %.4f  train acc %.4f  %s steps/s  ETA %s',
                 step, num_train_steps, scalars['train_loss'],
                 scalars['train_accuracy'],
                 f'{rate:.2f}' if rate else '?', eta)
    pending.clear()
    interval_start, interval_steps = time.perf_counter(), 0
    return scalars

  def pause_timer():
    """Stops the throughput clock (before eval/checkpoint work)."""
    nonlocal interval_start, interval_steps, train_time, timed_steps
    if interval_start is not None and interval_steps:
      jax.block_until_ready(state.step)
      train_time += time.perf_counter() - interval_start
      timed_steps += interval_steps
    interval_start, interval_steps = None, 0

  if start_step == 0:
    writer.write_scalars(0, _scalars(stats_fn(state)))  # The initial masks.
  train_iter = dataset.train_batches(start_step=start_step)
  step = start_step
  end_step = (num_train_steps if halt_after is None else
              min(num_train_steps, int(halt_after)))
  preempted = False
  with ckpt:  # Waits for the last async save; SIGTERM handling while open.
    try:
      while step < end_step:
        batch = _to_global(next(train_iter), batch_sharding)
        state, metrics = train_step(state, batch)
        step += 1
        pending.append((step, metrics))
        if interval_start is None:
          # The first step after (re)start includes compilation: time from
          # here.
          jax.block_until_ready(state.step)
          interval_start, interval_steps = time.perf_counter(), 0
        else:
          interval_steps += 1
        is_last = step == num_train_steps
        # Every process asks at every step: they all stop at the same one.
        preempted = not is_last and ckpt.reached_preemption(step)
        halting = (step == end_step and not is_last) or preempted
        do_eval = is_last or (eval_every > 0 and step % eval_every == 0)
        do_ckpt = is_last or halting or (ckpt_every > 0 and
                                         step % ckpt_every == 0)
        mask_update = (dynamic and step % config.sparsity.update_every == 0
                       and step < stop_step)
        record = {}  # One metrics.jsonl line per step, all fields together.
        if step % log_every == 0 or do_eval or do_ckpt or mask_update:
          record.update(flush_train_metrics(step))
        if mask_update or do_eval:
          pause_timer()
          record.update(_scalars(stats_fn(state)))
          if do_eval:
            last_eval = evaluate(state)
            record.update(last_eval)
            logging.info('step %d  eval accuracy %.4f  eval loss %.4f  '
                         'global sparsity %.4f', step,
                         last_eval['eval_accuracy'], last_eval['eval_loss'],
                         record['global_sparsity'])
        if record:
          writer.write_scalars(step, record)
        if do_ckpt:
          pause_timer()
          ckpt.save(step, state)
          writer.flush()
        if halting:
          logging.info('%s after step %d, checkpoint saved; run the same '
                       'command again to continue.',
                       'Preempted (SIGTERM)' if preempted else
                       'Halting (halt_after_step)', step)
          break
    finally:
      if hasattr(train_iter, 'close'):
        train_iter.close()
      writer.close()

  export_error = None
  if step >= num_train_steps and is_main:
    if not last_eval:
      last_eval = evaluate(state)
    inference = None
    if config.get('export', True) and jax.process_count() > 1:
      # export_model runs on this process only, and its orbax save waits for
      # every process of the job: it would never return.
      logging.warning('Multi-process run: not exported. Export the final '
                      'checkpoint from one process: python -m srigl_jax.export '
                      '--workdir=%s', workdir)
    elif config.get('export', True):
      # The payoff of sparse training: a verified, faster inference model.
      try:
        inference = export_lib.export_model(
            model, state.params, state.batch_stats,
            srigl_jax.get_masks(state.opt_state), config,
            os.path.join(workdir, 'inference'), step=step, workdir=workdir)
      except Exception as e:  # pylint: disable=broad-except
        export_error = e  # Raised once the summary and plots are written.
    write_summary_and_plots(
        workdir, config, _scalars(stats_fn(state)), last_eval,
        steps_per_sec=timed_steps / train_time if train_time > 0 else None,
        n_devices=n_devices, num_params=n_params, call_order=call_order,
        inference=inference)
  if export_error is not None:
    logging.error('Export failed; training finished and is checkpointed. '
                  'Retry with: python -m srigl_jax.export --workdir=%s',
                  workdir)
    raise export_error
  return state


# ---------------------------------------------------------- summary, plots


def write_summary_and_plots(workdir, config, sparsity_scalars, final_eval, *,
                            steps_per_sec, n_devices, num_params,
                            call_order=None, inference=None):
  """Writes summary.json and (unless config.write_plots is False) the plots.

  Args:
    workdir: output directory.
    config: the run's config.
    sparsity_scalars: `sparsity_metrics` of the final state, as floats.
    final_eval: {'eval_accuracy', 'eval_loss'} of the final state.
    steps_per_sec: measured training throughput (None if unknown).
    n_devices: devices of the mesh.
    num_params: total number of parameters.
    call_order: module path -> call index, to order the layers input first.
    inference: the export report (`srigl_jax.export.export_model`), or None
      when the run was not exported.
  """
  layers = {}
  for key, value in sparsity_scalars.items():
    if '/' in key:
      path, field = key.rsplit('/', 1)
      layers.setdefault(path, {})[field] = value
  order = call_order or {}
  layers = dict(sorted(
      layers.items(),
      key=lambda kv: (order.get(kv[0].rsplit('/', 1)[0], len(order)), kv[0])))
  for s in layers.values():
    s['active_neurons_pct'] = 100.0 * s['active_neurons'] / max(s['neurons'], 1)
  global_sparsity = sparsity_scalars['global_sparsity']
  summary = {
      'final_step': int(config.num_train_steps),
      'eval_accuracy': final_eval.get('eval_accuracy'),
      'eval_loss': final_eval.get('eval_loss'),
      'steps_per_sec': steps_per_sec,
      'devices': n_devices,
      'global_batch_size': int(config.batch_size),
      'model': config.model.name,
      'dataset': config.input.name,
      'method': config.sparsity.method,
      'target_sparsity': float(config.sparsity.sparsity),
      'global_sparsity': global_sparsity,
      'num_params': num_params,
      'num_nonzero_params': int(round(num_params * (1.0 - global_sparsity))),
      'layers': layers,
  }
  if inference is not None:
    summary['inference'] = {
        key: inference.get(key) for key in (
            'path', 'kind', 'masked_accuracy', 'condensed_accuracy',
            'max_abs_logit_diff')}
    summary['inference']['latency'] = [
        {key: r[key] for key in ('batch', 'dense_us', 'condensed_us')}
        for r in inference.get('latency', [])]
  with open(os.path.join(workdir, 'summary.json'), 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=2)
  if config.write_plots:
    records = metric_writers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
    plot_metrics(records, list(layers), workdir)
  logging.info('Final eval accuracy %.4f, global sparsity %.4f, %s steps/s. '
               'Summary: %s', summary['eval_accuracy'] or float('nan'),
               summary['global_sparsity'],
               f'{steps_per_sec:.2f}' if steps_per_sec else '?',
               os.path.join(workdir, 'summary.json'))
  if inference is not None:
    logging.info('%s', export_lib.summary_line(inference))


def plot_metrics(records: list[dict[str, Any]], layer_paths: list[str],
                 out_dir: str) -> list[str]:
  """Writes accuracy.png and active_neurons.png from metrics.jsonl records.

  Args:
    records: the parsed lines of metrics.jsonl.
    layer_paths: sparse layer paths, input side first.
    out_dir: where to write the PNG files.

  Returns:
    The paths written.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  def series(key):
    pts = [(r['step'], r[key]) for r in records
           if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]

  written = []
  fig, ax = plt.subplots(figsize=(6, 4))
  for key, label in (('train_accuracy', 'train (batch)'),
                     ('eval_accuracy', 'eval')):
    xs, ys = series(key)
    if xs:
      ax.plot(xs, [100 * y for y in ys], marker='o' if key.startswith('eval')
              else None, markersize=3, label=label)
  ax.set_xlabel('step')
  ax.set_ylabel('accuracy (%)')
  ax.set_title('Accuracy')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path = os.path.join(out_dir, 'accuracy.png')
  fig.savefig(path, dpi=120)
  plt.close(fig)
  written.append(path)

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  cmap = plt.get_cmap('viridis')
  final_pct = []
  for i, path_ in enumerate(layer_paths):
    xs, active = series(f'{path_}/active_neurons')
    _, total = series(f'{path_}/neurons')
    pct = [100.0 * a / max(t, 1) for a, t in zip(active, total)]
    color = cmap(i / max(1, len(layer_paths) - 1))
    if xs:
      ax1.plot(xs, pct, color=color,
               label=path_ if len(layer_paths) <= 12 else None)
    final_pct.append(pct[-1] if pct else 100.0)
  ax1.set_xlabel('step')
  ax1.set_ylabel('active neurons (% of layer)')
  ax1.set_title('Active neurons per layer during training')
  ax1.set_ylim(0, 105)
  ax1.grid(alpha=0.3)
  if 0 < len(layer_paths) <= 12:
    ax1.legend(fontsize=7)
  ax2.bar(range(len(final_pct)), final_pct,
          color=[cmap(i / max(1, len(final_pct) - 1))
                 for i in range(len(final_pct))])
  ax2.set_xlabel('layer (input side first)')
  ax2.set_ylabel('active neurons (% of layer)')
  ax2.set_title('Active neurons per layer at the end')
  ax2.set_ylim(0, 105)
  if len(layer_paths) <= 24:
    ax2.set_xticks(range(len(layer_paths)))
    ax2.set_xticklabels([p.removesuffix('/kernel') for p in layer_paths],
                        rotation=60, ha='right', fontsize=6)
  fig.tight_layout()
  path = os.path.join(out_dir, 'active_neurons.png')
  fig.savefig(path, dpi=120)
  plt.close(fig)
  written.append(path)
  return written
