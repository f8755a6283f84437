"""Checks run before anything is compiled: config, geometry, workdir.

A run that fails after minutes of compilation, or hours into training, for a
reason visible in its config wastes the machine. `preflight(config, workdir,
n_devices)` gathers the checks the trainer makes before it builds any jitted
function:

  * the config's keys and value types against the schema,
    `config_lib.base_config` (ml_collections' own checks),
  * value ranges (sparsity in [0, 1), gamma_sal >= 0, delta and T_end > 0, ...),
  * batch sizes divisible by the devices (and gradient micro-batches),
  * every sparse layer keeps a fan-in >= 1 at the requested sparsity (from
    `jax.eval_shape`'d params: no weights are materialised),
  * the workdir's checkpoints were written by a run with the same model and
    sparse-optimizer state layout (`checkpointing.check_workdir`: the
    fingerprint stored in the newest checkpoint's orbax metadata).

Every failure raises `ConfigError` (a `ValueError`) or `WorkdirMismatchError`
whose message names the offending field and how to fix it.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from srigl_jax import checkpointing, config_lib, models
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
  if not 0.0 <= sp.sparsity < 1.0 or not math.isfinite(sp.sparsity):
    _fail(
        'sparsity.sparsity',
        sp.sparsity,
        'is outside [0, 1): it is the fraction of weights set to zero',
        'pass e.g. --config.sparsity.sparsity=0.9 (keeps 10%)',
    )
  if sp.method == 'dense' and sp.sparsity != 0.0:
    _fail(
        'sparsity.sparsity',
        sp.sparsity,
        "is ignored by method 'dense'",
        'set it to 0.0 or pick a sparse method',
    )
  if not sp.gamma_sal >= 0.0:
    _fail(
        'sparsity.gamma_sal',
        sp.gamma_sal,
        'is negative: it is the ablation threshold as a fraction of the ' 'fan-in',
        'use a value in [0, 1] (0 disables ablation; the paper ' 'uses 0.3)',
    )
  if sp.gamma_sal > 1.0:
    _fail(
        'sparsity.gamma_sal',
        sp.gamma_sal,
        'exceeds 1 and would ablate nearly every neuron',
        'use a value in ' '[0, 1]',
    )
  _positive_int(config, 'sparsity.update_every', 100)
  if not 0.0 < sp.stop_fraction <= 1.0:
    _fail(
        'sparsity.stop_fraction',
        sp.stop_fraction,
        'must be in (0, 1]: T_end = stop_fraction * num_train_steps',
        'use e.g. 0.75, or set sparsity.stop_step',
    )
  _positive_int(config, 'sparsity.stop_step', 1000)
  if not 0.0 < sp.drop_fraction <= 1.0:
    _fail('sparsity.drop_fraction', sp.drop_fraction, 'must be in (0, 1]', 'use e.g. 0.3')
  _positive_int(config, 'sparsity.grad_accumulation', 1)
  if sp.grad_accumulation > sp.update_every:
    _fail(
        'sparsity.grad_accumulation',
        sp.grad_accumulation,
        f'exceeds sparsity.update_every={sp.update_every}',
        'average at most update_every mini-batches',
    )
  if sp.distribution not in layers_lib.DISTRIBUTIONS:
    _fail(
        'sparsity.distribution',
        sp.distribution,
        'is unknown',
        f'use one of {list(layers_lib.DISTRIBUTIONS)}',
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
  if config.model.name not in models.MODEL_NAMES:
    _fail(
        'model.name',
        config.model.name,
        'is not a known model',
        f'use one of {list(models.MODEL_NAMES)}',
    )
  if config.model.dtype not in config_lib.DTYPES:
    _fail('model.dtype', config.model.dtype, 'is unknown', f'use one of {list(config_lib.DTYPES)}')
  if config.optim.name not in config_lib.OPTIMIZERS:
    _fail(
        'optim.name', config.optim.name, 'is unknown', f'use one of {list(config_lib.OPTIMIZERS)}'
    )
  if config.optim.schedule not in config_lib.SCHEDULES:
    _fail(
        'optim.schedule',
        config.optim.schedule,
        'is unknown',
        f'use one of {list(config_lib.SCHEDULES)}',
    )
  lr = config.optim.learning_rate
  if not (math.isfinite(lr) and lr > 0):
    _fail(
        'optim.learning_rate',
        lr,
        'must be a finite number > 0',
        'use e.g. 0.1 (SGD) or 1e-3 (AdamW)',
    )
  try:
    data_lib.resolve_input_config(config.input)
  except ValueError as e:
    raise ConfigError(f'{e}. Fix the input.* fields.') from None


def check_batch_sizes(
    config: ml_collections.ConfigDict, n_devices: int, n_processes: int = 1
) -> None:
  """The global batch must split evenly over devices and micro-batches.

  Args:
    config: the full config.
    n_devices: devices of the data mesh (all processes).
    n_processes: JAX processes, each feeding its share of the batch.

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
  if b % n_processes or eb % n_processes:
    _fail(
        'batch_size',
        b,
        f'does not split over {n_processes} processes',
        f'use a multiple of {n_processes}',
    )


