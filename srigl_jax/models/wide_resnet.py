"""Wide ResNet (Zagoruyko & Komodakis, 2016) for CIFAR, e.g. WRN-22-8.

Pre-activation basic blocks (BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3) in three
groups of widths 16k, 32k, 64k for widen factor k, with (depth - 4) / 6 blocks per
group. When a block changes shape, its 1x1 projection shortcut reads the
pre-activated input, as in the reference implementation.

Module names: `stem_conv`, blocks `group{i}_block{j}` holding `bn1`, `conv1`,
`bn2`, `conv2` and, when the shape changes, `proj_conv`; `final_bn`; `head`.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from srigl_jax.models import common


class WideBasicBlock(nn.Module):
  """A pre-activation wide residual block.

  Attributes:
    features: Output channels.
    strides: Stride of the first conv and of the projection shortcut.
    dropout_rate: Dropout between the two convs (0 in the paper's runs).
    dtype: Compute dtype.
  """

  features: int
  strides: int = 1
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    norm = functools.partial(common.batch_norm, train=train, dtype=self.dtype)
    conv = functools.partial(common.conv, dtype=self.dtype)
    needs_proj = x.shape[-1] != self.features or self.strides != 1
    pre = nn.relu(norm(name='bn1')(x))
    residual = conv(self.features, 1, self.strides, name='proj_conv')(pre) if needs_proj else x
    y = conv(self.features, 3, self.strides, name='conv1')(pre)
    y = nn.relu(norm(name='bn2')(y))
    if self.dropout_rate > 0:
      y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = conv(self.features, 3, name='conv2')(y)
    return y + residual


class WideResNet(common.Classifier):
  """Wide ResNet for 32x32 inputs.

  Attributes:
    depth: Total depth; `(depth - 4)` must be divisible by 6 (22 for WRN-22).
    widen_factor: Width multiplier k (8 for WRN-22-8).
    base_width: Channels of the stem; the groups have `base_width * k * 2**i`.
    dropout_rate: Dropout inside blocks, keyed by the 'dropout' rng.
  """

  depth: int = 22
  widen_factor: int = 8
  base_width: int = 16
  dropout_rate: float = 0.0

  @nn.nowrap
  def backbone(self, x, train):
    if (self.depth - 4) % 6 != 0 or self.depth < 10:
      raise ValueError(f'WRN depth must be 6n + 4 with n >= 1, got {self.depth}')
    n_blocks = (self.depth - 4) // 6
    x = common.conv(self.base_width, 3, dtype=self.dtype, name='stem_conv')(x)
    for i in range(3):
      for j in range(n_blocks):
        x = WideBasicBlock(
            self.base_width * self.widen_factor * 2**i,
            strides=2 if i > 0 and j == 0 else 1,
            dropout_rate=self.dropout_rate,
            dtype=self.dtype,
            name=f'group{i + 1}_block{j + 1}',
        )(x, train=train)
    x = nn.relu(common.batch_norm(train=train, dtype=self.dtype, name='final_bn')(x))
    return jnp.mean(x, axis=(1, 2))
