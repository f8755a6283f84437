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
