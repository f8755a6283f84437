"""From a config to a run: model, optimizer, init, abstract state and data, built once.

`build(config)` is the one place a config becomes the parts of a run, for the
trainer, `preflight`, the export of a workdir and the sweep's check of its
grid. Each config group is checked by its owner as its part is built, in this
order, before any data is read:

  1. the trainer's own fields, keys and value types (`training.checks`);
  2. `input.*` by the Dataset (`data.resolve_input_config`), which also gives
     the input shape and the number of classes without reading data;
  3. `model.*` by the model registry (`models.get_model`);
  4. `optim.*` by the optimizer factory and `sparsity.*` by the sparse
     optimizer (`training.optimizer`);
  5. every sparse layer's fan-in, by `jax.eval_shape` of the init (the sparse
     optimizer's init builds the layers' budgets, and refuses sparsity > 0
     that selects no layer).

`with_dataset(run)` then opens the Dataset (this reads the data) and gives
the learning-rate schedule its epoch length. Every failure of 1-5 is a
`config_lib.ConfigError` whose `field` names the config field at fault.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from srigl_jax import config_lib, data, models
from srigl_jax.sparsity import layers as layers_lib
from srigl_jax.training import checks, optimizer
from srigl_jax.training.state import TrainState, make_init_fn


@dataclasses.dataclass(frozen=True)
class Run:
  """The parts of a run, built from its config; nothing compiled, no data read.

  Attributes:
    config: the run's config.
    input_config: the resolved `input` group.
    image_shape: (H, W, C) of the model's input.
    num_classes: the number of classes.
    model: the Flax module.
    learning_rate: the learning-rate schedule (`optimizer.LearningRate`).
    tx: the sparse optimizer.
    init: `init(key) -> TrainState`.
    init_key: the key `init` is called with.
    dropout_key: the key the train step folds the step into for dropout.
    abstract_state: `jax.eval_shape(init, init_key)`: the state's shapes and
      dtypes (the target of a checkpoint restore).
    call_order: module path -> call index, filled by the trace of `init`
      (layers input side first).
    dataset: the open Dataset (`with_dataset`), or None.
  """

  config: ml_collections.ConfigDict
  input_config: ml_collections.ConfigDict
  image_shape: tuple[int, int, int]
  num_classes: int
  model: Any
  learning_rate: optimizer.LearningRate
  tx: Any
  init: Callable[[jax.Array], TrainState]
  init_key: jax.Array
  dropout_key: jax.Array
  abstract_state: TrainState
  call_order: dict[str, int]
  dataset: data.Dataset | None = None

  @property
  def num_params(self) -> int:
    """The number of parameters of the model."""
    return sum(int(x.size) for x in jax.tree.leaves(self.abstract_state.params))


def _input_config(input_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  try:
    return data.resolve_input_config(input_config)
  except ValueError as e:
    raise config_lib.ConfigError(f'{e}. Fix the input.* fields.', field='input') from None


def _model(config: ml_collections.ConfigDict, num_classes: int):
  name = config.model.name
  try:
    return models.get_model(
        name,
        num_classes,
        dtype=jnp.dtype(config.model.dtype),
        **config.model.kwargs.to_dict(),
    )
  except (ValueError, TypeError) as e:
    raise config_lib.ConfigError(
        f'model: {e}. Fix: --config.model.name (one of {list(models.MODEL_NAMES)}) or the '
        'model.kwargs fields.',
        field='model.name' if name not in models.MODEL_NAMES else 'model.kwargs',
    ) from None


def _abstract_state(config, model, image_shape, init, init_key) -> TrainState:
  """`jax.eval_shape(init, init_key)`: the sparse optimizer's init checks every fan-in."""
  try:
    return jax.eval_shape(init, init_key)
  except layers_lib.NoSparseLayerError as e:
    raise config_lib.ConfigError(
        f'{e} (config: --config.sparsity.{e.argument})', field=f'sparsity.{e.argument}'
    ) from None
  except layers_lib.FanInError as e:
    x = jnp.zeros((1, *image_shape), jnp.float32)
    params = jax.eval_shape(
        lambda k: model.init({'params': k, 'dropout': k}, x, train=False), init_key
    )
    raise checks.explain_fan_in_error(e, params['params'], config) from None


def build(
    config: ml_collections.ConfigDict,
    *,
    n_devices: int | None = None,
    open_dataset: bool = True,
) -> Run:
  """Checks a config and builds its run (see the module docstring for the order).

  Args:
    config: the full config.
    n_devices: devices of the data mesh, for the batch-size check; None skips
      it (a run that is not trained here).
    open_dataset: open the Dataset too (`with_dataset`); False reads no data.

  Returns:
    The `Run`.

  Raises:
    ConfigError: an invalid config, naming the field and the fix.
    data.DatasetNotFoundError, data.DataFormatError: the data (open_dataset).
  """
  checks.check_config(config, n_devices)
  input_config = _input_config(config.input)
  image_shape, num_classes = data.input_geometry(input_config)
  model = _model(config, num_classes)
  init_key, sparse_key, reinit_key, dropout_key = jax.random.split(jax.random.key(config.seed), 4)
  learning_rate = optimizer.LearningRate(config.optim, int(config.num_train_steps))
  tx = optimizer.create_optimizer(config, learning_rate, sparse_key)
  call_order: dict[str, int] = {}
  init = make_init_fn(config, model, tx, tuple(image_shape), reinit_key, call_order)
  run = Run(
      config=config,
      input_config=input_config,
      model=model,
      image_shape=tuple(image_shape),
      num_classes=int(num_classes),
      learning_rate=learning_rate,
      tx=tx,
      init=init,
      init_key=init_key,
      dropout_key=dropout_key,
      abstract_state=_abstract_state(config, model, image_shape, init, init_key),
      call_order=call_order,  # Filled by the trace of `init` in _abstract_state.
  )
  return with_dataset(run) if open_dataset else run


def with_dataset(run: Run) -> Run:
  """The run with its Dataset open (for this process); the data is read here.

  Also fixes the learning-rate schedule's epoch length, which only the
  Dataset knows.

  Args:
    run: a run built without its Dataset.

  Returns:
    The run with `dataset` set.

  Raises:
    data.DatasetNotFoundError, data.DataFormatError: the data.
    ValueError: batch sizes the Dataset cannot split over processes, or
      example counts the splits do not have.
  """
  config = run.config
  dataset = data.create_dataset(
      run.input_config,
      seed=config.seed,
      global_batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size or config.batch_size,
  )
  run.learning_rate.set_steps_per_epoch(dataset.steps_per_epoch)
  return dataclasses.replace(run, dataset=dataset)
