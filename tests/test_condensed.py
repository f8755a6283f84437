"""Tests of condensed inference: format, kernels, checkpointing, conversion."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import srigl_jax.condensed as C

# scripts/gpu_check.sh runs these tests on a GPU: there the Pallas kernel is
# compiled for real, and the native kernel (an XLA:CPU custom call) is skipped.
ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
NATIVE = C.native_available() and jax.default_backend() == "cpu"


def constant_fan_in_mask(rng, fan_in, out, k, n_active):
  """Random (fan_in, out) mask: n_active columns with k inputs each."""
  mask = np.zeros((fan_in, out), bool)
  for j in rng.choice(out, n_active, replace=False):
    mask[rng.choice(fan_in, k, replace=False), j] = True
  return mask


def make_layer(rng, fan_in, out, k, n_active, bias=True):
  mask = constant_fan_in_mask(rng, fan_in, out, k, n_active)
  kernel = rng.standard_normal((fan_in, out)).astype(np.float32)
  b = rng.standard_normal(out).astype(np.float32) if bias else None
  return kernel, mask, b


def masked_dense(x, kernel, mask, bias):
  y = np.asarray(x, np.float64) @ np.where(mask, kernel, 0).astype(np.float64)
  return y + (0 if bias is None else bias)


# (in, out, k, n_active, batch): fan-in 1, one active neuron, everything
# ablated, int32 indices (in > 32767), odd batches crossing tile edges, a
# batch-1 layer with a long fan-in, and a long fan-in at batch 70.
SHAPES = [
    (37, 11, 5, 7, 1),
    (37, 11, 1, 11, 3),
    (64, 9, 64, 1, 17),
    (50, 6, 3, 0, 2),
    (40_000, 5, 3, 4, 33),
    (300, 70, 29, 61, 65),
    (2000, 300, 300, 277, 1),
    # Fan-in >= 128 at batch > 32: the AVX-512 kernel takes neurons in pairs
    # (an odd count leaves one), over a full and a partial 64-wide tile.
    (500, 37, 150, 33, 70),
]


def native_isas():
  if not NATIVE:
    return []
  return [isa for isa in ("generic", "avx2", "avx512") if isa in C.native_isas()]


@pytest.mark.parametrize("shape", SHAPES)
def test_kernels_match_reference(shape):
  fan_in, out, k, n_active, batch = shape
  rng = np.random.default_rng(hash(shape) % 2**32)
  kernel, mask, bias = make_layer(rng, fan_in, out, k, n_active)
  layer = C.condense_dense(kernel, mask, bias)
  assert layer.indices.dtype == (jnp.int16 if fan_in <= 32768 else jnp.int32)
  x = jnp.asarray(rng.standard_normal((batch, fan_in)), jnp.float32)
  want = masked_dense(x, kernel, mask, bias)
  np.testing.assert_allclose(C.condensed_matmul_reference(x, layer), want, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(C.condensed_matmul_xla(x, layer), want, rtol=1e-5, atol=1e-4)
  got = C.condensed_matmul_pallas(x, layer, block_sizes=C.BlockSizes(16, 16), interpret=INTERPRET)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  for isa in native_isas():
    got = C.condensed_matmul_native(x, layer, isa=isa)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=isa)
  for threads in (1, 2):
    if NATIVE:
      got = C.condensed_matmul_native(x, layer, max_threads=threads)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not NATIVE, reason="native kernel not built, or not on CPU")
@pytest.mark.parametrize(
    "shape",
    [
        # Fan-ins around the 16- and 32-wide gather steps and their tails,
        # int16 and int32 indices.
        (100, 40, 16, 39, 1),
        (100, 40, 17, 40, 1),
        (100, 40, 31, 23, 1),
        (100, 40, 33, 40, 1),
        (40_000, 9, 47, 8, 1),
        # About 1.1M multiply-adds at batch 1: split over the pool's threads.
        (1100, 1050, 1001, 1031, 1),
    ],
)
def test_native_batch1_matches_reference(shape):
  fan_in, out, k, n_active, batch = shape
  rng = np.random.default_rng(fan_in * out + k)
  kernel, mask, bias = make_layer(rng, fan_in, out, k, n_active)
  layer = C.condense_dense(kernel, mask, bias)
  x = jnp.asarray(rng.standard_normal((batch, fan_in)), jnp.float32)
  want = masked_dense(x, kernel, mask, bias)
  for isa in native_isas():
    got = C.condensed_matmul_native(x, layer, isa=isa)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=isa)
  for threads in (1, 2):
    got = C.condensed_matmul_native(x, layer, max_threads=threads)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=f"{threads} threads")


@pytest.mark.skipif(not NATIVE, reason="native kernel not built, or not on CPU")
def test_native_large_batches_and_no_bias():
  rng = np.random.default_rng(1)
  kernel, mask, _ = make_layer(rng, 200, 40, 17, 33)
  layer = C.condense_dense(kernel, mask, None)
  for batch in (16, 31, 64, 129):
    x = jnp.asarray(rng.standard_normal((batch, 200)), jnp.float32)
    np.testing.assert_allclose(
        C.condensed_matmul_native(x, layer),
        masked_dense(x, kernel, mask, None),
        rtol=1e-5,
        atol=1e-4,
    )


@pytest.mark.skipif(not NATIVE, reason="native kernel not built, or not on CPU")
@pytest.mark.parametrize("batch", [1, 5, 40])
def test_native_bf16_weights_accumulate_in_fp32(batch):
  """bf16-stored weights: every variant equals fp32 math on those weights."""
  rng = np.random.default_rng(9)
  # Fan-in 150 so that batch 40 also takes the paired-neuron AVX-512 path.
  kernel, mask, bias = make_layer(rng, 300, 70, 150, 61)
  layer = C.condense_dense(kernel, mask, bias)
  lb = layer.replace(values=layer.values.astype(jnp.bfloat16))
  x = jnp.asarray(rng.standard_normal((batch, 300)), jnp.float32)
  # Same weights widened to fp32: the only difference left is summation order.
  want = C.condensed_matmul_reference(x, lb.replace(values=lb.values.astype(jnp.float32)))
  for isa in native_isas():
    got = C.condensed_matmul_native(x, lb, isa=isa)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=isa)
  got = C.condensed_matmul_native(x.astype(jnp.bfloat16), lb)
  assert got.dtype == jnp.bfloat16


def test_dispatch_auto_and_leading_dims():
  rng = np.random.default_rng(2)
  kernel, mask, bias = make_layer(rng, 48, 24, 6, 20)
  layer = C.condense_dense(kernel, mask, bias)
  x = jnp.asarray(rng.standard_normal((2, 3, 48)), jnp.float32)
  want = masked_dense(x.reshape(6, 48), kernel, mask, bias).reshape(2, 3, 24)
  assert C.resolve_impl("auto", "cpu") == ("native" if C.native_available() else "xla")
  assert C.resolve_impl("auto", "gpu") == "pallas"
  for impl in ("auto", "xla", "reference"):
    np.testing.assert_allclose(
        jax.jit(lambda x, l, impl=impl: C.condensed_matmul(x, l, impl))(x, layer),
        want,
        rtol=1e-5,
        atol=1e-4,
    )
  with pytest.raises(ValueError, match="impl must be one of"):
    C.condensed_matmul(x, layer, "fast")


def test_xla_is_differentiable_and_bf16():
  rng = np.random.default_rng(3)
  kernel, mask, bias = make_layer(rng, 30, 8, 4, 6)
  layer = C.condense_dense(kernel, mask, bias)
  x = jnp.asarray(rng.standard_normal((4, 30)), jnp.float32)
  g = jax.grad(lambda v: C.condensed_matmul_xla(x, layer.replace(values=v)).sum())(layer.values)
  g_ref = jax.grad(lambda v: C.condensed_matmul_reference(x, layer.replace(values=v)).sum())(
      layer.values
  )
  np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)
  lb = layer.replace(values=layer.values.astype(jnp.bfloat16))
  got = C.condensed_matmul_pallas(x.astype(jnp.bfloat16), lb, interpret=INTERPRET)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(
      got.astype(np.float32), C.condensed_matmul_reference(x, layer), rtol=5e-2, atol=5e-2
  )


def test_condense_structure_and_compiles_once():
  rng = np.random.default_rng(4)
  kernel, mask, bias = make_layer(rng, 20, 10, 3, 7)
  kernel[mask] = 0.0  # exact-zero weights must still be kept: structure comes from the mask
  layer = C.condense_dense(kernel, mask, bias)
  assert layer.values.shape == (7, 3) and layer.n_active == 7 and layer.fan_in == 3
  np.testing.assert_array_equal(layer.neuron_ids, np.nonzero(mask.any(0))[0])
  for j, col in enumerate(np.asarray(layer.neuron_ids)):
    np.testing.assert_array_equal(np.asarray(layer.indices[j]), np.nonzero(mask[:, col])[0])
  np.testing.assert_array_equal(layer.to_dense() != 0, np.zeros_like(mask))
  f = jax.jit(C.condensed_matmul_xla)
  x = jnp.ones((2, 20))
  f(x, layer)
  # Counted as a difference: wrappers of one function share a cache, which
  # other tests (the benchmark's) may already have filled.
  compiled = f._cache_size()
  f(x + 1, layer)
  assert f._cache_size() == compiled


def test_condense_tree_and_errors():
  rng = np.random.default_rng(5)
  k_dense, m_dense, b_dense = make_layer(rng, 12, 6, 4, 5)
  params = {
      "Dense_0": {"kernel": k_dense, "bias": b_dense},
      "LayerNorm_0": {"scale": np.ones(6, np.float32)},
  }
  masks = {"Dense_0": {"kernel": m_dense, "bias": None}, "LayerNorm_0": {"scale": None}}
  out = C.condense(params, masks)
  assert isinstance(out["Dense_0"], C.CondensedLayer)
  np.testing.assert_array_equal(out["Dense_0"].to_dense(), np.where(m_dense, k_dense, 0))
  np.testing.assert_array_equal(out["LayerNorm_0"]["scale"], np.ones(6))
  # A constant fan-in Dense layer is condensed whatever on_unsupported says.
  assert isinstance(
      C.condense(params, masks, on_unsupported="structured")["Dense_0"], C.CondensedLayer
  )
  with pytest.raises(ValueError, match="on_unsupported must be one of"):
    C.condense(params, masks, on_unsupported="mask")
  with pytest.raises(ValueError, match="rank 3"):
    C.condense_dense(np.ones((2, 2, 2)), np.ones((2, 2, 2), bool))


def test_condense_ragged_dense_is_refused_unless_structured():
  rng = np.random.default_rng(5)
  kernel, mask, bias = make_layer(rng, 12, 6, 4, 5)
  col = np.nonzero(mask.any(0))[0][0]
  mask[np.nonzero(~mask[:, col])[0][0], col] = True  # one neuron with 5 inputs
  params, masks = {"Dense_0": {"kernel": kernel, "bias": bias}}, {"Dense_0": {"kernel": mask}}
  with pytest.raises(
      ValueError, match=r"'Dense_0' is not constant fan-in.*SRigL.*on_unsupported='structured'"
  ):
    C.condense(params, masks)
  kept = C.condense(params, masks, on_unsupported="structured")["Dense_0"]
  assert isinstance(kept, C.StructuredLayer)
  np.testing.assert_array_equal(kept.neuron_ids, np.nonzero(mask.any(0))[0])
  np.testing.assert_array_equal(kept.kernel, np.where(mask, kernel, 0)[:, mask.any(0)])


def test_condense_refuses_conv_kernels_or_keeps_them_structured():
  """condense() does not know a conv's strides or padding: it never condenses one."""
  rng = np.random.default_rng(5)
  conv = rng.standard_normal((3, 3, 2, 4)).astype(np.float32)
  conv_mask = np.zeros(conv.shape, bool)
  conv_mask[..., 1] = True
  conv_mask[0, 0, 0, 3] = True
  params = {"Conv_0": {"kernel": conv, "bias": np.zeros(4, np.float32)}}
  masks = {"Conv_0": {"kernel": conv_mask, "bias": None}}
  with pytest.raises(
      ValueError,
      match=r"'Conv_0' is a Conv kernel.*convert_model\(.*condense_conv\(kernel, mask, bias, "
      r"strides=\.\.\., padding=\.\.\.\).*on_unsupported='structured'",
  ):
    C.condense(params, masks)
  out = C.condense(params, masks, on_unsupported="structured")
  assert isinstance(out["Conv_0"], C.StructuredLayer)
  np.testing.assert_array_equal(out["Conv_0"].neuron_ids, [1, 3])
  assert out["Conv_0"].kernel.shape == (3, 3, 2, 2) and out["Conv_0"].out_features == 4
  # Other ranks (a 3-D attention kernel) likewise.
  attn = {"query": {"kernel": np.ones((8, 2, 4), np.float32)}}
  attn_mask = {"query": {"kernel": np.ones((8, 2, 4), bool)}}
  with pytest.raises(ValueError, match=r"'query' has a sparse kernel of rank 3.*condense_dense"):
    C.condense(attn, attn_mask)
  kept = C.condense(attn, attn_mask, on_unsupported="structured")["query"]
  assert isinstance(kept, C.StructuredLayer) and kept.kernel.shape == (8, 2, 4)


