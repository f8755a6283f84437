"""Shared building blocks of the experiment configs in `configs/`.

A config is an `ml_collections.ConfigDict` grouped as `input`, `model`,
`sparsity` and `optim`, plus a few top-level run fields. `base_config` fills
every field with a default so that each one can be overridden from the command
line (`--config.sparsity.gamma_sal=0.5`); the experiment files only set what
differs.

`base_config` is also the schema: it returns a locked ConfigDict whose fields
carry their types, so ml_collections itself refuses a mistyped key (naming
the closest valid one) or a value of the wrong type, on the command line and
in a config file alike; `check_schema` applies the same test to a config
built without `base_config`. Only `model.kwargs` (constructor arguments) is
free-form.

The sparse schedule follows the length of training: `sparsity.stop_step` is a
`FieldReference` to `int(stop_fraction * num_train_steps)`, so
`--config.num_train_steps=200` moves T_end with it;
`--config.sparsity.stop_step=N` pins it instead.
"""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections import config_dict

from srigl_jax import data as data_lib
from srigl_jax.sparsity import transform

# The recipes a config arg or `sparsity.method` names: the sparse optimizer's
# methods (`srigl_jax.sparsity.METHODS`) plus 'srigl_noablation', which is
# SRigL with gamma_sal = 0.
RECIPES = transform.METHODS[:-1] + ('srigl_noablation', 'srigl')
SCHEDULES = ('constant', 'step', 'multistep', 'cosine')
OPTIMIZERS = ('sgd', 'adamw')
DTYPES = ('float32', 'bfloat16')  # model.dtype: the compute dtype.


def parse_arg(arg: str | None, allowed: dict[str, Any]) -> dict[str, Any]:
  """Parses a config arg like 'method=srigl,sparsity=0.9'.

  Args:
    arg: the text after ':' in `--config=path.py:arg`, or None.
    allowed: key -> default value. A tuple default lists the valid strings
      (its first entry is the default); a float/int default converts the value
      to that type.

  Returns:
    key -> value, with the defaults of the keys not given.

  Raises:
    ValueError: an unknown key, a malformed item, or a value that is not valid
      for its key; the message lists what is valid.
  """
  out = {k: (v[0] if isinstance(v, tuple) else v) for k, v in allowed.items()}
  if not arg:
    return out
  for item in arg.split(','):
    item = item.strip()
    if not item:
      continue
    if '=' not in item:
      raise ValueError(
          f'Config arg item {item!r} is not key=value; valid keys: '
          f'{sorted(allowed)} (e.g. "method=srigl,sparsity=0.9").'
      )
    key, value = (s.strip() for s in item.split('=', 1))
    if key not in allowed:
      raise ValueError(f'Unknown config arg key {key!r}; valid keys: {sorted(allowed)}.')
    spec = allowed[key]
    if isinstance(spec, tuple):
      if value not in spec:
        raise ValueError(
            f'Invalid value {value!r} for config arg {key!r}; valid values: ' f'{list(spec)}.'
        )
      out[key] = value
    else:
      try:
        out[key] = type(spec)(value)
      except ValueError:
        raise ValueError(
            f'Invalid value {value!r} for config arg {key!r}: expected a ' f'{type(spec).__name__}.'
        ) from None
  return out


def sparsity_arg(arg: str | None, extra: dict[str, Any] | None = None):
  """Parses the common 'method=...,sparsity=...' arg (plus `extra` keys).

  Returns:
    key -> value; 'method' defaults to 'srigl' and 'sparsity' to 0.9.

  Raises:
    ValueError: see `parse_arg`, or a sparsity outside [0, 1).
  """
  allowed = {'method': ('srigl',) + tuple(m for m in RECIPES if m != 'srigl'), 'sparsity': 0.9}
  allowed.update(extra or {})
  out = parse_arg(arg, allowed)
  if not 0.0 <= out['sparsity'] < 1.0:
    raise ValueError(f'sparsity must be in [0, 1), got {out["sparsity"]}.')
  return out


