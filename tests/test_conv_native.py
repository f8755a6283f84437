"""Tests of the native CPU condensed convolution against the jnp reference."""

import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from srigl_jax import condensed as C
from srigl_jax.condensed.conv import condense_conv, condensed_conv_reference
from srigl_jax.condensed.conv import native as conv_native

pytestmark = pytest.mark.skipif(
    not C.native_available(), reason=f"native kernels unavailable: {C.native_error()}"
)


def make_conv(rng, kh, kw, cin, cout, k, n_active, bias=True):
  """Random constant fan-in conv: n_active channels with k taps each."""
  fan = kh * kw * cin
  mask = np.zeros((fan, cout), bool)
  for j in rng.choice(cout, n_active, replace=False):
    mask[rng.choice(fan, k, replace=False), j] = True
  kernel = rng.standard_normal((kh, kw, cin, cout)).astype(np.float32) / np.sqrt(k)
  b = rng.standard_normal(cout).astype(np.float32) if bias else None
  return kernel, mask.reshape(kh, kw, cin, cout), b


def isas():
  return [isa for isa in ("generic", "avx2", "avx512") if isa in C.native_isas("conv")]


# (x shape, (kh, kw), cout, k, n_active, strides, padding, bias, taps dtype)
CASES = [
    ((1, 9, 11, 5), (1, 1), 7, 3, 6, (1, 1), "VALID", True, None),  # pointwise
    ((3, 9, 7, 6), (1, 1), 8, 2, 8, (2, 2), "SAME", False, None),  # strided 1x1
    ((1, 6, 5, 4), (1, 1), 5, 2, 5, (1, 1), ((1, 0), (0, 2)), True, None),  # padded 1x1
    ((1, 15, 13, 8), (3, 3), 12, 20, 10, (2, 2), "SAME", True, None),
    ((3, 17, 19, 3), (7, 7), 16, 15, 14, (2, 2), ((3, 3), (3, 3)), True, None),  # stem
    ((5, 8, 9, 4), (3, 3), 6, 1, 6, (1, 1), "SAME", True, None),  # k = 1
    ((1, 7, 7, 16), (3, 3), 9, 30, 1, (1, 1), "SAME", True, None),  # one channel
    ((2, 6, 7, 5), (3, 2), 4, 7, 3, (1, 2), "VALID", False, jnp.int32),
    ((1, 10, 9, 3), (3, 3), 5, 6, 5, (2, 1), ((0, 2), (1, 0)), True, jnp.int32),
    ((3, 5, 5, 2), (5, 5), 3, 11, 2, (1, 1), ((2, 1), (0, 3)), False, None),
    ((1, 4, 4, 2), (3, 3), 3, 4, 0, (1, 1), "SAME", True, None),  # all ablated
]


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_native_conv_matches_reference(case):
  x_shape, ks, cout, k, n_active, strides, padding, bias, dtype = case
  # A fixed seed per case (hash() of a str is salted per process).
  rng = np.random.default_rng(zlib.crc32(str(case).encode()))
  kernel, mask, b = make_conv(rng, *ks, x_shape[-1], cout, k, n_active, bias)
  layer = condense_conv(kernel, mask, b, strides=strides, padding=padding, index_dtype=dtype)
  assert layer.taps.dtype == (dtype or jnp.int16)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  want = np.asarray(condensed_conv_reference(x, layer))
  for isa in ["auto"] + isas():
    got = conv_native.condensed_conv_native(x, layer, isa=isa)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=isa)


@pytest.mark.parametrize("min_pixels", [0, 10**9])
def test_pointwise_through_either_kernel(monkeypatch, min_pixels):
  # 1x1 convolutions go through the Dense kernel above a pixel count and
  # through the conv kernel below it; both must agree with the reference.
  monkeypatch.setattr(conv_native, "_POINTWISE_DENSE_MIN_PIXELS", min_pixels)
  conv_native.condensed_conv_native.clear_cache()
  rng = np.random.default_rng(min_pixels % 7)
  for x_shape, cout, strides in [((3, 9, 7, 6), 8, (2, 2)), ((1, 5, 6, 40), 33, (1, 1))]:
    kernel, mask, b = make_conv(rng, 1, 1, x_shape[-1], cout, 3, cout - 2)
    layer = condense_conv(kernel, mask, b, strides=strides, padding="VALID")
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    np.testing.assert_allclose(
        conv_native.condensed_conv_native(x, layer),
        condensed_conv_reference(x, layer),
        rtol=1e-5,
        atol=1e-5,
    )
  conv_native.condensed_conv_native.clear_cache()


