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
# torchvision's choices: Kaiming normal over fan-out, BatchNorm momentum 0.01
# (0.99 in Flax's convention) and epsilon 1e-3.
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _batch_norm(name: str, train: bool, dtype: Any) -> nn.BatchNorm:
  return nn.BatchNorm(
      use_running_average=not train, momentum=0.99, epsilon=1e-3, dtype=dtype, name=name
  )


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
    norm = functools.partial(_batch_norm, train=train, dtype=self.dtype)
    y = x
    if self.expanded != x.shape[-1]:
      y = nn.Conv(
          self.expanded,
          (1, 1),
          use_bias=False,
          dtype=self.dtype,
          kernel_init=_conv_init,
          name='expand_conv',
      )(y)
      y = act(norm('expand_bn')(y))
    p = (self.kernel_size - 1) // 2
    y = nn.Conv(
        self.expanded,
        (self.kernel_size,) * 2,
        (self.strides,) * 2,
        padding=((p, p), (p, p)),
        feature_group_count=self.expanded,
        use_bias=False,
        dtype=self.dtype,
        kernel_init=_conv_init,
        name='depthwise_conv',
    )(y)
    y = act(norm('depthwise_bn')(y))
    if self.use_se:
      y = SqueezeExcite(make_divisible(self.expanded // 4), dtype=self.dtype, name='se')(y)
    y = nn.Conv(
        self.features,
        (1, 1),
        use_bias=False,
        dtype=self.dtype,
        kernel_init=_conv_init,
        name='project_conv',
    )(y)
    y = norm('project_bn')(y)
    if self.strides == 1 and x.shape[-1] == self.features:
      y = y + x
    return y


class MobileNetV3(nn.Module):
  """MobileNet-V3 classifier.

  Attributes:
    num_classes: Number of output logits.
    size: 'large' or 'small'.
    width_multiplier: Scales every channel count (rounded to multiples of 8).
    block_specs: Replaces the size's block table (tests, ablations): tuples
      `(kernel, expanded, out, use_se, 'relu' | 'hswish', stride)`; the size
      then only sets the width of `hidden_fc`.
    dropout_rate: Dropout before the head ('dropout' rng).
    dtype: Compute dtype; parameters stay float32.
  """

  num_classes: int
  size: str = 'large'
  width_multiplier: float = 1.0
  block_specs: Sequence[tuple[int, int, int, bool, str, int]] | None = None
  dropout_rate: float = 0.2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    """Applies the network.

    Args:
      x: NHWC images (224x224 for ImageNet).
      train: Batch statistics, dropout and `batch_stats` updates when True.

    Returns:
      Float32 logits `(batch, num_classes)`.
    """
    if self.size not in _CONFIGS:
      raise ValueError(f'size must be one of {sorted(_CONFIGS)}, got {self.size!r}')
    blocks, last_channel = _CONFIGS[self.size]
    if self.block_specs is not None:
      blocks = self.block_specs

    def ch(channels):
      return make_divisible(channels * self.width_multiplier)

    norm = functools.partial(_batch_norm, train=train, dtype=self.dtype)

    x = jnp.asarray(x, self.dtype)
    x = nn.Conv(
        ch(16),
        (3, 3),
        (2, 2),
        padding=((1, 1), (1, 1)),
        use_bias=False,
        dtype=self.dtype,
        kernel_init=_conv_init,
        name='stem_conv',
    )(x)
    x = nn.hard_swish(norm('stem_bn')(x))
    for i, (k, exp, out, se, act, stride) in enumerate(blocks):
      x = InvertedResidual(
          k, ch(exp), ch(out), se, act, stride, dtype=self.dtype, name=f'block{i}'
      )(x, train=train)
    x = nn.Conv(
        6 * x.shape[-1],
        (1, 1),
        use_bias=False,
        dtype=self.dtype,
        kernel_init=_conv_init,
        name='last_conv',
    )(x)
    x = nn.hard_swish(norm('last_bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.hard_swish(nn.Dense(ch(last_channel), dtype=self.dtype, name='hidden_fc')(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return x.astype(jnp.float32)


def mobilenet_v3(size: str, num_classes: int, **kwargs) -> MobileNetV3:
  """MobileNet-V3 of the given size (about 5.5M large / 2.5M small at 1000 classes).

  Args:
    size: 'large' or 'small'.
    num_classes: Number of output logits.
    **kwargs: Overrides of `MobileNetV3` attributes (e.g. `width_multiplier`).

  Returns:
    The module.
  """
  return MobileNetV3(num_classes=num_classes, size=size, **kwargs)
