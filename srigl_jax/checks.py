"""The config checks run before anything is compiled.

A run that fails after minutes of compilation, or hours into training, for a
reason visible in its config wastes the machine. `check_config(config,
n_devices)` runs, before any data is read:

  * the config's keys and value types against the schema,
    `config_lib.base_config` (ml_collections' own checks),
  * the trainer's value ranges (steps, batch sizes, optimizer, model), and the
    owners' own checks of theirs: the sparse optimizer's factory (sparsity in
    [0, 1), gamma_sal in [0, 1], delta and T_end > 0, ...) and the Dataset's
    (`data.resolve_input_config`),
  * batch sizes divisible by the devices (and gradient micro-batches).

`train.preflight` then checks the workdir's fingerprint
(`checkpointing.check_workdir`) and runs the trainer's own `jax.eval_shape`
of its init, which checks every sparse layer's fan-in; `explain_fan_in_error`
adds the model's largest global sparsity to that error.

Every failure raises `ConfigError` (a `ValueError`) or `WorkdirMismatchError`
whose message names the offending field and how to fix it.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections

from srigl_jax import checkpointing, config_lib, models, train_state
from srigl_jax import data as data_lib
from srigl_jax.sparsity import layers as layers_lib

# The workdir check lives with the checkpoints; these names stay here for
# callers of the preflight API.
FINGERPRINT_FILE = checkpointing.FINGERPRINT_FILE
WorkdirMismatchError = checkpointing.WorkdirMismatchError
fingerprint = checkpointing.fingerprint
check_workdir = checkpointing.check_workdir

_INITS = ('sparse_he', 'masked')
ConfigError = config_lib.ConfigError


# ------------------------------------------------------------- keys, types

# ml_collections checks keys and types against the schema, base_config.
check_keys_and_types = config_lib.check_schema


def _field(config, dotted: str) -> Any:
  """The value at a dotted key of a (nested) config."""
  node = config
  for part in dotted.split('.'):
    node = node[part]
  return node


# ------------------------------------------------------------------ ranges


def _fail(key: str, value: Any, why: str, fix: str) -> None:
  raise ConfigError(f'{key}={value!r} {why}. Fix: {fix}.')


def _positive_int(config, key: str, example: int) -> None:
  value = _field(config, key)
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    _fail(key, value, 'must be a positive integer', f'pass --config.{key}={example}')


def check_values(config: ml_collections.ConfigDict) -> None:
  """Range checks of the fields that define the run.

  Args:
    config: the full config (keys and types already checked).

  Raises:
    ConfigError: the first invalid value, with the field and the fix.
  """
  sp = config.sparsity
  if sp.method not in config_lib.RECIPES:
    _fail(
        'sparsity.method',
        sp.method,
        'is not a known method',
        f'use one of {list(config_lib.RECIPES)}',
    )
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
  if sp.init not in _INITS:
    _fail('sparsity.init', sp.init, 'is unknown', f'use one of {list(_INITS)}')
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
  # The components own the ranges of their settings: the optimizer factory
  # (optim.*, and sparsity.* through the sparse optimizer), the model
  # registry and the Dataset. Building them is cheap (nothing is traced or
  # read), so their own checks run here, before any data is read.
  try:
    lr_fn = train_state.create_learning_rate_fn(config.optim, 1, int(config.num_train_steps))
    train_state.create_optimizer(config, lr_fn, jax.random.key(0))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  try:
    data_lib.resolve_input_config(config.input)
  except ValueError as e:
    raise ConfigError(f'{e}. Fix the input.* fields.') from None
  try:
    _, num_classes = data_lib.input_geometry(config.input)
    models.get_model(config.model.name, num_classes, **config.model.kwargs.to_dict())
  except (ValueError, TypeError) as e:
    raise ConfigError(
        f'model: {e}. Fix: --config.model.name (one of {list(models.MODEL_NAMES)}) or the '
        'model.kwargs fields.'
    ) from None


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


# -------------------------------------------------------- layer geometry


# The Dataset owns its geometry; export and the benchmarks read it here.
input_geometry = data_lib.input_geometry


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


def explain_fan_in_error(error: ValueError, params: Any, config: ml_collections.ConfigDict):
  """A layer's fan-in would reach 0: the error, plus the model's largest global sparsity.

  Args:
    error: the sparse optimizer's error naming the layer.
    params: the model's params or their ShapeDtypeStructs.
    config: the full config.

  Returns:
    A ConfigError naming the layer, the largest sparsity it can take and the
    largest global sparsity of the whole model, to raise.
  """
  best = max_global_sparsity(params, config)
  return ConfigError(
      f'{error} With sparsity.distribution={config.sparsity.distribution!r} the '
      f'largest global sparsity this model can take is {best:.4f}: pass '
      f'--config.sparsity.sparsity={best:.4f} or lower.'
  )


def check_config(config: ml_collections.ConfigDict, n_devices: int | None = None) -> None:
  """The config's checks: keys and types, ranges, batch sizes.

  The layer fan-ins are checked by the trainer's own `jax.eval_shape` of its
  init (`train.preflight`).

  Args:
    config: the full config.
    n_devices: devices of the mesh; None skips the batch-size check.

  Raises:
    ConfigError: see the individual checks.
  """
  check_keys_and_types(config)
  check_values(config)
  if n_devices is not None:
    check_batch_sizes(config, n_devices)
