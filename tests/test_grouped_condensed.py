"""Grouped condensed layers (group-shared fan-in): format, kernels, bad input.

Every kernel (xla, native, pallas in the interpreter) is compared with the
plain-jnp reference, and the reference with the masked dense layer, on
awkward shapes: G = 1, 2, 8, 16 (and G not a power of two), k = 1, one active
group, every group ablated, odd batches, int16/int32 indices, bf16 values;
convolutions 1x1, 3x3 stride 2, asymmetric padding, odd sizes.
"""

import json
import os
import re
import subprocess
import sys
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
      "pallas": lambda x, l: C.grouped_matmul_pallas(
          x, l, block_sizes=C.GroupedBlockSizes(2, 16, 16), interpret=INTERPRET
      ),
      "pallas_default": lambda x, l: C.grouped_matmul_pallas(x, l, interpret=INTERPRET),
  }
  for isa in native_isas():
    kernels[f"native_{isa}"] = lambda x, l, isa=isa: C.grouped_matmul_native(x, l, isa=isa)
  if NATIVE:
    # One thread runs the same plan; two split units that one would run.
    kernels["native_1thread"] = lambda x, l: C.grouped_matmul_native(x, l, max_threads=1)
    kernels["native_2threads"] = lambda x, l: C.grouped_matmul_native(x, l, max_threads=2)
    kernels["dispatch_auto"] = C.condensed_matmul
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
  kernels = {
      "xla": C.grouped_conv_xla,
      "dispatch": lambda x, l: C.condensed_conv(x, l, impl="xla"),
      "pallas": lambda x, l: C.grouped_conv_pallas(
          x, l, block_sizes=C.GroupedConvBlockSizes(2, 16, 16), interpret=INTERPRET
      ),
  }
  for isa in native_isas():
    kernels[f"native_{isa}"] = lambda x, l, isa=isa: C.grouped_conv_native(x, l, isa=isa)
  if NATIVE:
    kernels["native_1thread"] = lambda x, l: C.grouped_conv_native(x, l, max_threads=1)
    kernels["dispatch_auto"] = C.condensed_conv
  return kernels


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


needs_native = pytest.mark.skipif(not NATIVE, reason=f"native kernels: {C.native_error()}")


