"""The trainer's checks of its own config fields, and the fan-in error's explanation.

`check_config(config, n_devices)` checks what the trainer itself reads: the
config's keys and value types against the schema (`config_lib.check_schema`),
the method recipe, the step counts and batch sizes, the compute dtype, and the
batch split over devices and gradient micro-batches. The other groups are
checked by their owners when `training.build` builds them: `input.*` by the
Dataset, `model.*` by the model registry, `optim.*` by the optimizer factory and
`sparsity.*` by the sparse optimizer.

A failure raises `config_lib.ConfigError`, whose `field` names the offending
field and whose message says how to fix it.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from srigl_jax import config_lib
from srigl_jax.sparsity import layers as layers_lib


def _field(config, dotted: str) -> Any:
  """The value at a dotted key of a (nested) config."""
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


def _fail(key: str, value: Any, why: str, fix: str) -> None:
  raise config_lib.ConfigError(f'{key}={value!r} {why}. Fix: {fix}.', field=key)


def _positive_int(config, key: str, example: int) -> None:
  value = _field(config, key)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    _fail(key, value, 'must be a positive integer', f'pass --config.{key}={example}')


def check_values(config: ml_collections.ConfigDict) -> None:
  """Range checks of the trainer's own fields.

  Args:
    config: the full config (keys and types already checked).

  Raises:
    ConfigError: the first invalid value, with the field and the fix.
  """
  sp = config.sparsity
  config_lib.optimizer_method(config)  # The recipe named by sparsity.method.
  if sp.method == 'dense' and sp.sparsity != 0.0:
    _fail(
        'sparsity.sparsity',
        sp.sparsity,
        "is ignored by method 'dense'",
        'set it to 0.0 or pick a sparse method',
    )
  if not 0.0 < sp.stop_fraction <= 1.0:
    _fail(
        'sparsity.stop_fraction',
        sp.stop_fraction,
        'must be in (0, 1]: T_end = stop_fraction * num_train_steps',
        'use e.g. 0.75, or set sparsity.stop_step',
    )
  for key, example in (
      ('num_train_steps', 1000),
      ('batch_size', 128),
      ('optim.grad_accum_steps', 1),
      ('keep_checkpoints', 3),
  ):
    _positive_int(config, key, example)
  if config.eval_batch_size is not None:
    _positive_int(config, 'eval_batch_size', config.batch_size)
  if config.model.dtype not in config_lib.DTYPES:
    _fail('model.dtype', config.model.dtype, 'is unknown', f'use one of {list(config_lib.DTYPES)}')


def check_batch_sizes(config: ml_collections.ConfigDict, n_devices: int) -> None:
  """The global batch must split evenly over devices and micro-batches.

  (Its split over processes is the Dataset's check: `data.create_dataset`.)

  Args:
    config: the full config.
    n_devices: devices of the data mesh (all processes).

  Raises:
    ConfigError: a batch size that does not divide, with the nearest valid ones.
  """
  accum = int(config.optim.grad_accum_steps)
  unit = n_devices * accum
  b = int(config.batch_size)
  if b % unit:
    lower, upper = max(unit, b // unit * unit), (b // unit + 1) * unit
    _fail(
        'batch_size',
        b,
        f'is not divisible by the {n_devices} devices x '
        f'optim.grad_accum_steps={accum} (= {unit})',
        f'use a multiple of {unit}, e.g. --config.batch_size={lower} or '
        f'{upper}, or change mesh.data / grad_accum_steps',
    )
  eb = int(config.eval_batch_size or b)
  if eb % n_devices:
    _fail(
        'eval_batch_size',
        eb,
        f'is not divisible by the {n_devices} devices',
        f'use a multiple of {n_devices}, e.g. '
        f'--config.eval_batch_size={max(n_devices, eb // n_devices * n_devices)}',
    )


def check_config(config: ml_collections.ConfigDict, n_devices: int | None = None) -> None:
  """The trainer's checks: keys and types, its own ranges, batch sizes.

  Args:
    config: the full config.
    n_devices: devices of the mesh; None skips the batch-size check.

  Raises:
    ConfigError: see the individual checks.
  """
  config_lib.check_schema(config)
  check_values(config)
  if n_devices is not None:
    check_batch_sizes(config, n_devices)


# -------------------------------------------------------- layer geometry


def _specs(params, config, sparsity: float):
  sp = config.sparsity
  method, _ = config_lib.optimizer_method(config)
  return layers_lib.build_layer_specs(
      params,
      sparsity=sparsity,
      distribution=sp.distribution,
      erk_power_scale=float(sp.erk_power_scale),
      sparse_rule=sp.sparse_rule,
      dense_layers=tuple(sp.dense_layers),
      no_ablation=tuple(sp.no_ablation),
      constant_fan_in=method == 'srigl',
  )


def max_global_sparsity(params, config, tol: float = 1e-4) -> float:
  """The largest global sparsity whose every sparse layer keeps fan-in >= 1."""
  lo, hi = 0.0, 1.0 - 1e-9
  while hi - lo > tol:
    mid = (lo + hi) / 2
    try:
      _specs(params, config, mid)
      lo = mid
    except ValueError:
      hi = mid
  return math.floor(lo / tol) * tol


def explain_fan_in_error(
    error: ValueError, params: Any, config: ml_collections.ConfigDict
) -> config_lib.ConfigError:
  """A layer's fan-in would reach 0: the error, plus the model's largest global sparsity.

  Args:
    error: the sparse optimizer's error naming the layer.
    params: the model's params or their ShapeDtypeStructs.
    config: the full config.

  Returns:
    A ConfigError on 'sparsity.sparsity' naming the layer, the largest sparsity
    it can take and the largest global sparsity of the whole model, to raise.
  """
  best = max_global_sparsity(params, config)
  return config_lib.ConfigError(
      f'{error} With sparsity.distribution={config.sparsity.distribution!r} the '
      f'largest global sparsity this model can take is {best:.4f}: pass '
      f'--config.sparsity.sparsity={best:.4f} or lower.',
      field='sparsity.sparsity',
  )
