"""MobileNet-V3 small and large (Howard et al., 2019), in torchvision's layout.

Inverted residual blocks `block{i}`: optional 1x1 expansion (`expand_conv`,
`expand_bn`), a depthwise kxk conv (`depthwise_conv`, `depthwise_bn`), optional
squeeze-and-excitation (`se` with 1x1 convs `reduce` and `expand`), and a linear
1x1 projection (`project_conv`, `project_bn`). Then `last_conv`/`last_bn`, global
average pooling, the dense `hidden_fc` (1280 or 1024 units, hard-swish, dropout)
and the classifier `head`.

Depthwise kernels `(k, k, 1, channels)` have fan-in k*k (9 or 25); the configs keep
every module whose name contains 'depthwise' dense.
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from srigl_jax.models import common

# (kernel, expanded channels, out channels, use SE, activation, stride) per block;
# the block's input channels are the previous block's output.
_LARGE = (
    (3, 16, 16, False, 'relu', 1),
    (3, 64, 24, False, 'relu', 2),
    (3, 72, 24, False, 'relu', 1),
    (5, 72, 40, True, 'relu', 2),
    (5, 120, 40, True, 'relu', 1),
    (5, 120, 40, True, 'relu', 1),
    (3, 240, 80, False, 'hswish', 2),
    (3, 200, 80, False, 'hswish', 1),
    (3, 184, 80, False, 'hswish', 1),
    (3, 184, 80, False, 'hswish', 1),
    (3, 480, 112, True, 'hswish', 1),
    (3, 672, 112, True, 'hswish', 1),
    (5, 672, 160, True, 'hswish', 2),
    (5, 960, 160, True, 'hswish', 1),
    (5, 960, 160, True, 'hswish', 1),
)
_SMALL = (
    (3, 16, 16, True, 'relu', 2),
    (3, 72, 24, False, 'relu', 2),
    (3, 88, 24, False, 'relu', 1),
    (5, 96, 40, True, 'hswish', 2),
    (5, 240, 40, True, 'hswish', 1),
    (5, 240, 40, True, 'hswish', 1),
    (5, 120, 48, True, 'hswish', 1),
    (5, 144, 48, True, 'hswish', 1),
    (5, 288, 96, True, 'hswish', 2),
    (5, 576, 96, True, 'hswish', 1),
    (5, 576, 96, True, 'hswish', 1),
)
_CONFIGS = {'large': (_LARGE, 1280), 'small': (_SMALL, 1024)}
_ACTIVATIONS = {'relu': nn.relu, 'hswish': nn.hard_swish}


def _conv_bn(train: bool, dtype: Any):
  # torchvision's MobileNet-V3 BatchNorm: momentum 0.01 (0.99 in Flax's
  # convention) and epsilon 1e-3.
  return functools.partial(common.conv_bn, train=train, dtype=dtype, momentum=0.99, epsilon=1e-3)


def make_divisible(value: float, divisor: int = 8) -> int:
  """Rounds a channel count to a multiple of `divisor`, losing at most 10%.

  Args:
    value: The unrounded channel count.
    divisor: The multiple to round to.

  Returns:
    The rounded channel count, at least `divisor`.
  """
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


class SqueezeExcite(nn.Module):
  """Channel attention: pool, 1x1 reduce + ReLU, 1x1 expand + hard-sigmoid, scale.

  Attributes:
    reduced: Channels after the reduce conv.
    dtype: Compute dtype.
  """

  reduced: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = nn.relu(nn.Conv(self.reduced, (1, 1), dtype=self.dtype, name='reduce')(s))
    s = nn.Conv(x.shape[-1], (1, 1), dtype=self.dtype, name='expand')(s)
    return x * nn.hard_sigmoid(s)


class InvertedResidual(nn.Module):
  """MobileNet-V3 block: expand, depthwise, [SE], project, [residual].

  Attributes:
    kernel_size: Side of the depthwise kernel.
    expanded: Channels after expansion (no expansion conv when equal to the input).
    features: Output channels.
    use_se: Whether to apply squeeze-and-excitation after the depthwise conv.
    activation: 'relu' or 'hswish'.
    strides: Stride of the depthwise conv.
    dtype: Compute dtype.
  """

  kernel_size: int
  expanded: int
  features: int
  use_se: bool
  activation: str
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    act = _ACTIVATIONS[self.activation]
    conv_bn = _conv_bn(train, self.dtype)
    y = x
    if self.expanded != x.shape[-1]:
      y = conv_bn(y, self.expanded, 1, names=('expand_conv', 'expand_bn'), act=act)
    y = conv_bn(
        y,
        self.expanded,
        self.kernel_size,
        self.strides,
        names=('depthwise_conv', 'depthwise_bn'),
        act=act,
        feature_group_count=self.expanded,
    )
    if self.use_se:
      y = SqueezeExcite(make_divisible(self.expanded // 4), dtype=self.dtype, name='se')(y)
    y = conv_bn(y, self.features, 1, names=('project_conv', 'project_bn'))
    if self.strides == 1 and x.shape[-1] == self.features:
      y = y + x
    return y


class MobileNetV3(common.Classifier):
  """MobileNet-V3 classifier (224x224 inputs for ImageNet).

  Attributes:
    size: 'large' or 'small'.
    width_multiplier: Scales every channel count (rounded to multiples of 8).
    block_specs: Replaces the size's block table (tests, ablations): tuples
      `(kernel, expanded, out, use_se, 'relu' | 'hswish', stride)`; the size
      then only sets the width of `hidden_fc`.
    dropout_rate: Dropout before the head ('dropout' rng).
  """

  size: str = 'large'
  width_multiplier: float = 1.0
  block_specs: Sequence[tuple[int, int, int, bool, str, int]] | None = None
  dropout_rate: float = 0.2

  @nn.nowrap
  def backbone(self, x, train):
    if self.size not in _CONFIGS:
      raise ValueError(f'size must be one of {sorted(_CONFIGS)}, got {self.size!r}')
    blocks, last_channel = _CONFIGS[self.size]
    if self.block_specs is not None:
      blocks = self.block_specs

    def ch(channels):
      return make_divisible(channels * self.width_multiplier)

    conv_bn = _conv_bn(train, self.dtype)
    x = conv_bn(x, ch(16), 3, 2, names=('stem_conv', 'stem_bn'), act=nn.hard_swish)
    for i, (k, exp, out, se, act, stride) in enumerate(blocks):
      x = InvertedResidual(
          k, ch(exp), ch(out), se, act, stride, dtype=self.dtype, name=f'block{i}'
      )(x, train=train)
    x = conv_bn(x, 6 * x.shape[-1], 1, names=('last_conv', 'last_bn'), act=nn.hard_swish)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.hard_swish(nn.Dense(ch(last_channel), dtype=self.dtype, name='hidden_fc')(x))
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x)