@needs_native
@pytest.mark.parametrize(
    "batch,hw,cin,g,threads", [(1, 56, 32, 16, 0), (4, 20, 64, 8, 2), (1, 7, 256, 16, 0)]
)
def test_native_conv_large_layers_split_over_threads(batch, hw, cin, g, threads):
  # Large grids split into column blocks, the 7x7 one into channel ranges of
  # shared planes; max_threads=1 runs the same plan on one thread.
  rng = _rng("large conv", batch, hw, cin)
  layer, _ = grouped_conv(rng, 3, 3, cin, 96, g, 9 * cin // 10, 96 // g - 1, padding="SAME")
  x = jnp.asarray(rng.standard_normal((batch, hw, hw, cin)), jnp.float32)
  want = C.condensed_conv_reference(x, layer)
  for t in (threads, 1):
    got = C.grouped_conv_native(x, layer, max_threads=t)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  if "avx2" in C.native_isas():
    got = C.grouped_conv_native(x, layer, isa="avx2")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@needs_native
@pytest.mark.parametrize("min_pixels", [0, 10**9])
def test_native_pointwise_through_either_kernel(monkeypatch, min_pixels):
  # 1x1 convolutions go through the grouped Dense kernel above a pixel count
  # and through the grouped conv kernel below it.
  from srigl_jax.condensed.conv import native as conv_native

  monkeypatch.setattr(conv_native, "_POINTWISE_DENSE_MIN_PIXELS", min_pixels)
  conv_native.grouped_conv_native.clear_cache()
  rng = _rng("pointwise", min_pixels)
  for x_shape, cout, g, strides in [((3, 9, 7, 6), 8, 4, (2, 2)), ((1, 5, 6, 40), 48, 16, (1, 1))]:
    layer, _ = grouped_conv(
        rng, 1, 1, x_shape[-1], cout, g, 3, cout // g - 1, strides=strides, padding="VALID"
    )
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    np.testing.assert_allclose(
        conv_native.grouped_conv_native(x, layer),
        C.condensed_conv_reference(x, layer),
        rtol=1e-5,
        atol=1e-5,
    )
  conv_native.grouped_conv_native.clear_cache()


def test_conv_bias_map_and_input_size():
  rng = _rng("bias map")
  layer, _ = grouped_conv(rng, 3, 3, 4, 8, 4, 9, 2, strides=(2, 2), padding="SAME", input_hw=(9, 8))
  geo = layer.geometry
  layer = layer.replace(bias_map=jnp.asarray(rng.standard_normal((geo.oh, geo.ow, 8)), jnp.float32))
  x = jnp.asarray(rng.standard_normal((3, 9, 8, 4)), jnp.float32)
  want = C.condensed_conv_reference(x, layer)
  for name, fn in conv_kernels().items():
    np.testing.assert_allclose(fn(x, layer), want, rtol=1e-5, atol=1e-5, err_msg=name)
  with pytest.raises(ValueError, match="per-position bias"):
    C.condensed_conv(x[:, :7], layer, "xla")


@needs_native
def test_native_compiles_once():
  rng = _rng("once")
  layer, *_ = grouped_dense(rng, 40, 16, 4, 6, 3)
  x = jnp.ones((2, 40), jnp.float32)
  C.grouped_matmul_native(x, layer).block_until_ready()
  before = C.grouped_matmul_native._cache_size()
  C.grouped_matmul_native(x + 1, layer.replace(values=layer.values * 2)).block_until_ready()
  assert C.grouped_matmul_native._cache_size() == before


# --------------------------------------------------------- untrusted arrays

_BAD_ARRAYS = r"""
import json
import jax.numpy as jnp
import numpy as np
import srigl_jax.condensed as C

g, fan_in, out = 4, 30, 16
mask = np.zeros((fan_in, out), bool)
mask[[1, 5, 7], 0:4] = True
mask[[2, 3, 29], 8:12] = True
layer = C.condense_grouped_dense(np.ones((fan_in, out), np.float32), mask, group_size=g)
cmask = np.zeros((18, 8), bool)
cmask[[0, 4, 17], :4] = True
cmask[[2, 3, 9], 4:] = True
conv = C.condense_grouped_conv(
    np.ones((3, 3, 2, 8), np.float32), cmask.reshape(3, 3, 2, 8), group_size=g, padding="SAME")
x = jnp.ones((3, fan_in), jnp.float32)
xc = jnp.ones((1, 5, 5, 2), jnp.float32)
i32 = lambda a: jnp.asarray(a, jnp.int32)
cases = {
    "index too large": lambda: C.grouped_matmul_native(x, layer.replace(indices=layer.indices.at[1, 2].set(30))),
    "negative index": lambda: C.grouped_matmul_native(x, layer.replace(indices=layer.indices.at[0, 0].set(-1))),
    "int32 index too large": lambda: C.grouped_matmul_native(x, layer.replace(indices=i32(layer.indices).at[1, 0].set(2**30))),
    "unsorted group ids": lambda: C.grouped_matmul_native(x, layer.replace(group_ids=i32([2, 0]))),
    "repeated group ids": lambda: C.grouped_matmul_native(x, layer.replace(group_ids=i32([2, 2]))),
    "group id past the output": lambda: C.grouped_matmul_native(x, layer.replace(group_ids=i32([0, 4]))),
    "negative group id": lambda: C.grouped_matmul_native(x, layer.replace(group_ids=i32([-1, 2]))),
    "values of rank 2": lambda: C.grouped_matmul_native(x, layer.replace(values=layer.values[:, :, 0])),
    "indices of another shape": lambda: C.grouped_matmul_native(x, layer.replace(indices=layer.indices[:, :2])),
    "too few group ids": lambda: C.grouped_matmul_native(x, layer.replace(group_ids=layer.group_ids[:1])),
    "group size not dividing the output": lambda: C.grouped_matmul_native(x, layer.replace(values=jnp.ones((2, 3, 3)))),
    "conv tap too large": lambda: C.grouped_conv_native(xc, conv.replace(taps=conv.taps.at[0, 0].set(18))),
    "conv unsorted group ids": lambda: C.grouped_conv_native(xc, conv.replace(group_ids=i32([1, 0]))),
    "conv values of rank 2": lambda: C.grouped_conv_native(xc, conv.replace(values=conv.values[:, :, 0])),
}
for name, case in cases.items():
  try:
    y = case()
    y.block_until_ready()
    print(json.dumps([name, "no error", ""]))
  except Exception as e:  # what reaches the caller, whatever its type
    print(json.dumps([name, type(e).__name__, str(e)]), flush=True)
"""

# case -> what the error must say.
_BAD_ARRAY_ERRORS = {
    "index too large": r"indices\[1, 2\] = 30 is outside the fan-in \[0, 30\)",
    "negative index": r"indices\[0, 0\] = -1 is outside",
    "int32 index too large": r"indices\[1, 0\] = 1073741824 is outside",
    "unsorted group ids": r"group_ids must be sorted, distinct and below 4 .*entry 1 is 0",
    "repeated group ids": r"group_ids must be sorted, distinct.*entry 1 is 2",
    "group id past the output": r"below 4 \(outputs / group size\); entry 1 is 4",
    "negative group id": r"entry 0 is -1",
    "values of rank 2": r"values must be rank 3 \(n_groups, k, g\), got rank 2",
    "indices of another shape": r"indices must have shape \(n_groups, k\) of the values",
    "too few group ids": r"group_ids must have shape \(n_groups,\)",
    "group size not dividing the output": r"group size 3 .* must be >= 1 and divide the 16 outputs",
    "conv tap too large": r"taps\[0, 0\] = 18 is outside the fan-in \[0, 18\)",
    "conv unsorted group ids": r"group_ids must be sorted",
    "conv values of rank 2": r"values must be rank 3",
}


@needs_native
def test_native_kernels_refuse_bad_arrays_cleanly():
  """Crafted arrays reach the C++ handlers (past every Python check) in a subprocess."""
  done = subprocess.run(
      [sys.executable, "-c", _BAD_ARRAYS],
      capture_output=True,
      text=True,
      timeout=300,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert done.returncode == 0, done.stderr[-3000:]  # no crash
  results = {}
  for line in done.stdout.splitlines():
    name, kind, message = json.loads(line)
    results[name] = (kind, message)
  assert set(results) == set(_BAD_ARRAY_ERRORS)
  for name, pattern in _BAD_ARRAY_ERRORS.items():
    kind, message = results[name]
    assert kind != "no error", name
    assert re.search(pattern, message), (name, message)


# ------------------------------------------------------ validate() on the host


def _edit(a, pos, v, dtype=None):
  a = np.array(a, dtype=dtype)
  a[pos] = v
  return a


def test_validate_grouped_layers_names_layer_array_position_and_value():
  layer, *_ = grouped_dense(_rng("validate"), 30, 16, 4, 3, 3)
  assert layer.validate("layer 'd'") is layer
  ids = np.asarray(layer.group_ids)
  cases = [
      (
          layer.replace(indices=_edit(layer.indices, (1, 2), 30)),
          r"indices\[1, 2\] = 30 is outside \[0, 30\)",
      ),
      (layer.replace(indices=_edit(layer.indices, (0, 0), -1)), r"indices\[0, 0\] = -1 is outside"),
      (layer.replace(group_ids=_edit(ids, 2, 4)), r"group_ids\[2\] = 4 is outside \[0, 4\)"),
      (
          layer.replace(group_ids=_edit(ids, 1, ids[0])),
          rf"group_ids must be strictly increasing .*group_ids\[1\] = {ids[0]} follows",
      ),
      (
          layer.replace(values=np.asarray(layer.values)[:, :, :2]),
          r"values must be \(n_groups, k, 4\)",
      ),
      (
          layer.replace(values=np.asarray(layer.values)[:, :, 0]),
          r"values must be \(n_groups, k, 4\)",
      ),
      (layer.replace(indices=np.asarray(layer.indices)[:, :2]), r"indices has shape \(3, 2\)"),
      (layer.replace(group_ids=ids[:2]), r"group_ids must be \(3,\) integers"),
      (layer.replace(indices=np.asarray(layer.indices, np.float32)), r"indices must be integers"),
      (layer.replace(bias=np.zeros(15, np.float32)), r"bias has shape \(15,\)"),
      (layer.replace(out_features=18), r"group_size = 4 must be >= 1 and divide the 18 outputs"),
  ]
  for bad, want in cases:
    with pytest.raises(ValueError, match=r"^layer 'd': " + want):
      bad.validate("layer 'd'")


def test_validate_grouped_conv_checks_taps_ids_and_geometry():
  layer, _ = grouped_conv(_rng("validate conv"), 3, 3, 2, 8, 4, 5, 2, padding="SAME")
  assert layer.validate("layer 'c'") is layer
  cases = [
      (
          layer.replace(taps=_edit(layer.taps, (1, 4), 18)),
          r"taps\[1, 4\] = 18 is outside \[0, 18\)",
      ),
      (
          layer.replace(group_ids=np.asarray([1, 0], np.int32)),
          r"group_ids must be strictly increasing",
      ),
      (
          layer.replace(group_ids=np.asarray([0, 2], np.int32)),
          r"group_ids\[1\] = 2 is outside \[0, 2\)",
      ),
      (layer.replace(strides=(0, 1)), r"kernel size .* must all be at least 1"),
      (
          layer.replace(values=np.asarray(layer.values)[:, :, :1]),
          r"values must be \(n_groups, k, 4\)",
      ),
  ]
  for bad, want in cases:
    with pytest.raises(ValueError, match=r"^layer 'c': " + want):
      bad.validate("layer 'c'")
