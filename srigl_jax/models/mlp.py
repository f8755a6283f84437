"""Multi-layer perceptron for small image datasets (MNIST / Fashion-MNIST)."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  """A ReLU MLP that flattens its input image.

  The hidden layers are named `dense_0`, `dense_1`, ...; the classifier is `head`.

  Attributes:
    num_classes: Number of output logits.
    hidden_sizes: Width of each hidden layer, input side first.
    dtype: Compute dtype; parameters stay float32.
  """

  num_classes: int
  hidden_sizes: Sequence[int] = (1024, 1024)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    """Applies the MLP.

    Args:
      x: Images `(batch, ...)`, flattened to `(batch, features)`.
      train: Unused; kept so every model shares one call signature.

    Returns:
      Float32 logits `(batch, num_classes)`.
    """
    del train
    x = jnp.asarray(x, self.dtype).reshape((x.shape[0], -1))
    for i, width in enumerate(self.hidden_sizes):
      x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f'dense_{i}')(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    # Loss and softmax in float32 even when the body runs in bfloat16.
    return x.astype(jnp.float32)
