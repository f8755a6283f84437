"""A small convolutional network for Fashion-MNIST-sized inputs."""

import math
from collections.abc import Sequence

import flax.linen as nn

from srigl_jax.models import common


class CNN(common.Classifier):
  """Conv-ReLU-MaxPool stages followed by one hidden dense layer and the head.

  Layers are named `conv_0`, `conv_1`, ..., `dense_0` and `head`. On 28x28 inputs
  the defaults give 28 -> 14 -> 7 spatially before the dense layers.

  Attributes:
    features: Output channels of each 3x3 conv stage.
    hidden_size: Width of the dense layer before the head.
  """

  features: Sequence[int] = (32, 64)
  hidden_size: int = 256

  @nn.nowrap
  def backbone(self, x, train):
    del train
    for i, ch in enumerate(self.features):
      x = nn.Conv(ch, (3, 3), padding='SAME', dtype=self.dtype, name=f'conv_{i}')(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    # The size spelled out: -1 cannot be inferred for a batch of 0.
    x = x.reshape((x.shape[0], math.prod(x.shape[1:])))
    return nn.relu(nn.Dense(self.hidden_size, dtype=self.dtype, name='dense_0')(x))
