"""Each model family's forward pass against a hand-written reference.

test_models.py checks shapes, finiteness and parameter counts; none of that
sees a dropped residual connection, a BatchNorm using the wrong statistics or a
padding on the wrong side. Here each family (MLP, CNN, ResNet-18, ResNet-50,
WRN, ViT, MobileNet-V3) is built at a tiny width, filled with random
parameters and random BatchNorm statistics, and its eval-mode logits are
compared with a reference written from the architecture's definition in plain
jnp / lax ops (convolutions with the paddings written here, BatchNorm with the
running statistics, max-pooling by explicit windows, attention by einsum).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srigl_jax import models

HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------
# Plain-jnp building blocks


def conv(x, kernel, stride=1, pad=0, groups=1, bias=None):
  """NHWC conv with symmetric zero padding `pad` on both spatial sides."""
  y = jax.lax.conv_general_dilated(
      x,
      kernel,
      window_strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups,
      precision=HIGHEST,
  )
  return y if bias is None else y + bias


def batch_norm(x, p, s, eps):
  """Eval mode: the running mean and variance, then scale and shift."""
  return (x - s['mean']) / jnp.sqrt(s['var'] + eps) * p['scale'] + p['bias']


def layer_norm(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + eps) * p['scale'] + p['bias']


def dense(x, p):
  return jnp.matmul(x, p['kernel'], precision=HIGHEST) + p['bias']


def relu(x):
  return jnp.maximum(x, 0.0)


def relu6(x):
  return jnp.clip(x, 0.0, 6.0)


def hard_swish(x):
  return x * relu6(x + 3.0) / 6.0


def hard_sigmoid(x):
  return relu6(x + 3.0) / 6.0


def gelu_exact(x):
  return 0.5 * x * (1.0 + jax.scipy.special.erf(x / math.sqrt(2.0)))


def max_pool(x, size, stride, pad):
  """Max over explicit windows; the padding is -inf, so it never wins."""
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-jnp.inf)
  oh = (xp.shape[1] - size) // stride + 1
  ow = (xp.shape[2] - size) // stride + 1
  windows = [
      xp[:, dy : dy + stride * (oh - 1) + 1 : stride, dx : dx + stride * (ow - 1) + 1 : stride]
      for dy in range(size)
      for dx in range(size)
  ]
  return jnp.max(jnp.stack(windows), axis=0)


# ---------------------------------------------------------------------------
# References, one per family


def ref_mlp(v, x):
  p = v['params']
  h = x.reshape(x.shape[0], -1)
  for name in ('dense_0', 'dense_1'):
    h = relu(dense(h, p[name]))
  return dense(h, p['head'])


def ref_cnn(v, x):
  p = v['params']
  h = x
  for name in ('conv_0', 'conv_1'):
    # 3x3 SAME at stride 1: one row/column of zeros on every side.
    h = relu(conv(h, p[name]['kernel'], pad=1, bias=p[name]['bias']))
    h = max_pool(h, 2, 2, 0)
  h = relu(dense(h.reshape(h.shape[0], -1), p['dense_0']))
  return dense(h, p['head'])


def _resnet_blocks(v, h, bottleneck):
  p, s = v['params'], v['batch_stats']
  bn = lambda y, name, q, t: batch_norm(y, q[name], t[name], 1e-5)
  for stage in (1, 2):
    q, t = p[f'stage{stage}_block1'], s[f'stage{stage}_block1']
    stride = 1 if stage == 1 else 2
    if bottleneck:
      # v1.5: 1x1 reduce, 3x3 carrying the stride, 1x1 expand.
      y = relu(bn(conv(h, q['conv1']['kernel']), 'bn1', q, t))
      y = relu(bn(conv(y, q['conv2']['kernel'], stride, 1), 'bn2', q, t))
      y = bn(conv(y, q['conv3']['kernel']), 'bn3', q, t)
    else:
      y = relu(bn(conv(h, q['conv1']['kernel'], stride, 1), 'bn1', q, t))
      y = bn(conv(y, q['conv2']['kernel'], 1, 1), 'bn2', q, t)
    # A projection shortcut exactly when the block changes the shape (stage 2,
    # and ResNet-50's first block, which expands the width 4x); else identity.
    assert ('proj_conv' in q) == (y.shape != h.shape)
    if 'proj_conv' in q:
      shortcut = bn(conv(h, q['proj_conv']['kernel'], stride), 'proj_bn', q, t)
    else:
      shortcut = h
    h = relu(y + shortcut)
  return dense(h.mean(axis=(1, 2)), p['head'])


def ref_resnet18(v, x):
  p, s = v['params'], v['batch_stats']
  h = relu(batch_norm(conv(x, p['stem_conv']['kernel'], 1, 1), p['stem_bn'], s['stem_bn'], 1e-5))
  return _resnet_blocks(v, h, bottleneck=False)


def ref_resnet50(v, x):
  p, s = v['params'], v['batch_stats']
  h = conv(x, p['stem_conv']['kernel'], 2, 3)  # 7x7 / 2, padding 3 as in torchvision
  h = relu(batch_norm(h, p['stem_bn'], s['stem_bn'], 1e-5))
  h = max_pool(h, 3, 2, 1)
  return _resnet_blocks(v, h, bottleneck=True)


def ref_wrn(v, x):
  p, s = v['params'], v['batch_stats']
  h = conv(x, p['stem_conv']['kernel'], 1, 1)
  for group in (1, 2, 3):
    q, t = p[f'group{group}_block1'], s[f'group{group}_block1']
    stride = 1 if group == 1 else 2
    # Pre-activation; a projection shortcut (when the shape changes: groups 2
    # and 3 here) reads the pre-activated input, the identity the raw input.
    pre = relu(batch_norm(h, q['bn1'], t['bn1'], 1e-5))
    assert ('proj_conv' in q) == (group > 1)
    shortcut = conv(pre, q['proj_conv']['kernel'], stride) if group > 1 else h
    y = conv(pre, q['conv1']['kernel'], stride, 1)
    y = relu(batch_norm(y, q['bn2'], t['bn2'], 1e-5))
    h = conv(y, q['conv2']['kernel'], 1, 1) + shortcut
  h = relu(batch_norm(h, p['final_bn'], s['final_bn'], 1e-5))
  return dense(h.mean(axis=(1, 2)), p['head'])


def ref_vit(v, x):
  p = v['params']
  patch = p['embedding']['kernel'].shape[0]
  h = jax.lax.conv_general_dilated(
      x,
      p['embedding']['kernel'],
      (patch, patch),
      'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=HIGHEST,
  )
  h = h + p['embedding']['bias']
  b, gh, gw, c = h.shape
  h = h.reshape(b, gh * gw, c)
  h = jnp.concatenate([jnp.broadcast_to(p['cls'], (b, 1, c)), h], axis=1) + p['pos_embedding']
  for i in range(2):
    q = p[f'encoderblock_{i}']
    a = q['attention']
    y = layer_norm(h, q['ln_attn'])
    proj = lambda name: jnp.einsum('btd,dhk->bthk', y, a[name]['kernel'], precision=HIGHEST) + (
        a[name]['bias']
    )
    qq, kk, vv = proj('query'), proj('key'), proj('value')
    head_dim = qq.shape[-1]
    logits = jnp.einsum('bqhk,bshk->bhqs', qq, kk, precision=HIGHEST) / math.sqrt(head_dim)
    weights = jax.nn.softmax(logits, axis=-1)
    ctx = jnp.einsum('bhqs,bshk->bqhk', weights, vv, precision=HIGHEST)
    y = jnp.einsum('bqhk,hkd->bqd', ctx, a['out']['kernel'], precision=HIGHEST) + a['out']['bias']
    h = h + y
    y = layer_norm(h, q['ln_mlp'])
    y = dense(gelu_exact(dense(y, q['mlp']['fc1'])), q['mlp']['fc2'])
    h = h + y
  h = layer_norm(h, p['encoder_norm'])
  return dense(h[:, 0], p['head'])


# The two MobileNet blocks of the tiny model: (kernel, use_se, act, stride).
_MBV3_BLOCKS = ((3, True, 'relu', 2), (5, False, 'hswish', 1))


def ref_mobilenet(v, x):
  p, s = v['params'], v['batch_stats']
  bn = lambda y, q, t, name: batch_norm(y, q[name], t[name], 1e-3)
  h = hard_swish(bn(conv(x, p['stem_conv']['kernel'], 2, 1), p, s, 'stem_bn'))
  for i, (k, use_se, act_name, stride) in enumerate(_MBV3_BLOCKS):
    act = relu if act_name == 'relu' else hard_swish
    q, t = p[f'block{i}'], s[f'block{i}']
    y = h
    if 'expand_conv' in q:
      y = act(bn(conv(y, q['expand_conv']['kernel']), q, t, 'expand_bn'))
    channels = y.shape[-1]
    y = conv(y, q['depthwise_conv']['kernel'], stride, (k - 1) // 2, groups=channels)
    y = act(bn(y, q, t, 'depthwise_bn'))
    if use_se:
      z = y.mean(axis=(1, 2), keepdims=True)
      z = relu(conv(z, q['se']['reduce']['kernel'], bias=q['se']['reduce']['bias']))
      z = conv(z, q['se']['expand']['kernel'], bias=q['se']['expand']['bias'])
      y = y * hard_sigmoid(z)
    y = bn(conv(y, q['project_conv']['kernel']), q, t, 'project_bn')
    if stride == 1 and h.shape[-1] == y.shape[-1]:
      y = y + h
    h = y
  h = hard_swish(bn(conv(h, p['last_conv']['kernel']), p, s, 'last_bn'))
  h = hard_swish(dense(h.mean(axis=(1, 2)), p['hidden_fc']))
  return dense(h, p['head'])  # dropout is off in eval mode


# name -> (kwargs shrinking the model, input shape, reference).
FAMILIES = {
    'mlp': (dict(hidden_sizes=(16, 8)), (2, 6, 6, 1), ref_mlp),
    'cnn': (dict(features=(4, 6), hidden_size=8), (2, 8, 8, 1), ref_cnn),
    'resnet18': (dict(width=4, stage_sizes=(1, 1)), (2, 8, 8, 3), ref_resnet18),
    'resnet50': (dict(width=4, stage_sizes=(1, 1)), (2, 16, 16, 3), ref_resnet50),
    'wrn22': (dict(depth=10, widen_factor=1, base_width=4), (2, 8, 8, 3), ref_wrn),
    'vit_tiny_test': (dict(dropout_rate=0.5, attention_dropout_rate=0.5), (2, 8, 8, 3), ref_vit),
    'mobilenet_v3_small': (
        dict(
            width_multiplier=0.5,
            block_specs=((3, 16, 16, True, 'relu', 2), (5, 48, 16, False, 'hswish', 1)),
        ),
        (2, 16, 16, 3),
        ref_mobilenet,
    ),
}


def _random_variables(abstract, seed):
  """Random weights, biases, norm scales and BatchNorm running statistics."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    shape = leaf.shape
    if name == 'var':
      x = rng.uniform(0.5, 1.5, shape)
    elif name == 'scale':
      x = 1.0 + 0.2 * rng.standard_normal(shape)
    elif name in ('bias', 'mean'):
      x = 0.2 * rng.standard_normal(shape)
    elif name == 'kernel':
      fan_in = math.prod(shape[:-1])
      if len(shape) == 3 and path[-2].key in ('query', 'key', 'value'):
        fan_in = shape[0]  # (embed, heads, head_dim)
      x = rng.standard_normal(shape) / math.sqrt(fan_in)
    else:  # cls token, position embedding
      x = 0.5 * rng.standard_normal(shape)
    return jnp.asarray(x, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.mark.parametrize('name', list(FAMILIES))
def test_forward_matches_reference(name):
  kwargs, shape, reference = FAMILIES[name]
  model = models.get_model(name, 5, **kwargs)
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(shape, jnp.float32), train=False)
  )
  variables = _random_variables(abstract, seed=len(name))
  x = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  want = reference(variables, x)
  assert got.shape == want.shape == (shape[0], 5)
  # The logits vary across the batch and classes (the reference is not
  # trivially matched by a constant).
  assert float(jnp.std(want)) > 0.05
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-5)
