"""Tests for srigl_jax.models: one jitted train step per family on tiny shapes, and
parameter counts / module names of the full-size networks via `jax.eval_shape`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from srigl_jax import models

# name, kwargs shrinking the model, input shape (batch 2), classes.
TINY = {
    'mlp': (dict(hidden_sizes=(16, 8)), (2, 8, 8, 1), 10),
    'cnn': (dict(features=(4, 8), hidden_size=16), (2, 8, 8, 1), 10),
    'resnet18': (dict(width=4, stage_sizes=(1, 1)), (2, 8, 8, 3), 10),
    'resnet50': (dict(width=4, stage_sizes=(1, 1)), (2, 16, 16, 3), 10),
    'wrn22': (dict(depth=10, widen_factor=2, base_width=4), (2, 8, 8, 3), 10),
    'vit_tiny_test': (
        dict(num_layers=1, dropout_rate=0.1, attention_dropout_rate=0.1),
        (2, 8, 8, 3),
        10,
    ),
    # Two blocks covering every block variant (with and without expansion, SE,
    # ReLU and hard-swish, stride 2, residual); the full tables are checked by
    # eval_shape below.
    'mobilenet_v3_small': (
        dict(
            width_multiplier=0.5,
            block_specs=((3, 16, 16, True, 'relu', 2), (5, 48, 16, False, 'hswish', 1)),
        ),
        (2, 16, 16, 3),
        10,
    ),
}
# The module holding each family's input-side kernel.
FIRST_LAYER = {
    'mlp': 'dense_0',
    'cnn': 'conv_0',
    'resnet18': 'stem_conv',
    'resnet50': 'stem_conv',
    'wrn22': 'stem_conv',
    'vit_tiny_test': 'embedding',
    'mobilenet_v3_small': 'stem_conv',
}
HAS_BATCH_STATS = {'resnet18', 'resnet50', 'wrn22', 'mobilenet_v3_small'}

# Exact counts of the reference architectures (torchvision for ResNet-50,
# MobileNet-V3 and ViT-B/16; the standard CIFAR ResNet-18 and WRN-22-8).
FULL_SIZE = {
    'resnet50': (1000, (1, 224, 224, 3), 25_557_032),
    'resnet18': (10, (1, 32, 32, 3), 11_173_962),
    'wrn22': (10, (1, 32, 32, 3), 17_158_106),
    'vit_b16': (1000, (1, 224, 224, 3), 86_567_656),
    'vit_s16': (1000, (1, 224, 224, 3), 22_050_664),
    'vit_ti16': (1000, (1, 224, 224, 3), 5_717_416),
    'mobilenet_v3_large': (1000, (1, 224, 224, 3), 5_483_032),
    'mobilenet_v3_small': (1000, (1, 224, 224, 3), 2_542_856),
    'mlp': (10, (1, 28, 28, 1), 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 10250),
}


def _abstract_variables(name, num_classes, shape, **kwargs):
  model = models.get_model(name, num_classes, **kwargs)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def _fake_init(abstract_variables, seed=0):
  """Fills abstract variables with scaled normal kernels, unit scales, zero biases.

  On a shared CPU, compiling a model's random `init` costs more than compiling its
  train step, so the train-step tests fill the shapes from `eval_shape` instead.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ('scale', 'var'):
      return jnp.ones(leaf.shape, leaf.dtype)
    if name in ('bias', 'mean'):
      return jnp.zeros(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
    return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract_variables)


