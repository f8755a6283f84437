"""ResNets: ResNet-18 in the CIFAR form and ResNet-50 in the ImageNet form.

Both share the residual block code and one `ResNet` module; they differ in the block
type, the stage depths and the stem. The ImageNet form is torchvision's ResNet v1.5
(stride on the 3x3 conv of the bottleneck), which the paper's PyTorch runs used; the
CIFAR form replaces the 7x7/stride-2 stem and max-pool by one 3x3/stride-1 conv, so
32x32 inputs reach the last stage at 4x4.

Module names: `stem_conv`/`stem_bn`, blocks `stage{i}_block{j}` holding `conv1`,
`bn1`, ... and, when the shape changes, `proj_conv`/`proj_bn`; the classifier is
`head`.
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# torchvision initialises convs with Kaiming normal over fan-out.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _pad(kernel_size: int):
  # Symmetric padding as in PyTorch; Flax 'SAME' pads asymmetrically under stride 2.
  p = (kernel_size - 1) // 2
  return ((p, p), (p, p))


def _conv_and_norm(dtype: Any, train: bool):
  """The bias-free conv and the BatchNorm shared by both block types."""
  conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype, kernel_init=conv_kernel_init)
  norm = functools.partial(
      nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype
  )
  return conv, norm


class BasicBlock(nn.Module):
  """Two 3x3 convs with a residual connection (ResNet-18/34).

  Attributes:
    features: Output channels of the block.
    strides: Stride of the first conv (and of the projection shortcut).
    dtype: Compute dtype.
  """

  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv, norm = _conv_and_norm(self.dtype, train)
    residual = x
    y = conv(self.features, (3, 3), (self.strides,) * 2, padding=_pad(3), name='conv1')(x)
    y = nn.relu(norm(name='bn1')(y))
    y = conv(self.features, (3, 3), padding=_pad(3), name='conv2')(y)
    y = norm(name='bn2')(y)
    if residual.shape != y.shape:
      residual = conv(
          self.features, (1, 1), (self.strides,) * 2, padding='VALID', name='proj_conv'
      )(residual)
      residual = norm(name='proj_bn')(residual)
    return nn.relu(y + residual)


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a residual connection.

  Attributes:
    features: Bottleneck width; the block outputs `4 * features` channels.
    strides: Stride of the 3x3 conv (v1.5) and of the projection shortcut.
    dtype: Compute dtype.
  """

  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv, norm = _conv_and_norm(self.dtype, train)
    residual = x
    y = conv(self.features, (1, 1), padding='VALID', name='conv1')(x)
    y = nn.relu(norm(name='bn1')(y))
    y = conv(self.features, (3, 3), (self.strides,) * 2, padding=_pad(3), name='conv2')(y)
    y = nn.relu(norm(name='bn2')(y))
    y = conv(self.features * self.expansion, (1, 1), padding='VALID', name='conv3')(y)
    y = norm(name='bn3')(y)
    if residual.shape != y.shape:
      residual = conv(
          self.features * self.expansion,
          (1, 1),
          (self.strides,) * 2,
          padding='VALID',
          name='proj_conv',
      )(residual)
      residual = norm(name='proj_bn')(residual)
    return nn.relu(y + residual)


class ResNet(nn.Module):
  """A ResNet with either the CIFAR or the ImageNet stem.

  Attributes:
    num_classes: Number of output logits.
    stage_sizes: Number of blocks in each stage; stage i has width `width * 2**i`
      and, from the second stage on, starts with a stride-2 block.
    block_cls: `BasicBlock` or `BottleneckBlock`.
    width: Channels of the stem and of the first stage (64 for the real networks;
      smaller values give fast test models).
    stem: 'cifar' (3x3/1 conv, no pooling) or 'imagenet' (7x7/2 conv, 3x3/2 max-pool).
    dtype: Compute dtype; parameters stay float32.
  """

  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block_cls: Any = BasicBlock
  width: int = 64
  stem: str = 'cifar'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    """Applies the network.

    Args:
      x: NHWC images.
      train: Batch statistics are used and `batch_stats` updated when True.

    Returns:
      Float32 logits `(batch, num_classes)`.
    """
    x = jnp.asarray(x, self.dtype)
    if self.stem == 'cifar':
      x = nn.Conv(
          self.width,
          (3, 3),
          padding=_pad(3),
          use_bias=False,
          dtype=self.dtype,
          kernel_init=conv_kernel_init,
          name='stem_conv',
      )(x)
    elif self.stem == 'imagenet':
      x = nn.Conv(
          self.width,
          (7, 7),
          (2, 2),
          padding=_pad(7),
          use_bias=False,
          dtype=self.dtype,
          kernel_init=conv_kernel_init,
          name='stem_conv',
      )(x)
    else:
      raise ValueError(f"stem must be 'cifar' or 'imagenet', got {self.stem!r}")
    x = nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name='stem_bn'
    )(x)
    x = nn.relu(x)
    if self.stem == 'imagenet':
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block_cls(
            self.width * 2**i, strides=strides, dtype=self.dtype, name=f'stage{i + 1}_block{j + 1}'
        )(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return x.astype(jnp.float32)


def resnet18(num_classes: int, **kwargs) -> ResNet:
  """ResNet-18 in the CIFAR form (about 11.2M parameters at 10 classes).

  Args:
    num_classes: Number of output logits.
    **kwargs: Overrides of `ResNet` attributes (e.g. `width=8` for tests).

  Returns:
    The module.
  """
  kwargs = {'stage_sizes': (2, 2, 2, 2), 'block_cls': BasicBlock, 'stem': 'cifar', **kwargs}
  return ResNet(num_classes=num_classes, **kwargs)


def resnet50(num_classes: int, **kwargs) -> ResNet:
  """ResNet-50 (v1.5) in the ImageNet form (about 25.6M parameters at 1000 classes).

  Args:
    num_classes: Number of output logits.
    **kwargs: Overrides of `ResNet` attributes.

  Returns:
    The module.
  """
  kwargs = {'stage_sizes': (3, 4, 6, 3), 'block_cls': BottleneckBlock, 'stem': 'imagenet', **kwargs}
  return ResNet(num_classes=num_classes, **kwargs)
