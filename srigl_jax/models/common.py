"""The base class of the models and the layers the model families share.

The ResNets, WRN and MobileNet-V3 build their convs as their PyTorch references
do: bias-free, initialised with Kaiming normal over fan-out, padded symmetrically
(Flax's 'SAME' pads more on the bottom and right under stride 2), and followed by
BatchNorm.
The layer helpers create their modules in the calling module's compact method,
so the names given to them are the parameter paths.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

kaiming_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def conv(
    features: int,
    kernel_size: int,
    strides: int = 1,
    *,
    dtype: Any,
    name: str,
    feature_group_count: int = 1,
) -> nn.Conv:
  """A bias-free square conv with symmetric padding and Kaiming fan-out init.

  Args:
    features: Output channels.
    kernel_size: Side of the kernel; an odd side keeps the spatial size at stride 1.
    strides: Stride along both spatial axes.
    dtype: Compute dtype.
    name: Module name.
    feature_group_count: Channel groups; the channel count for a depthwise conv.

  Returns:
    The conv module.
  """
  p = (kernel_size - 1) // 2
  return nn.Conv(
      features,
      (kernel_size, kernel_size),
      (strides, strides),
      padding=((p, p), (p, p)),
      feature_group_count=feature_group_count,
      use_bias=False,
      dtype=dtype,
      kernel_init=kaiming_fan_out,
      name=name,
  )


def batch_norm(
    *, train: bool, dtype: Any, name: str, momentum: float = 0.9, epsilon: float = 1e-5
) -> nn.BatchNorm:
  """BatchNorm keeping running statistics in 'batch_stats'.

  Args:
    train: Normalise with the batch's statistics and update the running ones.
    dtype: Compute dtype.
    name: Module name.
    momentum: Decay of the running averages; PyTorch's momentum m is 1 - m here,
      and the default is PyTorch's.
    epsilon: Added to the variance; PyTorch's default.

  Returns:
    The BatchNorm module.
  """
  return nn.BatchNorm(
      use_running_average=not train, momentum=momentum, epsilon=epsilon, dtype=dtype, name=name
  )


def conv_bn(
    x: jax.Array,
    features: int,
    kernel_size: int,
    strides: int = 1,
    *,
    names: tuple[str, str],
    train: bool,
    dtype: Any,
    act: Callable[[jax.Array], jax.Array] | None = None,
    feature_group_count: int = 1,
    momentum: float = 0.9,
    epsilon: float = 1e-5,
) -> jax.Array:
  """Applies `conv`, then `batch_norm`, then `act` if given.

  Args:
    x: NHWC input.
    features: Output channels.
    kernel_size: Side of the kernel.
    strides: Stride along both spatial axes.
    names: Module names of the conv and of the BatchNorm.
    train: As for `batch_norm`.
    dtype: Compute dtype.
    act: Activation after the BatchNorm; none when None.
    feature_group_count: As for `conv`.
    momentum: As for `batch_norm`.
    epsilon: As for `batch_norm`.

  Returns:
    The NHWC output.
  """
  conv_name, bn_name = names
  y = conv(
      features,
      kernel_size,
      strides,
      dtype=dtype,
      name=conv_name,
      feature_group_count=feature_group_count,
  )(x)
  y = batch_norm(train=train, dtype=dtype, name=bn_name, momentum=momentum, epsilon=epsilon)(y)
  return y if act is None else act(y)


class Classifier(nn.Module):
  """The base of every model: NHWC images in, float32 logits of the Dense `head` out.

  A model defines `backbone`, which maps the images, cast to `dtype`, to
  `(batch, width)` features; the classifier on top is always named `head`, which
  is how configs and the converter find it.

  Attributes:
    num_classes: Number of output logits.
    dtype: Compute dtype; parameters stay float32.
  """

  num_classes: int
  dtype: Any = jnp.float32

  @nn.nowrap
  def backbone(self, x: jax.Array, train: bool) -> jax.Array:
    """Maps NHWC images in `dtype` to `(batch, width)` features; see `__call__`."""
    raise NotImplementedError

  @nn.compact
  def __call__(self, x, train: bool = False):
    """Applies the network.

    Args:
      x: NHWC images.
      train: Training mode: BatchNorm uses the batch's statistics and updates
        the 'batch_stats' collection (pass `mutable=['batch_stats']`), and
        dropout draws from the 'dropout' rng, in the models that have them.

    Returns:
      Float32 logits `(batch, num_classes)`.
    """
    x = self.backbone(jnp.asarray(x, self.dtype), train)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    # Loss and softmax in float32 even when the body runs in bfloat16.
    return x.astype(jnp.float32)
