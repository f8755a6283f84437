"""Grouped condensed layers (group-shared fan-in): format, kernels, bad input.

Every kernel (xla, native, pallas in the interpreter) is compared with the
plain-jnp reference, and the reference with the masked dense layer, on
awkward shapes: G = 1, 2, 8, 16 (and G not a power of two), k = 1, one active
group, every group ablated, odd batches, int16/int32 indices, bf16 values;
convolutions 1x1, 3x3 stride 2, asymmetric padding, odd sizes.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import srigl_jax.condensed as C

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
NATIVE = C.native_available() and jax.default_backend() == "cpu"


def _rng(*key):
  # A fixed seed per case (hash() of a str is salted per process).
  return np.random.default_rng(zlib.crc32(repr(key).encode()))


def grouped_mask(rng, fan_in, out, group_size, k, n_active_groups):
  """(fan_in, out) mask: n_active_groups groups of G columns sharing k inputs each."""
  n_groups = out // group_size
  gmask = np.zeros((fan_in, n_groups), bool)
  for g in rng.choice(n_groups, n_active_groups, replace=False):
    gmask[rng.choice(fan_in, k, replace=False), g] = True
  return np.repeat(gmask, group_size, axis=1)


def grouped_dense(rng, fan_in, out, group_size, k, n_active_groups, bias=True, **kw):
  mask = grouped_mask(rng, fan_in, out, group_size, k, n_active_groups)
  kernel = (rng.standard_normal((fan_in, out)) / np.sqrt(max(k, 1))).astype(np.float32)
  b = rng.standard_normal(out).astype(np.float32) if bias else None
  layer = C.condense_grouped_dense(kernel, mask, b, group_size=group_size, **kw)
  return layer, kernel, mask, b


def masked_dense(x, kernel, mask, bias):
  y = np.asarray(x, np.float64) @ np.where(mask, kernel, 0).astype(np.float64)
  return y + (0 if bias is None else bias)


def native_isas():
  if not NATIVE:
    return []
  return ["auto"] + [i for i in ("generic", "avx2", "avx512") if i in C.native_isas()]


# ----------------------------------------------------------------- format


def test_format_layout_and_to_dense():
  rng = _rng("layout")
  layer, kernel, mask, b = grouped_dense(rng, 20, 12, 4, 5, 2)
  assert layer.values.shape == (2, 5, 4) and layer.indices.shape == (2, 5)
  assert layer.indices.dtype == jnp.int16 and layer.group_ids.dtype == jnp.int32
  assert layer.n_groups == 2 and layer.n_active == 8 and layer.fan_in == 5
  ids = np.asarray(layer.group_ids)
  assert (np.diff(ids) > 0).all()
  np.testing.assert_array_equal(layer.neuron_ids, (ids[:, None] * 4 + np.arange(4)).reshape(-1))
  for gi, g in enumerate(ids):
    rows = np.nonzero(mask[:, g * 4])[0]
    np.testing.assert_array_equal(layer.indices[gi], rows)  # increasing input order
    np.testing.assert_array_equal(layer.values[gi], kernel[rows][:, g * 4 : g * 4 + 4])
  np.testing.assert_array_equal(layer.to_dense(), np.where(mask, kernel, 0))


def test_int32_indices_when_the_input_is_wide():
  layer, *_ = grouped_dense(_rng("wide"), 40_000, 8, 2, 3, 2)
  assert layer.indices.dtype == jnp.int32


def test_structure_comes_from_the_mask():
  # A trained weight that is exactly zero is still stored.
  rng = _rng("zero")
  mask = grouped_mask(rng, 10, 4, 2, 3, 2)
  kernel = np.where(mask, 1.0, 0.0).astype(np.float32)
  kernel[np.nonzero(mask[:, 0])[0][0], 0] = 0.0
  layer = C.condense_grouped_dense(kernel, mask, group_size=2)
  assert layer.values.shape == (2, 3, 2)


def test_refuses_masks_not_grouped_naming_the_layer():
  rng = _rng("bad")
  mask = grouped_mask(rng, 10, 8, 4, 3, 2)
  mask[np.nonzero(~mask[:, 5])[0][0], 5] = True  # neuron 5 (group 1) differs
  with pytest.raises(ValueError, match=r"'blocks/fc'.*neurons 4\.\.7 \(group 1\)"):
    C.condense_grouped_dense(np.ones((10, 8), np.float32), mask, group_size=4, name="blocks/fc")
  with pytest.raises(ValueError, match="'fc'.*not a multiple of group_size=3"):
    C.condense_grouped_dense(np.ones((10, 8), np.float32), mask, group_size=3, name="fc")
  with pytest.raises(ValueError, match="constant fan-in"):
    m = grouped_mask(rng, 10, 8, 4, 3, 2)
    m[:, :4] = False
    m[:2, :4] = True
    m[:3, 4:] = True
    m[3:, 4:] = False
    C.condense_grouped_dense(np.ones((10, 8), np.float32), m, group_size=4)
  with pytest.raises(ValueError, match="group_size must be an integer"):
    C.condense_grouped_dense(np.ones((10, 8), np.float32), mask, group_size=0)


def test_ragged_groups_are_padded_with_zero_weights():
  mask = np.zeros((6, 4), bool)
  mask[[1, 4], :2] = True
  mask[[0, 2, 5], 2:] = True
  kernel = np.arange(24, dtype=np.float32).reshape(6, 4) + 1
  layer = C.condense_grouped_dense(kernel, mask, group_size=2, allow_ragged=True)
  np.testing.assert_array_equal(layer.indices, [[1, 4, 0], [0, 2, 5]])
  np.testing.assert_array_equal(layer.values[0, 2], [0, 0])
  np.testing.assert_array_equal(layer.to_dense(), np.where(mask, kernel, 0))


def test_conv_format():
  rng = _rng("conv format")
  g = 4
  mask = np.repeat(rng.random((3, 3, 5, 3)) < 0.3, g, axis=3)
  mask[..., 4:8] = False  # group 1 ablated
  kernel = rng.standard_normal(mask.shape).astype(np.float32)
  layer = C.condense_grouped_conv(
      kernel, mask, None, group_size=g, strides=(2, 2), padding="SAME", allow_ragged=True
  )
  np.testing.assert_array_equal(layer.group_ids, [0, 2])
  assert layer.taps.shape == layer.values.shape[:2] and layer.values.shape[2] == g
  np.testing.assert_array_equal(layer.to_dense(), np.where(mask, kernel, 0))
  np.testing.assert_array_equal(layer.as_dense_layer().to_dense(), layer.to_dense().reshape(45, 12))
  with pytest.raises(ValueError, match="'c1'.*not grouped by group_size=6"):
    C.condense_grouped_conv(kernel, mask, group_size=6, name="c1")


# ------------------------------------------------------------ Dense kernels

# (in, out, G, k, active groups, batch)
DENSE_CASES = [
    (37, 12, 1, 5, 9, 1),  # G = 1
    (37, 12, 2, 1, 5, 3),  # k = 1
    (64, 16, 8, 64, 1, 5),  # one active group, full fan-in
    (300, 64, 16, 29, 3, 17),
    (300, 96, 8, 30, 11, 1),
    (50, 10, 2, 3, 0, 2),  # every group ablated
    (40_000, 6, 3, 3, 2, 5),  # int32 indices, G = 3
    (129, 48, 16, 40, 3, 70),  # batch over tiles with a partial one
    (200, 40, 5, 17, 7, 33),  # G = 5
    (2000, 768, 16, 200, 43, 1),  # large enough to split over threads
    (500, 96, 8, 150, 11, 256),
]


def dense_kernels():
  """name -> f(x, layer) for every grouped Dense kernel that runs here."""
  kernels = {
      "xla": C.grouped_matmul_xla,
      "dispatch": lambda x, l: C.condensed_matmul(x, l, impl="xla"),
  }
  return kernels


@pytest.mark.parametrize("case", DENSE_CASES, ids=[str(c) for c in DENSE_CASES])
def test_dense_kernels_match_reference(case):
  fan_in, out, g, k, n_active, batch = case
  rng = _rng("dense", case)
  layer, kernel, mask, b = grouped_dense(rng, fan_in, out, g, k, n_active)
  x = jnp.asarray(rng.standard_normal((batch, fan_in)), jnp.float32)
  want = C.condensed_matmul_reference(x, layer)
  np.testing.assert_allclose(want, masked_dense(x, kernel, mask, b), rtol=1e-5, atol=1e-4)
  for name, fn in dense_kernels().items():
    got = fn(x, layer)
    assert got.shape == (batch, out) and got.dtype == jnp.float32, name
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("index_dtype", [jnp.int16, jnp.int32], ids=["int16", "int32"])
def test_dense_bf16_values_and_index_dtypes(index_dtype):
  rng = _rng("bf16", str(index_dtype))
  layer, *_ = grouped_dense(rng, 130, 32, 8, 21, 3, index_dtype=index_dtype)
  assert layer.indices.dtype == index_dtype
  lb = layer.replace(values=layer.values.astype(jnp.bfloat16))
  x = jnp.asarray(rng.standard_normal((5, 130)), jnp.float32)
  # bf16-stored values, accumulated in float32: fp32 math on the same values.
  want = C.condensed_matmul_reference(x, lb.replace(values=lb.values.astype(jnp.float32)))
  for name, fn in dense_kernels().items():
    np.testing.assert_allclose(fn(x, lb), want, rtol=1e-5, atol=1e-4, err_msg=name)
  xb = x.astype(jnp.bfloat16)
  assert C.condensed_matmul(xb, lb, "xla").dtype == jnp.bfloat16


def test_xla_kernels_are_differentiable():
  rng = _rng("grad")
  layer, *_ = grouped_dense(rng, 40, 16, 4, 6, 3)
  x = jnp.asarray(rng.standard_normal((3, 40)), jnp.float32)
  loss = lambda x, v, f: jnp.sum(f(x, layer.replace(values=v)) ** 2)
  got = jax.grad(loss, argnums=(0, 1))(x, layer.values, C.grouped_matmul_xla)
  want = jax.grad(loss, argnums=(0, 1))(x, layer.values, C.condensed_matmul_reference)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_dispatch_checks_the_input_and_the_type():
  layer, *_ = grouped_dense(_rng("dispatch"), 20, 8, 4, 3, 2)
  with pytest.raises(ValueError, match="'fc1'.*expects 20"):
    C.condensed_matmul(jnp.ones((2, 21)), layer, name="layer 'fc1'")
  with pytest.raises(TypeError, match="GroupedCondensedLayer"):
    C.condensed_matmul(jnp.ones((2, 20)), {"values": layer.values})
  conv = C.condense_grouped_conv(
      np.ones((3, 3, 2, 4), np.float32), np.ones((3, 3, 2, 4), bool), group_size=2
  )
  with pytest.raises(TypeError, match="GroupedCondensedConv"):
    C.condensed_matmul(jnp.ones((2, 20)), conv)


# ------------------------------------------------------------- conv kernels

# (x shape, (kh, kw), cout, G, k, active groups, strides, padding, taps dtype)
CONV_CASES = [
    ((1, 9, 11, 5), (1, 1), 8, 2, 3, 3, (1, 1), "VALID", None),  # pointwise
    ((3, 9, 7, 6), (1, 1), 16, 8, 2, 2, (2, 2), "SAME", None),  # strided 1x1
    ((1, 15, 13, 8), (3, 3), 32, 16, 20, 2, (2, 2), "SAME", None),  # 3x3 stride 2
    ((3, 17, 19, 3), (7, 7), 16, 4, 15, 3, (2, 2), ((3, 3), (3, 3)), None),  # stem
    ((5, 8, 9, 4), (3, 3), 6, 2, 1, 3, (1, 1), "SAME", None),  # k = 1
    ((1, 7, 7, 16), (3, 3), 24, 8, 30, 1, (1, 1), "SAME", None),  # one active group
    ((2, 6, 7, 5), (3, 2), 12, 3, 7, 2, (1, 2), "VALID", jnp.int32),
    ((1, 10, 9, 3), (3, 3), 10, 5, 6, 2, (2, 1), ((0, 2), (1, 0)), jnp.int32),  # asymmetric
    ((3, 5, 5, 2), (5, 5), 4, 1, 11, 3, (1, 1), ((2, 1), (0, 3)), None),  # G = 1
    ((1, 4, 4, 2), (3, 3), 8, 4, 4, 0, (1, 1), "SAME", None),  # all ablated
    ((2, 13, 11, 16), (3, 3), 48, 16, 40, 2, (1, 1), "SAME", None),  # groups over windows
]


def grouped_conv(rng, kh, kw, cin, cout, g, k, n_active, index_dtype=None, **kw_args):
  fan = kh * kw * cin
  mask = grouped_mask(rng, fan, cout, g, k, n_active).reshape(kh, kw, cin, cout)
  kernel = (rng.standard_normal(mask.shape) / np.sqrt(max(k, 1))).astype(np.float32)
  bias = rng.standard_normal(cout).astype(np.float32)
  return C.condense_grouped_conv(
      kernel, mask, bias, group_size=g, index_dtype=index_dtype, **kw_args
  ), (kernel, mask, bias)


def conv_kernels():
  """name -> f(x, layer) for every grouped conv kernel that runs here."""
  return {
      "xla": C.grouped_conv_xla,
      "dispatch": lambda x, l: C.condensed_conv(x, l, impl="xla"),
  }


def lax_conv(x, kernel, mask, bias, strides, padding):
  y = jax.lax.conv_general_dilated(
      jnp.asarray(x, jnp.float32),
      jnp.asarray(np.where(mask, kernel, 0)),
      strides,
      padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST,
  )
  return y + bias


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
def test_conv_kernels_match_reference(case):
  x_shape, ks, cout, g, k, n_active, strides, padding, index_dtype = case
  rng = _rng("conv", case)
  layer, (kernel, mask, bias) = grouped_conv(
      rng, *ks, x_shape[-1], cout, g, k, n_active, index_dtype, strides=strides, padding=padding
  )
  assert layer.taps.dtype == (index_dtype or jnp.int16)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  want = C.condensed_conv_reference(x, layer)
  np.testing.assert_allclose(
      want, lax_conv(x, kernel, mask, bias, strides, padding), rtol=1e-5, atol=1e-4
  )
  for name, fn in conv_kernels().items():
    got = fn(x, layer)
    assert got.shape == want.shape and got.dtype == jnp.float32, name
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=name)


def test_conv_bf16_values():
  rng = _rng("conv bf16")
  layer, _ = grouped_conv(rng, 3, 3, 6, 16, 8, 12, 2, strides=(2, 1), padding="SAME")
  lb = layer.replace(values=layer.values.astype(jnp.bfloat16))
  x = jnp.asarray(rng.standard_normal((2, 9, 8, 6)), jnp.float32)
  want = C.condensed_conv_reference(x, lb.replace(values=lb.values.astype(jnp.float32)))
  for name, fn in conv_kernels().items():
    np.testing.assert_allclose(fn(x, lb), want, rtol=1e-5, atol=1e-4, err_msg=name)
