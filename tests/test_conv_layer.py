"""The condensed conv format, its geometry, its reference and its XLA kernel, on awkward shapes."""

from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srigl_jax import condensed as C
from srigl_jax.condensed import dispatch
from srigl_jax.condensed.conv.format import conv_geometry, tap_sources, to_planes


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
def test_reference_and_xla_equal_flax_conv(case, monkeypatch):
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
  # A small tile forces several neuron blocks and grid chunks through the scans.
  np.testing.assert_allclose(
      C.condensed_conv_xla(x, layer, tile_elements=64), want, rtol=1e-5, atol=1e-5
  )
  # A layer condensed for this input size gives the same through every entry.
  sized = C.condense_conv(kernel, mask, bias, strides=strides, padding=padding, input_hw=hw)
  assert sized.geometry == layer.for_input(x.shape).geometry and sized.input_hw == hw
  np.testing.assert_allclose(C.condensed_conv(x, sized, impl="xla"), want, rtol=1e-5, atol=1e-5)
  # What impl='auto' runs on a GPU: the densified kernel at default precision (cuDNN).
  monkeypatch.setattr(dispatch.jax, "default_backend", lambda: "gpu")
  np.testing.assert_allclose(C.condensed_conv(x, layer, impl="auto"), want, rtol=1e-5, atol=1e-5)


def test_every_tap_is_one_contiguous_run_of_the_planes():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 7, 8, 3)), jnp.float32)
  geo = conv_geometry((7, 8), 3, (3, 3), (2, 2), "SAME")
  assert (geo.oh, geo.ow, geo.pads) == (4, 4, ((1, 1), (0, 1)))
  flat = np.asarray(to_planes(x, geo)).reshape(-1)
  assert flat.size == geo.rows * geo.row_len(2)
  (pt, _), (pl, _) = geo.pads
  xp = np.pad(np.asarray(x), ((0, 0), (pt, 3), (pl, 3), (0, 0)))
  taps = jnp.arange(3 * 3 * 3, dtype=jnp.int16).reshape(1, -1)
  src = np.asarray(tap_sources(taps, geo, 2))[0]
  for t, s in enumerate(src):
    dy, dx, c = t // 9, (t // 3) % 3, t % 3
    for b, oy, ox in [(0, 0, 0), (1, geo.oh - 1, geo.ow - 1), (1, 1, 2)]:
      q = b * geo.hq * geo.wq + oy * geo.wq + ox
      assert s + q < flat.size
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
  with pytest.raises(ValueError, match="does not fit the padded 2x2 input"):
    C.condense_conv(kernel, mask.astype(bool) | True, padding="VALID", input_hw=(2, 2))


@pytest.mark.parametrize("impl", ["xla", "reference", "native", "pallas"])
def test_conv_input_is_checked_at_the_boundary(impl, monkeypatch):
  """condensed_conv refuses a bad input with a clear error before any kernel runs."""
  kernel = np.ones((3, 3, 2, 4), np.float32)
  layer = C.condense_conv(kernel, np.ones(kernel.shape, bool))
  monkeypatch.setitem(dispatch._CONV, impl, lambda x, layer: pytest.fail("kernel was called"))
  with pytest.raises(
      ValueError, match=r"^condensed_conv: input has 3 channels but the layer expects 2"
  ):
    C.condensed_conv(jnp.ones((1, 5, 5, 3)), layer, impl)
  with pytest.raises(
      ValueError, match=r"^condensed_conv: expects NHWC input of rank 4, got shape \(5, 5, 2\)"
  ):
    C.condensed_conv(jnp.ones((5, 5, 2)), layer, impl)
  with pytest.raises(ValueError, match="kernel does not fit the padded 2x2 input"):
    C.condensed_conv(jnp.ones((1, 2, 2, 2)), layer.replace(padding="VALID"), impl)
  mapped = C.condense_conv(kernel, np.ones(kernel.shape, bool), input_hw=(5, 5))
  mapped = mapped.replace(bias_map=jnp.zeros((5, 5, 4)))
  with pytest.raises(ValueError, match=r"^layer 'c': .*built for 5x5 inputs, but got 6x6"):
    C.condensed_conv(jnp.ones((1, 6, 6, 2)), mapped, impl, name="layer 'c'")
  with pytest.raises(ValueError, match="built for an unknown size"):
    C.condensed_conv(jnp.ones((1, 5, 5, 2)), layer.replace(bias_map=mapped.bias_map), impl)


def test_geometry_is_computed_once_per_input_size():
  """The boundary sets the layer up for the input size once; kernels only read it."""
  rng = np.random.default_rng(6)
  mask = conv_mask(rng, 3, 3, 4, 5, 6, 4)
  kernel = (rng.standard_normal(mask.shape) * mask).astype(np.float32)
  sized = C.condense_conv(kernel, mask, None, strides=(2, 2), input_hw=(9, 9))
  # Same size: the layer itself (its geometry was computed by condense_conv).
  assert sized.for_input((3, 9, 9, 4)) is sized
  # Another size (no bias map): a copy set up for it, with the cached geometry.
  other = sized.for_input((1, 7, 8, 4))
  assert other.input_hw == (7, 8) and other.geometry is sized.for_input((2, 7, 8, 4)).geometry
  # A layer condensed without a size works for any size.
  free = C.condense_conv(kernel, mask, None, strides=(2, 2))
  assert free.geometry is None
  real = C.CondensedConv.for_input
  with mock.patch.object(C.CondensedConv, "for_input", autospec=True, side_effect=real) as check:
    for hw in ((9, 9), (7, 8)):
      x = jnp.asarray(rng.standard_normal((2, *hw, 4)), jnp.float32)
      np.testing.assert_allclose(
          C.condensed_conv(x, free, "xla"),
          C.condensed_conv_reference(x, free),
          rtol=1e-5,
          atol=1e-5,
      )
  checks = [c.args[1] for c in check.call_args_list]
  assert checks == [(2, 9, 9, 4), (2, 7, 8, 4)]  # once per call, not again in the kernel
