"""Vision Transformer (Dosovitskiy et al., 2021): ViT-Ti/16, S/16, B/16.

A conv patch embedding (`embedding`), a learned class token (`cls`) and learned
position embedding (`pos_embedding`), pre-LN encoder blocks
(`encoderblock_{i}` holding `ln_attn`, `attention`, `ln_mlp`, `mlp` with `fc1`,
`fc2`), a final LayerNorm `encoder_norm`, and the classifier `head` on the class
token.

The attention is Flax's `MultiHeadDotProductAttention`, whose `query`, `key`,
`value` kernels have shape `(embed, heads, head_dim)` (fan-in axis 0) and whose
`out` kernel has shape `(heads, head_dim, embed)` (fan-in axes 0 and 1); the sparse
optimizer relies on these names and shapes.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from srigl_jax.models import common


class MlpBlock(nn.Module):
  """Transformer feed-forward block: Dense, GELU, Dense.

  Attributes:
    mlp_dim: Hidden width (3072 for ViT-B).
    dropout_rate: Dropout after each Dense.
    dtype: Compute dtype.
  """

  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    dense = functools.partial(
        nn.Dense,
        dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(1e-6),
    )
    out_dim = x.shape[-1]
    # Exact (erf) GELU, as in the PyTorch ViT the paper trained.
    x = nn.gelu(dense(self.mlp_dim, name='fc1')(x), approximate=False)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = dense(out_dim, name='fc2')(x)
    return nn.Dropout(self.dropout_rate, deterministic=not train)(x)


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + MHA(LN(x)), then x + MLP(LN(x)).

  Attributes:
    num_heads: Attention heads.
    mlp_dim: Hidden width of the MLP block.
    dropout_rate: Dropout on the residual branches.
    attention_dropout_rate: Dropout on the attention weights.
    dtype: Compute dtype.
  """

  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = nn.LayerNorm(dtype=self.dtype, name='ln_attn')(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads,
        dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        dropout_rate=self.attention_dropout_rate,
        deterministic=not train,
        name='attention',
    )(y, y)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    x = x + y
    y = nn.LayerNorm(dtype=self.dtype, name='ln_mlp')(x)
    y = MlpBlock(self.mlp_dim, self.dropout_rate, dtype=self.dtype, name='mlp')(y, train=train)
    return x + y


class ViT(common.Classifier):
  """Vision Transformer classifying from the class token.

  The input's sides must be multiples of `patch_size`. The position embedding's
  length follows the input resolution at init (197 tokens for 224x224 images and
  patch 16); apply the model at that resolution.

  Attributes:
    patch_size: Side of the square patches.
    hidden_size: Token width (embed dim).
    num_layers: Number of encoder blocks.
    num_heads: Attention heads; must divide `hidden_size`.
    mlp_dim: Hidden width of each MLP block.
    dropout_rate: Dropout on embeddings and residual branches ('dropout' rng).
    attention_dropout_rate: Dropout on attention weights ('dropout' rng).
  """

  patch_size: int = 16
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0

  @nn.nowrap
  def backbone(self, x, train):
    if self.hidden_size % self.num_heads:
      raise ValueError(f'num_heads={self.num_heads} must divide hidden_size={self.hidden_size}')
    p = self.patch_size
    x = nn.Conv(
        self.hidden_size,
        (p, p),
        strides=(p, p),
        padding='VALID',
        dtype=self.dtype,
        name='embedding',
    )(x)
    b, h, w, c = x.shape
    x = x.reshape((b, h * w, c))
    cls = self.param('cls', nn.initializers.zeros, (1, 1, c), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c)), x], axis=1)
    pos = self.param('pos_embedding', nn.initializers.normal(0.02), (1, h * w + 1, c), jnp.float32)
    x = x + pos.astype(self.dtype)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    for i in range(self.num_layers):
      x = EncoderBlock(
          self.num_heads,
          self.mlp_dim,
          self.dropout_rate,
          self.attention_dropout_rate,
          dtype=self.dtype,
          name=f'encoderblock_{i}',
      )(x, train=train)
    x = nn.LayerNorm(dtype=self.dtype, name='encoder_norm')(x)
    return x[:, 0]


# `ViT` attributes of each size, registered as 'vit_<size>'.
SIZES = {
    'ti16': dict(patch_size=16, hidden_size=192, num_layers=12, num_heads=3, mlp_dim=768),
    's16': dict(patch_size=16, hidden_size=384, num_layers=12, num_heads=6, mlp_dim=1536),
    'b16': dict(patch_size=16, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072),
    # Only for tests and smoke runs: a few ms per step on a CPU at 16x16 inputs.
    'tiny_test': dict(patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64),
}
