"""Train state and optimizer: schedules, the sparse optimizer, initialisation.

`create_learning_rate_fn` builds the learning-rate schedule from optax
schedules, `create_optimizer` the inner optax optimizer wrapped by the sparse
optimizer (its range checks run when it is built), and `make_init_fn` the
function that `jax.eval_shape` traces before anything is compiled and
`jax.jit` runs to create the `TrainState`.
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

import srigl_jax
from srigl_jax import config_lib


class TrainState(train_state.TrainState):
  """Flax TrainState plus BatchNorm statistics.

  `opt_state` holds the sparse optimizer's `SparseState` (masks included), so
  `srigl_jax.get_masks(state)` and `srigl_jax.layer_stats(state)` work on it.
  """

  batch_stats: Any = flax.struct.field(default_factory=dict)


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
    ValueError: an unknown schedule or a learning rate that is not > 0.
  """
  base = float(optim.learning_rate)
  if not (math.isfinite(base) and base > 0):
    raise ValueError(
        f'optim.learning_rate={optim.learning_rate!r} must be a finite number > 0. '
        'Fix: use e.g. 0.1 (SGD) or 1e-3 (AdamW).'
    )
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
  elif optim.schedule == 'constant':
    boundaries = []
  else:
    raise ValueError(
        f'optim.schedule={optim.schedule!r} is unknown. Fix: use one of '
        f'{list(config_lib.SCHEDULES)}.'
    )
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


def _decay_mask(pattern: str | None):
  if pattern is None:
    return None
  regex = re.compile(pattern)

  def mask_fn(params):
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: bool(regex.search(srigl_jax.sparsity.layers.path_str(kp))), params
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
    ValueError: an unknown optimizer, or a sparsity setting the sparse
      optimizer refuses (its message, prefixed with the config group).
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
    raise ValueError(
        f'optim.name={optim.name!r} is unknown. Fix: use one of {list(config_lib.OPTIMIZERS)}.'
    )
  inner = optax.chain(*parts)
  try:
    return _sparse_optimizer(config, inner, key)
  except ValueError as e:
    # The sparse optimizer's messages start with the argument's name, which
    # is the config field's name in the sparsity group.
    field = re.match(r'\w+', str(e)).group()
    raise ValueError(
        f'sparsity.{e} Fix: pass --config.sparsity.{field} with a value in that range.'
    ) from None


def _sparse_optimizer(config, inner, key):
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


def make_init_fn(
    config, model, tx, image_shape, reinit_key, call_order: dict[str, int] | None = None
):
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
    raise ValueError(
        "sparsity.init must be 'sparse_he' or 'masked', got " f'{config.sparsity.init!r}.'
    )
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
          {'params': params_key, 'dropout': dropout_init_key}, dummy, train=False
      )
    params = variables['params']
    opt_state = tx.init(params)
    if config.sparsity.init == 'sparse_he':
      params = srigl_jax.sparse_init(params, opt_state, reinit_key)
    else:
      params = srigl_jax.apply_masks(params, opt_state)
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        apply_fn=model.apply,
        params=params,
        tx=tx,
        opt_state=opt_state,
        batch_stats=variables.get('batch_stats', {}),
    )

  return init