def base_config(dataset: str) -> ml_collections.ConfigDict:
  """A complete config with defaults for every field the trainer reads.

  Args:
    dataset: the input pipeline's dataset name (see `srigl_jax.data`).

  Returns:
    The ConfigDict; experiment files override fields of it.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 128  # Global, summed over devices and processes.
  c.eval_batch_size = config_dict.placeholder(int)  # None: batch_size.
  c.num_train_steps = 1000
  c.log_every = 100  # Train loss, progress line and NaN check.
  c.eval_every = 1000  # Also evaluated at the last step.
  c.checkpoint_every = 1000  # Also saved at the last step.
  c.keep_checkpoints = 3
  # Stops (as if preempted) after this step, saving a checkpoint; running the
  # same command again continues. None: run to num_train_steps.
  c.halt_after_step = config_dict.placeholder(int)
  c.write_plots = True
  # Drop a step whose loss or gradient is NaN/inf (params, moments and masks
  # stay as before it) instead of stopping; stops anyway after 20 in a row.
  c.skip_bad_steps = False
  # At the end of training, convert the model to its condensed form, check it
  # against the masked model on the eval split, time both and save it to
  # WORKDIR/inference (see srigl_jax.export).
  c.export = True

  c.input = data_lib.default_input_config(dataset)

  c.model = ml_collections.ConfigDict()
  c.model.name = 'mlp'
  c.model.dtype = 'float32'  # Compute dtype: 'float32' or 'bfloat16'.
  # Extra keyword arguments of the model constructor, e.g. {'width': 8}.
  c.model.kwargs = ml_collections.ConfigDict()

  c.sparsity = ml_collections.ConfigDict()
  c.sparsity.method = 'srigl'  # One of RECIPES.
  c.sparsity.sparsity = 0.9
  c.sparsity.distribution = 'erk'
  c.sparsity.erk_power_scale = 1.0
  c.sparsity.update_every = 100  # delta.
  c.sparsity.drop_fraction = 0.3  # alpha.
  c.sparsity.gamma_sal = 0.3
  c.sparsity.grad_accumulation = 1  # Mini-batches averaged for the grow score.
  # Consecutive output neurons sharing one set of inputs (group-shared fan-in).
  c.sparsity.group_size = 1
  c.sparsity.stop_fraction = 0.75  # T_end = stop_fraction * num_train_steps,
  # unless set to a number (a reference: it follows num_train_steps).
  c.sparsity.stop_step = (
      c.get_ref('num_train_steps') * c.sparsity.get_ref('stop_fraction')
  ).to_int()
  c.sparsity.sparse_rule = 'kernels'  # 'kernels' or 'dense_only'.
  c.sparsity.dense_layers = ()  # Regexes of kernels kept dense.
  c.sparsity.no_ablation = (r'(^|/)head/kernel$',)  # Classifier head.
  # 'sparse_he': He-normal with each neuron's sparse fan-in (notes sec. 3);
  # 'masked': keep the model's own init and zero the masked weights.
  c.sparsity.init = 'sparse_he'

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'sgd'  # 'sgd' or 'adamw'.
  c.optim.learning_rate = 0.1
  c.optim.momentum = 0.9  # SGD; also adamw's b1.
  c.optim.nesterov = False
  c.optim.b2 = 0.999  # AdamW.
  c.optim.eps = 1e-8  # AdamW.
  c.optim.weight_decay = 5e-4
  # Regex of the params weight decay applies to; None: all (PyTorch SGD).
  c.optim.decay_pattern = config_dict.placeholder(str)
  c.optim.schedule = 'step'  # One of SCHEDULES.
  c.optim.warmup_epochs = 0.0
  c.optim.decay_every_epochs = 77.0  # 'step'.
  c.optim.decay_factor = 0.2  # 'step' and 'multistep'.
  c.optim.boundaries_epochs = (30.0, 70.0, 90.0)  # 'multistep'.
  c.optim.label_smoothing = 0.0
  c.optim.grad_clip_norm = config_dict.placeholder(float)  # None: no clipping.
  # Splits each global batch into this many micro-batches whose gradients
  # are averaged before one optimizer step (to fit big batches in memory).
  c.optim.grad_accum_steps = 1

  c.mesh = ml_collections.ConfigDict()
  # Devices on the data axis; -1: all devices (pure data parallelism; params
  # and optimizer state, masks included, are replicated).
  c.mesh.data = -1
  c.lock()
  c.model.kwargs.unlock()  # Constructor arguments: free-form.
  return c


class ConfigError(ValueError):
  """The config cannot describe a valid run; the message says what to change.

  Attributes:
    field: the dotted config field at fault (e.g. 'sparsity.gamma_sal'), or its
      group (e.g. 'input') where the group's owner does not name the field.
  """

  def __init__(self, message: str, field: str):
    super().__init__(message)
    self.field = field

  def __reduce__(self):
    return type(self), (str(self), self.field)


def _conform(schema, config, prefix: str) -> None:
  """Assigns `config`'s fields into the locked `schema`, naming the bad one."""
  for key in config.keys():
    dotted = f'{prefix}{key}'
    value = config[key]
    if dotted == 'model.kwargs':
      continue
    if (
        key in schema
        and isinstance(schema[key], ml_collections.ConfigDict)
        and isinstance(value, (ml_collections.ConfigDict, dict))
    ):
      _conform(schema[key], value, dotted + '.')
      continue
    try:
      schema[key] = value
    except (AttributeError, KeyError) as e:
      # ml_collections' message ends with its suggestion ('Did you mean').
      hint = str(e).strip('\'"').rsplit('\\n', 1)[-1].rsplit('\n', 1)[-1]
      hint = hint if hint.startswith('Did you mean') else ''
      raise ConfigError(
          f'Unknown config key {dotted!r}: the trainer would ignore it. {hint} '
          'Remove it or fix its name (srigl_jax/config_lib.py base_config '
          'lists every valid key).',
          field=dotted,
      ) from None
    except TypeError as e:
      raise ConfigError(
          f'Config key {dotted!r} has the wrong type: {e}. Fix its value, e.g. '
          f'--config.{dotted}={schema[key]!r}.',
          field=dotted,
      ) from None