# -------------------------------------------------------- layer geometry


# The Dataset owns its geometry; export and the benchmarks read it here.
input_geometry = data_lib.input_geometry


def abstract_params(config: ml_collections.ConfigDict) -> Any:
  """The model's params as ShapeDtypeStructs (traced, never materialised)."""
  image_shape, num_classes = input_geometry(config.input)
  model = models.get_model(config.model.name, num_classes, **config.model.kwargs.to_dict())
  variables = jax.eval_shape(
      lambda k: model.init(
          {'params': k, 'dropout': k}, jnp.zeros((1,) + image_shape, jnp.float32), train=False
      ),
      jax.random.key(0),
  )
  return variables['params']


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


def check_layer_fan_in(config: ml_collections.ConfigDict, params: Any | None = None) -> None:
  """Every sparse layer must keep at least one weight per neuron (SRigL).

  Args:
    config: the full config.
    params: the params or their ShapeDtypeStructs; default: `abstract_params`.

  Raises:
    ConfigError: naming the layer, the largest sparsity it can take and the
      largest global sparsity of the whole model.
  """
  if config.sparsity.method == 'dense':
    return
  params = abstract_params(config) if params is None else params
  try:
    _specs(params, config, float(config.sparsity.sparsity))
  except ValueError as e:
    best = max_global_sparsity(params, config)
    raise ConfigError(
        f'{e} With sparsity.distribution={config.sparsity.distribution!r} the '
        f'largest global sparsity this model can take is {best:.4f}: pass '
        f'--config.sparsity.sparsity={best:.4f} or lower.'
    ) from None


def validate_config(
    config: ml_collections.ConfigDict,
    n_devices: int | None = None,
    n_processes: int | None = None,
    check_layers: bool = True,
) -> None:
  """All config checks: keys and types, ranges, batch sizes, layer fan-in.

  Args:
    config: the full config.
    n_devices: devices of the mesh; None skips the batch-size check.
    n_processes: JAX processes (default `jax.process_count()`).
    check_layers: also trace the model's shapes to check the fan-in.

  Raises:
    ConfigError: see the individual checks.
  """
  check_keys_and_types(config)
  check_values(config)
  if n_devices is not None:
    check_batch_sizes(
        config, n_devices, jax.process_count() if n_processes is None else n_processes
    )
  if check_layers:
    check_layer_fan_in(config)


def preflight(config: ml_collections.ConfigDict, workdir: str, n_devices: int) -> None:
  """Everything the trainer checks before compiling; see the module doc.

  Args:
    config: the full config.
    workdir: the run's directory.
    n_devices: devices of the data mesh.

  Raises:
    ConfigError: an invalid config.
    WorkdirMismatchError: the workdir's checkpoints belong to another run.
  """
  validate_config(config, n_devices)
  check_workdir(workdir, config, write=jax.process_index() == 0)
