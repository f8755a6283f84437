"""Tests of the Pallas GPU condensed convolution kernel.

On CPU the kernel runs in the Pallas interpreter and must equal
`condensed_conv_reference` on awkward shapes. Its CUDA lowering (1x1, 3x3
s1/s2, 7x7 s2; fp32/bf16; int16/int32 taps) is checked with the other Pallas
kernels in test_gpu_lowering.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srigl_jax import condensed as C
from srigl_jax.condensed.conv import (
    ConvBlockSizes,
    condense_conv,
    condensed_conv_pallas,
    condensed_conv_reference,
)

# scripts/gpu_check.sh runs these tests on a GPU, where the kernel is compiled
# for real; elsewhere it runs in the Pallas interpreter.
INTERPRET = jax.default_backend() != "gpu"

# Small tiles so that tiny shapes still cross neuron and column block edges;
# unroll 3 leaves a remainder for most fan-ins.
SMALL = ConvBlockSizes(block_neurons=8, block_cols=16, unroll=3)


def make_conv(
    rng,
    kernel_size,
    cin,
    cout,
    k,
    n_active,
    *,
    strides=(1, 1),
    padding="SAME",
    bias=True,
    index_dtype=None,
    input_hw=None,
):
  """A random CondensedConv: n_active of cout channels with k taps each."""
  kh, kw = kernel_size
  fan = kh * kw * cin
  mask = np.zeros((fan, cout), bool)
  for j in rng.choice(cout, n_active, replace=False):
    mask[rng.choice(fan, k, replace=False), j] = True
  kernel = rng.standard_normal((kh, kw, cin, cout)).astype(np.float32)
  b = rng.standard_normal(cout).astype(np.float32) if bias else None
  return condense_conv(
      kernel,
      mask.reshape(kernel.shape),
      b,
      strides=strides,
      padding=padding,
      index_dtype=index_dtype,
      input_hw=input_hw,
  )


# (kernel_size, cin, cout, k, n_active, strides, padding, bias, batch, hw).
CASES = {
    "1x1": ((1, 1), 5, 7, 3, 7, (1, 1), "VALID", True, 1, (5, 5)),
    "3x3_s2_same_odd": ((3, 3), 3, 6, 5, 4, (2, 2), "SAME", True, 3, (9, 7)),
    "3x3_s2_valid": ((3, 3), 4, 9, 7, 9, (2, 2), "VALID", False, 1, (8, 11)),
    "7x7_s2_stem": ((7, 7), 3, 4, 20, 4, (2, 2), ((3, 3), (3, 3)), True, 1, (11, 13)),
    "k1": ((3, 3), 2, 5, 1, 5, (1, 1), "SAME", True, 5, (4, 3)),
    "one_channel": ((3, 3), 3, 6, 4, 1, (1, 1), ((1, 0), (2, 1)), True, 3, (5, 6)),
    "2x3_s12_no_bias": ((2, 3), 3, 5, 6, 3, (1, 2), ((0, 1), (1, 0)), False, 2, (6, 7)),
}


@pytest.mark.parametrize("index_dtype", [jnp.int16, jnp.int32], ids=["int16", "int32"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_pallas_conv_matches_reference(case, index_dtype):
  kernel_size, cin, cout, k, n_active, strides, padding, bias, batch, hw = CASES[case]
  rng = np.random.default_rng(len(case) * 31 + k)
  layer = make_conv(
      rng,
      kernel_size,
      cin,
      cout,
      k,
      n_active,
      strides=strides,
      padding=padding,
      bias=bias,
      index_dtype=index_dtype,
  )
  assert layer.taps.dtype == index_dtype
  x = jnp.asarray(rng.standard_normal((batch, *hw, cin)), jnp.float32)
  want = condensed_conv_reference(x, layer)
  got = condensed_conv_pallas(x, layer, block_sizes=SMALL, interpret=INTERPRET)
  assert got.shape == want.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_pallas_conv_default_blocks_bf16_and_bias_map():
  rng = np.random.default_rng(7)
  layer = make_conv(rng, (3, 3), 4, 6, 9, 5, strides=(2, 2), padding="SAME", input_hw=(7, 9))
  x = jnp.asarray(rng.standard_normal((3, 7, 9, 4)), jnp.float32)
  geo = layer.geometry
  bias_map = jnp.asarray(rng.standard_normal((geo.oh, geo.ow, 6)), jnp.float32)
  layer = layer.replace(bias_map=bias_map)
  want = condensed_conv_reference(x, layer)
  # Default block sizes: the column block is capped to the small grid.
  got = condensed_conv_pallas(x, layer, interpret=INTERPRET)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  # bf16 input and values: float32 accumulation, bf16 output.
  layer16 = layer.replace(
      values=layer.values.astype(jnp.bfloat16),
      bias=layer.bias.astype(jnp.bfloat16),
      bias_map=layer.bias_map.astype(jnp.bfloat16),
  )
  x16 = x.astype(jnp.bfloat16)
  got16 = condensed_conv_pallas(x16, layer16, block_sizes=SMALL, interpret=INTERPRET)
  assert got16.dtype == jnp.bfloat16
  want16 = condensed_conv_reference(
      x16.astype(jnp.float32), layer16.replace(values=layer16.values.astype(jnp.float32))
  )
  np.testing.assert_allclose(got16.astype(jnp.float32), want16, rtol=3e-2, atol=6e-2)


def test_pallas_conv_empty_and_errors():
  rng = np.random.default_rng(3)
  layer = make_conv(rng, (3, 3), 2, 4, 3, 0)  # every channel ablated
  x = jnp.asarray(rng.standard_normal((2, 5, 5, 2)), jnp.float32)
  got = condensed_conv_pallas(x, layer, interpret=INTERPRET)
  np.testing.assert_allclose(got, condensed_conv_reference(x, layer), atol=1e-6)
  layer = make_conv(rng, (3, 3), 2, 4, 3, 4)
  with pytest.raises(ValueError, match="power of two"):
    condensed_conv_pallas(x, layer, block_sizes=ConvBlockSizes(block_cols=24), interpret=INTERPRET)
  with pytest.raises(ValueError, match="input has 1 channels but the layer expects 2"):
    C.condensed_conv(x[..., :1], layer, impl="pallas")
  # Gather addresses are int32: a 2**31-element plane buffer is refused
  # (checked on shapes only, nothing is allocated).
  big = make_conv(rng, (1, 1), 256, 8, 4, 8)
  with pytest.raises(ValueError, match="int32"):
    jax.eval_shape(
        lambda x: condensed_conv_pallas(x, big, interpret=INTERPRET),
        jax.ShapeDtypeStruct((2048, 64, 64, 256), jnp.bfloat16),
    )