def test_matmul_input_is_checked_once_at_the_boundary():
  rng = np.random.default_rng(7)
  layer = C.condense_dense(*make_layer(rng, 10, 4, 3, 4))
  x = jnp.ones((2, 10))
  real = C.CondensedLayer.for_input
  with mock.patch.object(C.CondensedLayer, "for_input", autospec=True, side_effect=real) as check:
    C.condensed_matmul(x, layer, "xla")
  check.assert_called_once_with(layer, (2, 10), "condensed_matmul")  # not again in the kernel
  with pytest.raises(
      ValueError, match=r"^condensed_matmul: input of shape \(2, 9\) has 9 features"
  ):
    C.condensed_matmul(x[:, :9], layer, "reference")
  with pytest.raises(ValueError, match=r"^layer 'fc': input"):
    C.condensed_matmul(x[:, :9], layer, "xla", name="layer 'fc'")


def test_block_sizes_must_be_powers_of_two():
  with pytest.raises(ValueError, match="BlockSizes: block_batch=24 must be a power of two"):
    C.BlockSizes(block_batch=24)
  with pytest.raises(ValueError, match="ConvBlockSizes: block_neurons=0 must be a power of two"):
    C.ConvBlockSizes(block_neurons=0)
  assert C.BlockSizes(16, 32).block_batch == 32


def test_condense_checkpoint_roundtrip(tmp_path):
  rng = np.random.default_rng(6)
  k0, m0, b0 = make_layer(rng, 40_000, 3, 2, 2)
  k1, m1, _ = make_layer(rng, 16, 8, 5, 6)
  tree = C.condense(
      {"a": {"kernel": k0, "bias": b0}, "b": {"kernel": k1}},
      {"a": {"kernel": m0, "bias": None}, "b": {"kernel": m1}},
  )
  path = tmp_path / "condensed"
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, tree)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(path, jax.eval_shape(lambda: tree))
  assert restored["a"].indices.dtype == jnp.int32 and restored["b"].indices.dtype == jnp.int16
  assert restored["b"].bias is None and restored["a"].out_features == 3
  x = jnp.asarray(rng.standard_normal((3, 16)), jnp.float32)
  np.testing.assert_array_equal(
      C.condensed_matmul_xla(x, restored["b"]), C.condensed_matmul_xla(x, tree["b"])
  )
