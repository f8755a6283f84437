"""The condensed conv format, its reference and its XLA kernel, on awkward shapes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srigl_jax import condensed as C
from srigl_jax.condensed import dispatch
from srigl_jax.condensed.conv_layer import plane_layout, tap_sources, to_planes


def conv_mask(rng, kh, kw, cin, cout, k, n_active):
  fan = kh * kw * cin
  mask = np.zeros((fan, cout), bool)
  for j in rng.choice(cout, n_active, replace=False):
    mask[rng.choice(fan, k, replace=False), j] = True
  return mask.reshape(kh, kw, cin, cout)


# (kh, kw, cin, cout, k, n_active, strides, padding, (h, w), batch)
CASES = [
    (1, 1, 6, 5, 3, 4, (1, 1), "VALID", (5, 5), 1),  # 1x1
    (1, 1, 6, 5, 2, 5, (2, 2), "VALID", (7, 6), 3),  # strided 1x1 (projection)
    (3, 3, 8, 6, 10, 4, (2, 2), ((1, 1), (1, 1)), (9, 10), 1),  # 3x3 stride 2
    (3, 3, 5, 7, 4, 7, (1, 1), "SAME", (9, 7), 3),  # odd sizes, compact
    (7, 7, 3, 8, 20, 6, (2, 2), ((3, 3), (3, 3)), (15, 13), 2),  # the stem
    (3, 3, 4, 4, 1, 4, (2, 1), "SAME", (8, 9), 5),  # k = 1, mixed strides
    (5, 5, 3, 4, 7, 1, (1, 1), "VALID", (11, 11), 1),  # one active channel
    (2, 3, 3, 4, 5, 3, (1, 2), ((0, 2), (1, 0)), (6, 7), 2),  # asymmetric padding
]


@pytest.mark.parametrize("case", CASES)
def test_reference_and_xla_equal_flax_conv(case):
  kh, kw, cin, cout, k, n_active, strides, padding, hw, batch = case
  rng = np.random.default_rng(sum(hw) + k)
  mask = conv_mask(rng, kh, kw, cin, cout, k, n_active)
  kernel = (rng.standard_normal(mask.shape) * mask).astype(np.float32)
  bias = rng.standard_normal(cout).astype(np.float32)
  layer = C.condense_conv(kernel, mask, bias, strides=strides, padding=padding)
  assert layer.values.shape == (n_active, k) and layer.taps.dtype == np.int16
  np.testing.assert_array_equal(layer.to_dense(), kernel)
  x = jnp.asarray(rng.standard_normal((batch, *hw, cin)), jnp.float32)
  want = nn.Conv(cout, (kh, kw), strides, padding=padding).apply(
      {"params": {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}}, x
  )
  np.testing.assert_allclose(C.condensed_conv_reference(x, layer), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(C.condensed_conv_xla(x, layer), want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(C.condensed_conv(x, layer, impl="auto"), want, rtol=1e-5, atol=1e-5)
  # What impl='auto' runs on a GPU (the densified kernel under cuDNN).
  np.testing.assert_allclose(dispatch._conv_densified(x, layer), want, rtol=1e-5, atol=1e-5)
  # A small tile forces several neuron blocks and grid chunks through the scans.
  np.testing.assert_allclose(
      C.condensed_conv_xla(x, layer, tile_elements=64), want, rtol=1e-5, atol=1e-5
  )


def test_every_tap_is_one_contiguous_run_of_the_planes():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 7, 8, 3)), jnp.float32)
  lo = plane_layout(x.shape, (3, 3), (2, 2), "SAME")
  flat = np.asarray(to_planes(x, lo)).reshape(-1)
  (pt, _), (pl, _) = lo.pads
  xp = np.pad(np.asarray(x), ((0, 0), (pt, 3), (pl, 3), (0, 0)))
  taps = jnp.arange(3 * 3 * 3, dtype=jnp.int16).reshape(1, -1)
  src = np.asarray(tap_sources(taps, lo))[0]
  for t, s in enumerate(src):
    dy, dx, c = t // 9, (t // 3) % 3, t % 3
    for b, oy, ox in [(0, 0, 0), (1, lo.oh - 1, lo.ow - 1), (1, 1, 2)]:
      q = b * lo.hq * lo.wq + oy * lo.wq + ox
      assert flat[s + q] == xp[b, oy * 2 + dy, ox * 2 + dx, c]


def test_xla_kernel_is_differentiable_and_takes_bf16():
  rng = np.random.default_rng(4)
  mask = conv_mask(rng, 3, 3, 4, 5, 6, 4)
  kernel = (rng.standard_normal(mask.shape) * mask).astype(np.float32)
  layer = C.condense_conv(kernel, mask, None, strides=(1, 1), padding="SAME")
  x = jnp.asarray(rng.standard_normal((2, 6, 6, 4)), jnp.float32)
  f = lambda x, v: C.condensed_conv_xla(x, layer.replace(values=v)).sum()
  g = lambda x, v: C.condensed_conv_reference(x, layer.replace(values=v)).sum()
  for a, b in zip(jax.grad(f, (0, 1))(x, layer.values), jax.grad(g, (0, 1))(x, layer.values)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  y = C.condensed_conv_xla(
      x.astype(jnp.bfloat16), layer.replace(values=layer.values.astype(jnp.bfloat16))
  )
  assert y.dtype == jnp.bfloat16
  np.testing.assert_allclose(
      np.asarray(y, np.float32), C.condensed_conv_reference(x, layer), rtol=5e-2, atol=5e-2
  )


def test_condense_conv_errors():
  rng = np.random.default_rng(5)
  mask = conv_mask(rng, 3, 3, 2, 4, 3, 4)
  mask[0, 0, 0, :] = True  # some channels now have 4 taps, some 3
  kernel = np.ones(mask.shape, np.float32)
  if len({int(c) for c in mask.reshape(-1, 4).sum(0)}) > 1:
    with pytest.raises(ValueError, match="'c' is not constant fan-in"):
      C.condense_conv(kernel, mask, name="c")
  with pytest.raises(ValueError, match="kernel of shape"):
    C.condense_conv(kernel[0], mask[0])
  with pytest.raises(ValueError, match="not supported"):
    C.condense_conv(kernel, mask.astype(bool) | True, padding="CIRCULAR")
  layer = C.condense_conv(kernel, np.ones(mask.shape, bool))
  with pytest.raises(ValueError, match="input has 3 channels"):
    C.condensed_conv_xla(jnp.ones((1, 5, 5, 3)), layer)
  mapped = layer.replace(bias_map=jnp.zeros((5, 5, 4)), input_hw=(5, 5))
  with pytest.raises(ValueError, match="built for 5x5 inputs, but got 6x6"):
    C.condensed_conv_xla(jnp.ones((1, 6, 6, 2)), mapped)
