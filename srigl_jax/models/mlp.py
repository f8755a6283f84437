"""Multi-layer perceptron for small image datasets (MNIST / Fashion-MNIST)."""

import math
from collections.abc import Sequence

import flax.linen as nn

from srigl_jax.models import common


class MLP(common.Classifier):
  """A ReLU MLP that flattens its input image.

  The hidden layers are named `dense_0`, `dense_1`, ...; the classifier is `head`.

  Attributes:
    hidden_sizes: Width of each hidden layer, input side first.
  """

  hidden_sizes: Sequence[int] = (1024, 1024)

  @nn.nowrap
  def backbone(self, x, train):
    del train
    # The size spelled out: -1 cannot be inferred for a batch of 0.
    x = x.reshape((x.shape[0], math.prod(x.shape[1:])))
    for i, width in enumerate(self.hidden_sizes):
      x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f'dense_{i}')(x))
    return x
