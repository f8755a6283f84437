"""ResNets: ResNet-18 in the CIFAR form and ResNet-50 in the ImageNet form.

Both share the residual block code and one `ResNet` module; they differ in the block
type, the stage depths and the stem (see `srigl_jax.models.get_model`). The ImageNet
form is torchvision's ResNet v1.5 (stride on the 3x3 conv of the bottleneck), which
the paper's PyTorch runs used; the CIFAR form replaces the 7x7/stride-2 stem and
max-pool by one 3x3/stride-1 conv, so 32x32 inputs reach the last stage at 4x4.

Module names: `stem_conv`/`stem_bn`, blocks `stage{i}_block{j}` holding `conv1`,
`bn1`, ... and, when the shape changes, `proj_conv`/`proj_bn`; the classifier is
`head`.
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from srigl_jax.models import common

# Stem name -> (kernel side, stride) of its conv.
_STEMS = {'cifar': (3, 1), 'imagenet': (7, 2)}


def _shortcut(conv_bn, x, y, strides: int):
  """The block input `x`, projected to the shape of the branch output `y` if it differs."""
  if x.shape == y.shape:
    return x
  return conv_bn(x, y.shape[-1], 1, strides, names=('proj_conv', 'proj_bn'))


class _Block(nn.Module):
  """The attributes of both block types.

  Attributes:
    features: Width of the block's convs; it outputs `expansion * features` channels.
    strides: Stride of the block's strided conv and of its projection shortcut.
    dtype: Compute dtype.
  """

  features: int
  strides: int = 1
  dtype: Any = jnp.float32


class BasicBlock(_Block):
  """Two 3x3 convs, the first strided, with a residual connection (ResNet-18/34)."""

  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv_bn = functools.partial(common.conv_bn, train=train, dtype=self.dtype)
    y = conv_bn(x, self.features, 3, self.strides, names=('conv1', 'bn1'), act=nn.relu)
    y = conv_bn(y, self.features, 3, names=('conv2', 'bn2'))
    return nn.relu(y + _shortcut(conv_bn, x, y, self.strides))


class BottleneckBlock(_Block):
  """1x1 reduce, 3x3 strided (v1.5), 1x1 expand by 4, with a residual connection."""

  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv_bn = functools.partial(common.conv_bn, train=train, dtype=self.dtype)
    y = conv_bn(x, self.features, 1, names=('conv1', 'bn1'), act=nn.relu)
    y = conv_bn(y, self.features, 3, self.strides, names=('conv2', 'bn2'), act=nn.relu)
    y = conv_bn(y, self.features * self.expansion, 1, names=('conv3', 'bn3'))
    return nn.relu(y + _shortcut(conv_bn, x, y, self.strides))


class ResNet(common.Classifier):
  """A ResNet with either the CIFAR or the ImageNet stem.

  Attributes:
    stage_sizes: Number of blocks in each stage; stage i has width `width * 2**i`
      and, from the second stage on, starts with a stride-2 block.
    block_cls: `BasicBlock` or `BottleneckBlock`.
    width: Channels of the stem and of the first stage (64 for the real networks;
      smaller values give fast test models).
    stem: 'cifar' (3x3/1 conv, no pooling) or 'imagenet' (7x7/2 conv, 3x3/2 max-pool).
  """

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block_cls: Any = BasicBlock
  width: int = 64
  stem: str = 'cifar'

  @nn.nowrap
  def backbone(self, x, train):
    if self.stem not in _STEMS:
      raise ValueError(f"stem must be 'cifar' or 'imagenet', got {self.stem!r}")
    kernel_size, strides = _STEMS[self.stem]
    x = common.conv_bn(
        x,
        self.width,
        kernel_size,
        strides,
        names=('stem_conv', 'stem_bn'),
        train=train,
        dtype=self.dtype,
        act=nn.relu,
    )
    if self.stem == 'imagenet':
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block_cls(
            self.width * 2**i, strides=strides, dtype=self.dtype, name=f'stage{i + 1}_block{j + 1}'
        )(x, train=train)
    return jnp.mean(x, axis=(1, 2))