def check_schema(config: ml_collections.ConfigDict) -> None:
  """Checks a config's keys and value types against `base_config`.

  A config derived from `base_config` is checked on every assignment already;
  this catches one whose groups were built by hand (a plain ConfigDict).

  Args:
    config: the full config.

  Raises:
    ConfigError: an unknown key (with ml_collections' suggestion) or a value
      of the wrong type, naming the dotted key and the fix.
  """
  name = config.get('input', {}).get('name', 'synthetic')
  if name not in data_lib.DATASET_NAMES:
    raise ConfigError(
        f'input.name={name!r} is not a known dataset; valid names: '
        f'{list(data_lib.DATASET_NAMES)}.',
        field='input.name',
    )
  _conform(base_config(name), config, '')


def apply_sparsity_arg(
    config: ml_collections.ConfigDict, parsed: dict[str, Any]
) -> ml_collections.ConfigDict:
  """Sets sparsity.method / sparsity.sparsity from a parsed arg."""
  config.sparsity.method = parsed['method']
  config.sparsity.sparsity = 0.0 if parsed['method'] == 'dense' else parsed['sparsity']
  return config


def resolve_stop_step(config: ml_collections.ConfigDict) -> int:
  """T_end: the last step (exclusive) at which masks may change.

  Args:
    config: a full config.

  Returns:
    `sparsity.stop_step`: `int(stop_fraction * num_train_steps)` unless pinned;
    a config built by hand with `stop_step=None` gets that value too.
  """
  if config.sparsity.stop_step is not None:
    return int(config.sparsity.stop_step)
  return int(config.sparsity.stop_fraction * config.num_train_steps)


def optimizer_method(config: ml_collections.ConfigDict) -> tuple[str, float]:
  """Maps the user-facing method to the sparse optimizer's (method, gamma_sal).

  Raises:
    ConfigError: an unknown method.
  """
  method = config.sparsity.method
  if method not in RECIPES:
    raise ConfigError(
        f'sparsity.method={method!r} is not a known method. Fix: use one of {list(RECIPES)}.',
        field='sparsity.method',
    )
  if method == 'srigl_noablation':
    return 'srigl', 0.0
  return method, float(config.sparsity.gamma_sal)


def steps_for_epochs(epochs: float, num_examples: int, batch_size: int) -> int:
  """Number of steps of `epochs` passes over `num_examples` (remainder dropped)."""
  return int(round(epochs * (num_examples // batch_size)))


def cifar10_config(arg: str | None, model: str) -> ml_collections.ConfigDict:
  """The paper's CIFAR-10 recipe (notes section 5) for `model`.

  250 epochs at batch 128, SGD momentum 0.9, lr 0.1, weight decay 5e-4,
  lr x0.2 every 77 epochs, masks updated every 100 steps until 75% of
  training, ERK, gamma_sal 0.3, crop + flip augmentation.
  """
  args = sparsity_arg(arg)
  config = base_config('cifar10')
  config.batch_size = 128
  config.num_train_steps = steps_for_epochs(250, 50_000, 128)  # 97,500.
  config.log_every = 100
  config.eval_every = steps_for_epochs(5, 50_000, 128)
  config.checkpoint_every = steps_for_epochs(5, 50_000, 128)
  config.eval_batch_size = 1000

  config.model.name = model

  config.sparsity.distribution = 'erk'
  config.sparsity.update_every = 100
  config.sparsity.gamma_sal = 0.3

  config.optim.name = 'sgd'
  config.optim.learning_rate = 0.1
  config.optim.momentum = 0.9
  config.optim.weight_decay = 5e-4
  config.optim.schedule = 'step'
  config.optim.decay_every_epochs = 77.0
  config.optim.decay_factor = 0.2
  return apply_sparsity_arg(config, args)