def _num_params(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _paths(tree):
  return ['/'.join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


@pytest.mark.parametrize('name', sorted(TINY))
def test_train_step(name):
  kwargs, shape, num_classes = TINY[name]
  model = models.get_model(name, num_classes, **kwargs)
  x = jax.random.normal(jax.random.key(1), shape)
  labels = jnp.array([1, num_classes - 1])
  variables = _fake_init(_abstract_variables(name, num_classes, shape, **kwargs))
  params = variables['params']
  batch_stats = variables.get('batch_stats', {})

  @jax.jit
  def train_step(params, batch_stats, rng):
    def loss_fn(params):
      logits, updates = model.apply(
          {'params': params, 'batch_stats': batch_stats},
          x,
          train=True,
          mutable=['batch_stats'],
          rngs={'dropout': rng},
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return loss.mean(), (logits, updates.get('batch_stats', {}))

    (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    new_params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    # Eval mode in the same program: one compile per model keeps the file fast.
    eval_vars = {'params': new_params}
    if new_stats:
      eval_vars['batch_stats'] = new_stats
    eval_logits = model.apply(eval_vars, x, train=False)
    return loss, logits, grads, new_params, new_stats, eval_logits

  loss, logits, grads, new_params, new_stats, eval_logits = train_step(
      params, batch_stats, jax.random.key(2)
  )

  assert logits.shape == (shape[0], num_classes)
  assert logits.dtype == jnp.float32
  assert np.isfinite(loss)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  # The loss reaches the whole network: the first layer's kernel gets a gradient.
  assert float(jnp.abs(grads[FIRST_LAYER[name]]['kernel']).sum()) > 0
  assert not all(
      bool(jnp.array_equal(a, b))
      for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new_params))
  )
  assert jax.tree.structure(new_params) == jax.tree.structure(params)
  if name in HAS_BATCH_STATS:
    assert jax.tree.structure(new_stats) == jax.tree.structure(batch_stats)
    assert any(
        not bool(jnp.allclose(a, b))
        for a, b in zip(jax.tree.leaves(batch_stats), jax.tree.leaves(new_stats))
    )
  else:
    assert not batch_stats and not new_stats
  # Eval mode is deterministic and needs no rng.
  assert eval_logits.shape == (shape[0], num_classes)
  assert bool(jnp.all(jnp.isfinite(eval_logits)))


@pytest.mark.parametrize('name', sorted(FULL_SIZE))
def test_full_size_parameter_count(name):
  num_classes, shape, expected = FULL_SIZE[name]
  variables = _abstract_variables(name, num_classes, shape)
  assert _num_params(variables['params']) == expected
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables['params']))


@pytest.mark.parametrize('name', models.MODEL_NAMES)
def test_head_is_the_only_head(name):
  shape = (1, 28, 28, 1) if name in ('mlp', 'cnn') else (1, 32, 32, 3)
  variables = _abstract_variables(name, 7, shape)
  params = variables['params']
  assert params['head']['kernel'].shape[-1] == 7
  assert isinstance(params['head']['kernel'], jax.ShapeDtypeStruct)
  # Configs exempt the classifier by the substring 'head'; nothing else may match.
  assert [p for p in _paths(params) if 'head' in p] == ['head/bias', 'head/kernel']


def test_vit_b16_attention_kernels():
  params = _abstract_variables('vit_b16', 1000, (1, 224, 224, 3))['params']
  assert params['embedding']['kernel'].shape == (16, 16, 3, 768)
  assert params['pos_embedding'].shape == (1, 197, 768)
  assert params['cls'].shape == (1, 1, 768)
  blocks = [k for k in params if k.startswith('encoderblock_')]
  assert len(blocks) == 12
  attn = params['encoderblock_0']['attention']
  for qkv in ('query', 'key', 'value'):
    assert attn[qkv]['kernel'].shape == (768, 12, 64)
  assert attn['out']['kernel'].shape == (12, 64, 768)
  mlp = params['encoderblock_0']['mlp']
  assert mlp['fc1']['kernel'].shape == (768, 3072)
  assert mlp['fc2']['kernel'].shape == (3072, 768)


@pytest.mark.parametrize('name', ['mobilenet_v3_small', 'mobilenet_v3_large'])
def test_mobilenet_depthwise_naming(name):
  params = _abstract_variables(name, 1000, (1, 224, 224, 3))['params']
  kernels = {
      p: x.shape for p, x in zip(_paths(params), jax.tree.leaves(params)) if p.endswith('kernel')
  }
  depthwise = {p: s for p, s in kernels.items() if 'depthwise' in p}
  assert len(depthwise) == (11 if name.endswith('small') else 15)
  for p, s in kernels.items():
    # A conv kernel with one input channel per group is depthwise; it must say so.
    is_grouped = len(s) == 4 and s[2] == 1 and s[3] > 1
    assert is_grouped == ('depthwise' in p), p


def test_real_init_and_bfloat16_compute():
  model = models.get_model('mlp', 10, hidden_sizes=(16,), dtype=jnp.bfloat16)
  x = jnp.ones((2, 4, 4, 1))
  variables = jax.jit(lambda k: model.init(k, x))(jax.random.key(0))
  leaves = jax.tree.leaves(variables)
  assert all(v.dtype == jnp.float32 for v in leaves)
  assert all(bool(jnp.all(jnp.isfinite(v))) for v in leaves)
  assert float(jnp.std(variables['params']['dense_0']['kernel'])) > 0
  logits = jax.jit(model.apply)(variables, x)
  assert logits.dtype == jnp.float32


@pytest.mark.parametrize('name', ['resnet18', 'vit_tiny_test', 'mobilenet_v3_small'])
def test_bfloat16_params_stay_float32(name):
  kwargs, shape, num_classes = TINY[name]
  variables = _abstract_variables(name, num_classes, shape, dtype=jnp.bfloat16, **kwargs)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))


def test_unknown_model_lists_valid_names():
  with pytest.raises(ValueError, match='resnet18.*vit_b16'):
    models.get_model('resnet19', 10)
