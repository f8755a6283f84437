"""A small convolutional network for Fashion-MNIST-sized inputs."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class CNN(nn.Module):
  """Conv-ReLU-MaxPool stages followed by one hidden dense layer and the head.

  Layers are named `conv_0`, `conv_1`, ..., `dense_0` and `head`. On 28x28 inputs
  the defaults give 28 -> 14 -> 7 spatially before the dense layers.

  Attributes:
    num_classes: Number of output logits.
    features: Output channels of each 3x3 conv stage.
    hidden_size: Width of the dense layer before the head.
    dtype: Compute dtype; parameters stay float32.
  """

  num_classes: int
  features: Sequence[int] = (32, 64)
  hidden_size: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    """Applies the CNN.

    Args:
      x: NHWC images.
      train: Unused; kept so every model shares one call signature.

    Returns:
      Float32 logits `(batch, num_classes)`.
    """
    del train
    x = jnp.asarray(x, self.dtype)
    for i, ch in enumerate(self.features):
      x = nn.Conv(ch, (3, 3), padding='SAME', dtype=self.dtype, name=f'conv_{i}')(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.hidden_size, dtype=self.dtype, name='dense_0')(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return x.astype(jnp.float32)
