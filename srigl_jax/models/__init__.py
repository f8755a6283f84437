"""Flax Linen models for SRigL experiments, and a registry by name.

Every model is called as `model.apply(variables, x, train=..., mutable=...)` on NHWC
images, keeps BatchNorm state (where it has any) in the 'batch_stats' collection,
draws dropout from the 'dropout' rng, returns float32 logits, and names its final
classifier `head`.
"""

from typing import Any

import flax.linen as nn

from srigl_jax.models import vit
from srigl_jax.models.cnn import CNN
from srigl_jax.models.mlp import MLP
from srigl_jax.models.mobilenet import MobileNetV3
from srigl_jax.models.resnet import BasicBlock, BottleneckBlock, ResNet
from srigl_jax.models.vit import ViT
from srigl_jax.models.wide_resnet import WideResNet

# Name -> (module class, its attributes for that network). The parameter counts
# are at the paper's number of classes.
_REGISTRY: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    'mlp': (MLP, {}),
    'cnn': (CNN, {}),
    # CIFAR form, 11.2M parameters.
    'resnet18': (ResNet, dict(stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock, stem='cifar')),
    # v1.5 in the ImageNet form, 25.6M parameters.
    'resnet50': (
        ResNet,
        dict(stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock, stem='imagenet'),
    ),
    # WRN-22-8, 17.2M parameters.
    'wrn22': (WideResNet, dict(depth=22, widen_factor=8)),
    'vit_ti16': (ViT, vit.SIZES['ti16']),
    'vit_s16': (ViT, vit.SIZES['s16']),
    'vit_b16': (ViT, vit.SIZES['b16']),
    'vit_tiny_test': (ViT, vit.SIZES['tiny_test']),
    # 2.5M parameters.
    'mobilenet_v3_small': (MobileNetV3, dict(size='small')),
    # 5.5M parameters.
    'mobilenet_v3_large': (MobileNetV3, dict(size='large')),
}

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds a model by registry name.

  Args:
    name: One of `MODEL_NAMES`.
    num_classes: Number of output logits.
    **kwargs: Attributes of the model's module, replacing the named network's,
      e.g. `dtype=jnp.bfloat16`, `width=8` (ResNets), `widen_factor=2` (WRN),
      `width_multiplier=0.25` (MobileNet), `hidden_sizes=(256,)` (MLP),
      `dropout_rate=0.1`.

  Returns:
    An unbound Flax module.

  Raises:
    ValueError: If `name` is not registered.
  """
  if name not in _REGISTRY:
    raise ValueError(f'Unknown model {name!r}; valid names: {", ".join(MODEL_NAMES)}')
  cls, attributes = _REGISTRY[name]
  return cls(num_classes=num_classes, **{**attributes, **kwargs})


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
]
