"""Tests of condensed inference: format, kernels, checkpointing, conversion."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import srigl_jax.condensed as C


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
# ablated, int32 indices (in > 32767), odd batches crossing tile edges, and a
# batch-1 layer big enough that the native kernel splits it over threads.
SHAPES = [
    (37, 11, 5, 7, 1),
    (37, 11, 1, 11, 3),
    (64, 9, 64, 1, 17),
    (50, 6, 3, 0, 2),
    (40_000, 5, 3, 4, 33),
    (300, 70, 29, 61, 65),
    (2000, 300, 300, 277, 1),
]


def native_isas():
  if not C.native_available():
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
  got = C.condensed_matmul_pallas(x, layer, block_sizes=C.BlockSizes(16, 16), interpret=True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
  for isa in native_isas():
    got = C.condensed_matmul_native(x, layer, isa=isa)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=isa)
  for threads in (1, 2):
    if C.native_available():
      got = C.condensed_matmul_native(x, layer, max_threads=threads)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not C.native_available(), reason="native kernel not built")
def test_native_large_batches_and_no_bias():
  rng = np.random.default_rng(1)
  kernel, mask, _ = make_layer(rng, 200, 40, 17, 33)
  layer = C.condense_dense(kernel, mask, None)
  for batch in (16, 31, 64, 129):
    x = jnp.asarray(rng.standard_normal((batch, 200)), jnp.float32)
    np.testing.assert_allclose(
        C.condensed_matmul_native(x, layer), masked_dense(x, kernel, mask, None),
        rtol=1e-5, atol=1e-4)


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
        want, rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match="impl must be one of"):
    C.condensed_matmul(x, layer, "fast")


def test_xla_is_differentiable_and_bf16():
  rng = np.random.default_rng(3)
  kernel, mask, bias = make_layer(rng, 30, 8, 4, 6)
  layer = C.condense_dense(kernel, mask, bias)
  x = jnp.asarray(rng.standard_normal((4, 30)), jnp.float32)
  g = jax.grad(lambda v: C.condensed_matmul_xla(x, layer.replace(values=v)).sum())(layer.values)
  g_ref = jax.grad(lambda v: C.condensed_matmul_reference(x, layer.replace(values=v)).sum())(layer.values)
  np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)
  lb = layer.replace(values=layer.values.astype(jnp.bfloat16))
  got = C.condensed_matmul_pallas(x.astype(jnp.bfloat16), lb, interpret=True)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(np.float32), C.condensed_matmul_reference(x, layer),
                             rtol=5e-2, atol=5e-2)


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


def test_condense_tree_conv_and_errors():
  rng = np.random.default_rng(5)
  k_dense, m_dense, b_dense = make_layer(rng, 12, 6, 4, 5)
  conv = rng.standard_normal((3, 3, 2, 4)).astype(np.float32)
  conv_mask = np.zeros(conv.shape, bool)
  conv_mask[..., 1] = True
  conv_mask[0, 0, 0, 3] = True
  params = {
      "Dense_0": {"kernel": k_dense, "bias": b_dense},
      "Conv_0": {"kernel": conv, "bias": np.zeros(4, np.float32)},
      "LayerNorm_0": {"scale": np.ones(6, np.float32)},
  }
  masks = {"Dense_0": {"kernel": m_dense, "bias": None},
           "Conv_0": {"kernel": conv_mask, "bias": None},
           "LayerNorm_0": {"scale": None}}
  out = C.condense(params, masks)
  assert isinstance(out["Dense_0"], C.CondensedLayer)
  assert isinstance(out["Conv_0"], C.StructuredLayer)
  np.testing.assert_array_equal(out["Conv_0"].neuron_ids, [1, 3])
  assert out["Conv_0"].kernel.shape == (3, 3, 2, 2)
  np.testing.assert_array_equal(out["LayerNorm_0"]["scale"], np.ones(6))

  ragged = m_dense.copy()
  col = np.nonzero(ragged.any(0))[0][0]
  ragged[np.nonzero(~ragged[:, col])[0][0], col] = True
  with pytest.raises(ValueError, match=r"'Dense_0' is not constant fan-in.*SRigL"):
    C.condense(params, {**masks, "Dense_0": {"kernel": ragged, "bias": None}})
  attn = {"query": {"kernel": np.ones((8, 2, 4), np.float32)}}
  attn_mask = {"query": {"kernel": np.ones((8, 2, 4), bool)}}
  with pytest.raises(ValueError, match=r"'query' has a sparse kernel of rank 3.*on_unsupported='mask'"):
    C.condense(attn, attn_mask)
  kept = C.condense(attn, attn_mask, on_unsupported="mask")
  assert kept["query"]["kernel"].shape == (8, 2, 4)
  with pytest.raises(ValueError, match="rank 3"):
    C.condense_dense(np.ones((2, 2, 2)), np.ones((2, 2, 2), bool))


def test_condense_checkpoint_roundtrip(tmp_path):
  rng = np.random.default_rng(6)
  k0, m0, b0 = make_layer(rng, 40_000, 3, 2, 2)
  k1, m1, _ = make_layer(rng, 16, 8, 5, 6)
  tree = C.condense(
      {"a": {"kernel": k0, "bias": b0}, "b": {"kernel": k1}},
      {"a": {"kernel": m0, "bias": None}, "b": {"kernel": m1}})
  path = tmp_path / "condensed"
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, tree)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(path, jax.eval_shape(lambda: tree))
  assert restored["a"].indices.dtype == jnp.int32 and restored["b"].indices.dtype == jnp.int16
  assert restored["b"].bias is None and restored["a"].out_features == 3
  x = jnp.asarray(rng.standard_normal((3, 16)), jnp.float32)
  np.testing.assert_array_equal(C.condensed_matmul_xla(x, restored["b"]),
                                C.condensed_matmul_xla(x, tree["b"]))


class MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(40)(x))
    x = nn.relu(nn.Dense(24)(x))
    return nn.Dense(10)(x)


class MlpBlock(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(48)(x))
    return nn.Dense(16)(x)


class TinyViT(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(16)(x)
    for i in range(1):
      y = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=2, name=f"attn_{i}")(y, y)
      x = x + MlpBlock(name=f"MlpBlock_{i}")(nn.LayerNorm()(x))
    return nn.Dense(10)(x.mean(axis=1))


def random_masks(rng, params, ablate=0.3):
  """Constant fan-in masks for every kernel; some neurons ablated."""
  def mask(path, p):
    if p.ndim < 2:
      return None
    fan = int(np.prod(p.shape[:-1]))
    n_active = max(1, int(p.shape[-1] * (1 - ablate)))
    return constant_fan_in_mask(rng, fan, p.shape[-1], max(1, fan // 4), n_active).reshape(p.shape)
  return jax.tree_util.tree_map_with_path(mask, params)


@pytest.mark.parametrize("model_cls,x_shape,act", [(MLP, (5, 20), nn.relu),
                                                   (TinyViT, (2, 7, 12), nn.gelu)])
def test_converted_model_matches_masked_model(model_cls, x_shape, act):
  rng = np.random.default_rng(7)
  model = model_cls()
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  # Non-zero biases so that folding ablated neurons really matters.
  params = jax.tree.map(lambda p: p + 0.3 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
  masks = random_masks(rng, params)
  masked = jax.tree.map(lambda p, m: p if m is None else p * m, params, masks,
                        is_leaf=lambda t: t is None)
  want = model.apply({"params": masked}, x)
  pairs = C.sequential_fold_pairs(params, masks, act)
  assert len(pairs) == (2 if model_cls is MLP else 1)
  inference = C.convert_model(params, masks, fold=pairs)
  # Folded producers lost their ablated neurons: compact, fewer outputs.
  producer, original = inference, params
  for key in pairs[0][0]:
    producer, original = producer[key], original[key]
  assert producer["bias"].shape[0] == producer["values"].shape[0] < original["kernel"].shape[-1]
  impls = ["xla"] + (["native"] if C.native_available() else [])
  for impl in impls:
    got = jax.jit(lambda p, x, impl=impl: C.condensed_apply(model, p, x, impl=impl))(inference, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_convert_rejects_bad_fold():
  rng = np.random.default_rng(8)
  model = MLP()
  params = model.init(jax.random.key(0), jnp.ones((1, 20)))["params"]
  masks = random_masks(rng, params)
  with pytest.raises(ValueError, match="not connected"):
    C.convert_model(params, masks, fold=[("Dense_0", "Dense_2", nn.relu)])
  with pytest.raises(ValueError, match="forward order"):
    C.convert_model(params, masks, fold=[("Dense_1", "Dense_2", nn.relu), ("Dense_0", "Dense_1", nn.relu)])
  with pytest.raises(ValueError, match="inference-only"):
    C.CondensedDense().init(jax.random.key(0), jnp.ones((1, 3)))
