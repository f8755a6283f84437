"""Flax Linen models for SRigL experiments, and a registry by name.

Every model is called as `model.apply(variables, x, train=..., mutable=...)` on NHWC
images, keeps BatchNorm state (where it has any) in the 'batch_stats' collection,
draws dropout from the 'dropout' rng, returns float32 logits, and names its final
classifier `head`.
"""

import functools
from collections.abc import Callable

import flax.linen as nn

from srigl_jax.models.cnn import CNN
from srigl_jax.models.mlp import MLP
from srigl_jax.models.mobilenet import MobileNetV3, mobilenet_v3
from srigl_jax.models.resnet import BasicBlock, BottleneckBlock, ResNet, resnet18, resnet50
from srigl_jax.models.vit import ViT, vit
from srigl_jax.models.wide_resnet import WideResNet, wrn22

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    'mlp': MLP,
    'cnn': CNN,
    'resnet18': resnet18,
    'resnet50': resnet50,
    'wrn22': wrn22,
    'vit_ti16': functools.partial(vit, 'ti16'),
    'vit_s16': functools.partial(vit, 's16'),
    'vit_b16': functools.partial(vit, 'b16'),
    'vit_tiny_test': functools.partial(vit, 'tiny_test'),
    'mobilenet_v3_small': functools.partial(mobilenet_v3, 'small'),
    'mobilenet_v3_large': functools.partial(mobilenet_v3, 'large'),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds a model by registry name.

  Args:
    name: One of `MODEL_NAMES`.
    num_classes: Number of output logits.
    **kwargs: Overrides of the model's attributes, e.g. `dtype=jnp.bfloat16`,
      `width=8` (ResNets), `widen_factor=2` (WRN), `width_multiplier=0.25`
      (MobileNet), `hidden_sizes=(256,)` (MLP), `dropout_rate=0.1`.

  Returns:
    An unbound Flax module.

  Raises:
    ValueError: If `name` is not registered.
  """
  if name not in _REGISTRY:
    raise ValueError(f'Unknown model {name!r}; valid names: {", ".join(MODEL_NAMES)}')
  return _REGISTRY[name](num_classes=num_classes, **kwargs)


__all__ = [
    'BasicBlock',
    'BottleneckBlock',
    'CNN',
    'MLP',
    'MODEL_NAMES',
    'MobileNetV3',
    'ResNet',
    'ViT',
    'WideResNet',
    'get_model',
    'mobilenet_v3',
    'resnet18',
    'resnet50',
    'vit',
    'wrn22',
]
