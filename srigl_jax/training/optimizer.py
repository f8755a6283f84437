"""The optimizer factory: the learning-rate schedule and the sparse optimizer.

`create_learning_rate_fn` builds the learning-rate schedule of the `optim`
group from optax schedules; `LearningRate` is that schedule for a trainer that
builds its optimizer before it knows how many steps an epoch has.
`create_optimizer` builds the inner optax optimizer and wraps it in the sparse
optimizer. Both own their config groups: `optim.*` is checked here and
`sparsity.*` by the sparse optimizer, whose errors come back as a
`ConfigError` on the field its argument stands for.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Callable

import jax
import ml_collections
import optax

from srigl_jax import config_lib
from srigl_jax.sparsity import layers as layers_lib
from srigl_jax.sparsity import transform as sparse_transform


def _check_schedule(optim: ml_collections.ConfigDict) -> None:
  base = float(optim.learning_rate)
  if not (math.isfinite(base) and base > 0):
    raise config_lib.ConfigError(
        f'optim.learning_rate={optim.learning_rate!r} must be a finite number > 0. '
        'Fix: use e.g. 0.1 (SGD) or 1e-3 (AdamW).',
        field='optim.learning_rate',
    )
  if optim.schedule not in config_lib.SCHEDULES:
    raise config_lib.ConfigError(
        f'optim.schedule={optim.schedule!r} is unknown. Fix: use one of '
        f'{list(config_lib.SCHEDULES)}.',
        field='optim.schedule',
    )


def _schedule(
    optim: ml_collections.ConfigDict, steps_per_epoch: int, num_train_steps: int
) -> optax.Schedule:
  """`create_learning_rate_fn` of a checked `optim` group."""
  base = float(optim.learning_rate)
  warmup = int(round(optim.warmup_epochs * steps_per_epoch))
  if optim.schedule == 'cosine':
    # decay_steps includes the warm-up: the cosine ends at num_train_steps.
    return optax.warmup_cosine_decay_schedule(
        0.0, base, warmup, max(num_train_steps, warmup + 1), end_value=0.0
    )
  if optim.schedule == 'step':
    every = max(1, int(round(optim.decay_every_epochs * steps_per_epoch)))
    boundaries = list(range(every, num_train_steps + 1, every))
  elif optim.schedule == 'multistep':
    boundaries = [int(round(e * steps_per_epoch)) for e in optim.boundaries_epochs]
  else:  # 'constant'
    boundaries = []
  factor = float(optim.decay_factor)
  # join_schedules starts the decay's count at the end of the warm-up, so its
  # boundaries move back by `warmup`; those inside the warm-up apply at once.
  scales = collections.Counter(b - warmup for b in boundaries if b > warmup)
  decay = optax.piecewise_constant_schedule(
      base * factor ** sum(b <= warmup for b in boundaries),
      {b: factor**n for b, n in scales.items()},
  )
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, base, warmup), decay], [warmup])


def create_learning_rate_fn(
    optim: ml_collections.ConfigDict, steps_per_epoch: int, num_train_steps: int
) -> optax.Schedule:
  """The learning rate as a function of the optimizer step (optax schedules).

  Schedules (epoch fields are converted with `steps_per_epoch`):
    'constant'.
    'step': times `decay_factor` every `decay_every_epochs` (the paper's CIFAR
      runs: x0.2 every 77 epochs).
    'multistep': times `decay_factor` at each of `boundaries_epochs`
      (ResNet-50: x0.1 at 30/70/90).
    'cosine': cosine decay to 0 at `num_train_steps`.
  All start with a linear warm-up from 0 over `warmup_epochs` when it is > 0;
  decay boundaries count from the start of training, warm-up included.

  Args:
    optim: the `optim` config group.
    steps_per_epoch: train steps per epoch.
    num_train_steps: total train steps.

  Returns:
    A jittable schedule `step -> learning rate`.

  Raises:
    ConfigError: an unknown schedule or a learning rate that is not > 0.
  """
  _check_schedule(optim)
  return _schedule(optim, steps_per_epoch, num_train_steps)


class LearningRate:
  """The schedule of `create_learning_rate_fn`, its epoch length given later.

  The trainer builds its optimizer, and with it every check of the config,
  before it opens the Dataset, so that a bad config fails before any data is
  read; but how many steps an epoch has is known only once the Dataset is open.
  `set_steps_per_epoch` tells it, once, before the optimizer first asks for a
  learning rate (in the first train step). Restoring a checkpoint, or tracing
  the init with `jax.eval_shape`, never asks.

  Args:
    optim: the `optim` config group (checked here).
    num_train_steps: total train steps.

  Raises:
    ConfigError: an unknown schedule or a learning rate that is not > 0.
  """

  def __init__(self, optim: ml_collections.ConfigDict, num_train_steps: int):
    _check_schedule(optim)
    self._optim = optim
    self._num_train_steps = int(num_train_steps)
    self._fn: optax.Schedule | None = None

  def set_steps_per_epoch(self, steps_per_epoch: int) -> None:
    """Fixes the epoch length (train steps per epoch) of the schedule."""
    if self._fn is not None:
      raise RuntimeError('The learning-rate schedule has its epoch length already.')
    self._fn = _schedule(self._optim, int(steps_per_epoch), self._num_train_steps)

  def __call__(self, step):
    if self._fn is None:
      raise RuntimeError(
          'The learning-rate schedule was asked for a rate before its epoch length '
          "was known: open the run's Dataset first (training.build.with_dataset, "
          'or build(..., open_dataset=True)).'
      )
    return self._fn(step)


def _decay_mask(pattern: str | None):
  if pattern is None:
    return None
  regex = re.compile(pattern)

  def mask_fn(params):
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: bool(regex.search(layers_lib.path_str(kp))), params
    )

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
    ConfigError: an unknown optimizer, or a sparsity setting the sparse
      optimizer refuses (its message, prefixed with the config group, on the
      field of the argument it names).
  """
  optim = config.optim
  parts = []
  if optim.grad_clip_norm is not None:
    parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  mask = _decay_mask(optim.decay_pattern)
  if optim.name == 'sgd':
    if optim.weight_decay:
      parts.append(optax.add_decayed_weights(optim.weight_decay, mask=mask))
    parts.append(optax.sgd(lr_fn, momentum=optim.momentum or None, nesterov=optim.nesterov))
  elif optim.name == 'adamw':
    parts.append(
        optax.adamw(
            lr_fn,
            b1=optim.momentum,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=mask,
        )
    )
  else:
    raise config_lib.ConfigError(
        f'optim.name={optim.name!r} is unknown. Fix: use one of {list(config_lib.OPTIMIZERS)}.',
        field='optim.name',
    )
  sp = config.sparsity
  method, gamma_sal = config_lib.optimizer_method(config)
  try:
    return sparse_transform.sparse_optimizer(
        optax.chain(*parts),
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
        group_size=sp.group_size,
        sparse_rule=sp.sparse_rule,
        dense_layers=tuple(sp.dense_layers),
        no_ablation=tuple(sp.no_ablation),
    )
  except layers_lib.SparseArgumentError as e:
    # The sparse optimizer's arguments carry the names of the sparsity group's
    # fields.
    raise config_lib.ConfigError(
        f'sparsity.{e} Fix: pass --config.sparsity.{e.argument} with a value in that range.',
        field=f'sparsity.{e.argument}',
    ) from None
