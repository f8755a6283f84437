"""Tests of `training.build`: a config becomes a run once, checked by each group's owner.

Every bad config here fails with a `ConfigError` whose `field` names the config
field at fault, before any data is read (the data directory is empty), and
the trainer's preflight builds each part of the run exactly once.
"""

import jax
import optax
import pytest

# pylint: disable-next=g-import-not-at-top,wrong-import-position
from conftest import load_config, set_fields

import srigl_jax
from srigl_jax import config_lib, data, models
from srigl_jax.sparsity import SparseArgumentError
from srigl_jax.training import build, loop, optimizer


def _config(tmp_path, **fields):
  """A small Fashion-MNIST MLP run whose data directory holds nothing."""
  config = load_config('fashion_mnist')
  config.input.data_dir = str(tmp_path / 'no_data')
  return set_fields(
      config,
      {
          'batch_size': 32,
          'num_train_steps': 20,
          'mesh.data': 1,
          'model.kwargs.hidden_sizes': (16, 16),
          'sparsity.sparsity': 0.8,
          'sparsity.update_every': 5,
          **fields,
      },
  )


# field -> (overrides, start of the message).
BAD = {
    'num_train_steps': ({'num_train_steps': 0}, 'num_train_steps=0 must be a positive integer'),
    'model.dtype': ({'model.dtype': 'float16'}, "model.dtype='float16' is unknown"),
    'sparsity.method': ({'sparsity.method': 'magic'}, "sparsity.method='magic' is not a known"),
    'input': ({'input.augment': 'mixup'}, "input config 'fashion_mnist': augment='mixup'"),
    'model.name': ({'model.name': 'mlpp'}, "model: Unknown model 'mlpp'"),
    'model.kwargs': ({'model.kwargs.depth': 3}, 'model: '),
    'optim.learning_rate': ({'optim.learning_rate': 0.0}, 'optim.learning_rate=0.0 must be'),
    'optim.schedule': ({'optim.schedule': 'linear'}, "optim.schedule='linear' is unknown"),
    'optim.name': ({'optim.name': 'lamb'}, "optim.name='lamb' is unknown"),
    'sparsity.distribution': (
        {'sparsity.distribution': 'even'},
        "sparsity.distribution='even' is unknown",
    ),
    'sparsity.drop_fraction': (
        {'sparsity.drop_fraction': 0.0},
        'sparsity.drop_fraction (alpha) must be in (0, 1], got 0.0.',
    ),
    'sparsity.gamma_sal': (
        {'sparsity.gamma_sal': 1.5},
        'sparsity.gamma_sal=1.5 > 1 would ablate every neuron',
    ),
    'sparsity.grad_accumulation': (
        {'sparsity.grad_accumulation': 10},
        'sparsity.grad_accumulation=10 exceeds update_every=5',
    ),
    'sparsity.sparse_rule': (
        {'sparsity.sparse_rule': 'all'},
        "sparsity.Unknown sparse rule 'all'",
    ),
    'sparsity.dense_layers': (
        {'sparsity.dense_layers': ('head(',)},
        "sparsity.dense_layers pattern 'head(' is not a valid regex",
    ),
    'sparsity.init': ({'sparsity.init': 'zeros'}, "sparsity.init='zeros' is unknown"),
    'sparsity.sparsity': ({'sparsity.sparsity': 0.9995}, "Layer 'dense_"),
}


@pytest.mark.parametrize('field', sorted(BAD))
def test_each_bad_field_is_named_before_any_data_is_read(field, tmp_path):
  overrides, message = BAD[field]
  with pytest.raises(config_lib.ConfigError) as info:
    loop.preflight(_config(tmp_path, **overrides), str(tmp_path / 'run'))
  assert info.value.field == field
  assert str(info.value).startswith(message), str(info.value)
  if field.startswith('sparsity.') and field not in ('sparsity.init', 'sparsity.method'):
    assert f'--config.{field}' in str(info.value)


def test_sparsity_that_selects_no_layer_is_named(tmp_path):
  config = _config(tmp_path, **{'sparsity.dense_layers': ('.*',)})
  with pytest.raises(config_lib.ConfigError) as info:
    loop.preflight(config, str(tmp_path / 'run'))
  assert info.value.field == 'sparsity.dense_layers'
  assert str(info.value).startswith('No layer to sparsify at sparsity=0.8'), str(info.value)
  assert '--config.sparsity.dense_layers' in str(info.value)


def test_sparse_optimizer_errors_carry_their_argument():
  base = dict(sparsity=0.9, key=jax.random.key(0), stop_step=10, update_every=5)
  cases = {
      'method': ({'method': 'magic'}, "Unknown method 'magic'; valid methods are"),
      'sparsity': ({'sparsity': 1.0}, 'sparsity=1.0 is outside [0, 1)'),
      'update_every': ({'update_every': 0}, 'update_every (delta) must be an integer >= 1, got 0.'),
      'stop_step': ({'stop_step': -1}, 'stop_step (T_end) must be an integer >= 1, got -1.'),
      'gamma_sal': ({'gamma_sal': -0.5}, 'gamma_sal must be >= 0 (0 disables ablation)'),
      'no_ablation': ({'no_ablation': ('[',)}, "no_ablation pattern '[' is not a valid regex"),
      'key': ({'key': None}, 'A PRNG key is required'),
  }
  for argument, (kwargs, message) in cases.items():
    with pytest.raises(SparseArgumentError) as info:
      srigl_jax.sparse_optimizer(optax.sgd(0.1), **{**base, **kwargs})
    assert info.value.argument == argument
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith(message), str(info.value)


def test_preflight_builds_each_part_once(tmp_path, monkeypatch):
  calls = {'model': 0, 'optimizer': 0, 'dataset': 0, 'schedule': 0}

  def counted(name, fn):
    def wrapper(*args, **kwargs):
      calls[name] += 1
      return fn(*args, **kwargs)

    return wrapper

  monkeypatch.setattr(models, 'get_model', counted('model', models.get_model))
  monkeypatch.setattr(
      optimizer, 'create_optimizer', counted('optimizer', optimizer.create_optimizer)
  )
  monkeypatch.setattr(data, 'create_dataset', counted('dataset', data.create_dataset))
  monkeypatch.setattr(optimizer, '_schedule', counted('schedule', optimizer._schedule))  # pylint: disable=protected-access
  config = _config(tmp_path)
  config.input = data.default_input_config('synthetic')
  set_fields(config, {'input.image_shape': (28, 28, 1), 'input.prefetch': 0})
  trainer = loop.preflight(config, str(tmp_path / 'run'))
  assert calls == {'model': 1, 'optimizer': 1, 'dataset': 1, 'schedule': 1}
  run = trainer.run
  assert run.dataset.steps_per_epoch == 4096 // 32
  want = optimizer.create_learning_rate_fn(config.optim, 4096 // 32, 20)
  assert run.learning_rate(7) == want(7)
  assert run.abstract_state.tx is run.tx


def test_build_without_data_is_enough_to_restore(tmp_path):
  # What the export and the sweep use: every check and the abstract state.
  run = build.build(_config(tmp_path), open_dataset=False)
  assert run.dataset is None and run.image_shape == (28, 28, 1) and run.num_classes == 10
  assert run.num_params == 784 * 16 + 16 + 16 * 16 + 16 + 16 * 10 + 10
  with pytest.raises(RuntimeError, match='epoch length'):
    run.learning_rate(0)