def test_bias_map_and_dtype():
  rng = np.random.default_rng(1)
  kernel, mask, b = make_conv(rng, 3, 3, 4, 6, 9, 5)
  layer = condense_conv(kernel, mask, b, strides=(2, 2), padding="SAME", input_hw=(9, 8))
  x = jnp.asarray(rng.standard_normal((3, 9, 8, 4)), jnp.bfloat16)
  geo = layer.geometry
  bias_map = jnp.asarray(rng.standard_normal((geo.oh, geo.ow, 6)), jnp.float32)
  layer = layer.replace(bias_map=bias_map)
  got = conv_native.condensed_conv_native(x, layer)
  assert got.dtype == jnp.float32  # promoted with the float32 values
  np.testing.assert_allclose(got, condensed_conv_reference(x, layer), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(C.condensed_conv(x, layer, "native"), got)
  with pytest.raises(ValueError, match="per-position bias"):
    C.condensed_conv(x[:, :7], layer, "native")


@pytest.mark.parametrize(
    "x_shape,ks,strides", [((2, 9, 8, 6), 3, (2, 1)), ((2, 9, 8, 6), 1, (2, 2))]
)
def test_bf16_values_accumulate_in_fp32(x_shape, ks, strides, monkeypatch):
  """bf16-stored values, read as bf16, equal fp32 math on them (both paths, every variant)."""
  if ks == 1:  # through the Dense kernel
    monkeypatch.setattr(conv_native, "_POINTWISE_DENSE_MIN_PIXELS", 0)
    conv_native.condensed_conv_native.clear_cache()
  rng = np.random.default_rng(4)
  kernel, mask, b = make_conv(rng, ks, ks, x_shape[-1], 10, 5 * ks, 8)
  layer = condense_conv(kernel, mask, b, strides=strides, padding="SAME")
  lb = layer.replace(values=layer.values.astype(jnp.bfloat16))
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  want = condensed_conv_reference(x, lb.replace(values=lb.values.astype(jnp.float32)))
  for isa in ["auto"] + isas():
    got = conv_native.condensed_conv_native(x, lb, isa=isa)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=isa)
  assert C.condensed_conv(x.astype(jnp.bfloat16), lb, "native").dtype == jnp.bfloat16
  conv_native.condensed_conv_native.clear_cache()


@pytest.mark.parametrize("batch,hw,cin,threads", [(1, 56, 32, 0), (4, 20, 64, 2), (1, 7, 256, 0)])
def test_large_layers_split_over_threads(batch, hw, cin, threads):
  # Large grids split into column blocks, the 7x7 one into channel ranges of
  # shared planes; max_threads=1 runs the same plan on one thread.
  rng = np.random.default_rng(batch * hw)
  cout = 96
  kernel, mask, b = make_conv(rng, 3, 3, cin, cout, 9 * cin // 10, cout - 7)
  layer = condense_conv(kernel, mask, b, padding="SAME")
  x = jnp.asarray(rng.standard_normal((batch, hw, hw, cin)), jnp.float32)
  want = condensed_conv_reference(x, layer)
  for t in (threads, 1):
    got = conv_native.condensed_conv_native(x, layer, max_threads=t)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # The AVX2 build transposes 8x8 tiles instead of 16x16.
  if "avx2" in isas():
    got = conv_native.condensed_conv_native(x, layer, isa="avx2")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_compiles_once():
  rng = np.random.default_rng(2)
  kernel, mask, b = make_conv(rng, 3, 3, 4, 5, 6, 4)
  layer = condense_conv(kernel, mask, b, padding="SAME")
  x = jnp.ones((1, 6, 6, 4), jnp.float32)
  conv_native.condensed_conv_native(x, layer).block_until_ready()
  before = conv_native.condensed_conv_native._cache_size()
  layer2 = layer.replace(values=layer.values * 2)
  conv_native.condensed_conv_native(x + 1, layer2).block_until_ready()
  assert conv_native.condensed_conv_native._cache_size() == before


def test_bad_isa():
  rng = np.random.default_rng(3)
  layer = condense_conv(*make_conv(rng, 3, 3, 2, 2, 3, 2))
  with pytest.raises(ValueError, match="isa"):
    conv_native.condensed_conv_native(jnp.ones((1, 4, 4, 2)), layer, isa="sse")


def test_layer_benchmark_smoke():
  from srigl_jax.benchmarks import conv as bench

  records = bench.run(
      ["c18_32_3x3"],
      [0.9],
      [1],
      ["dense", "condensed_native"],
      repeats=2,
      budget_s=0.0,
      log=lambda s: None,
  )
  (rec,) = records
  assert set(rec["us"]) == {"dense", "condensed_native"}
  want = np.median(rec["round_us"]["dense"]) / np.median(rec["round_us"]["condensed_native"])
  np.testing.assert_allclose(rec["speedup_vs_dense"]["condensed_native"], want, atol=0.005)
  assert "condensed_native" in bench.format_table(records)
