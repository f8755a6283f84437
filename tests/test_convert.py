"""Whole-model conversion: every model family converts exactly, and bad input is refused."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import srigl_jax
from srigl_jax import condensed as C
from srigl_jax.models import get_model

NATIVE = C.native_available() and jax.default_backend() == "cpu"
IMPLS = ["xla"] + (["native"] if NATIVE else [])

# name: (kwargs shrinking the model, input shape with batch 3, distribution)
TINY = {
    "mlp": (dict(hidden_sizes=(24, 16)), (3, 6, 6, 1), "erk"),
    "cnn": (dict(features=(6, 8), hidden_size=16), (3, 9, 9, 1), "erk"),
    "resnet18": (dict(width=4, stage_sizes=(1, 1)), (3, 9, 9, 3), "erk"),
    "resnet50": (dict(width=4, stage_sizes=(1, 1)), (3, 17, 17, 3), "erk"),
    "wrn22": (dict(depth=10, widen_factor=2, base_width=4), (3, 8, 8, 3), "erk"),
    "vit_tiny_test": (dict(num_layers=1), (3, 8, 8, 3), "uniform"),
    "mobilenet_v3_small": (
        dict(
            width_multiplier=0.5,
            dropout_rate=0.0,
            block_specs=((3, 16, 16, True, "relu", 2), (5, 48, 16, False, "hswish", 1)),
        ),
        (3, 16, 16, 3),
        "erk",
    ),
}


def trained_like(name, sparsity=0.7, ablate=0.3, seed=0):
  """A model with SRigL masks, some neurons ablated, and non-trivial BN stats."""
  kwargs, shape, dist = TINY[name]
  model = get_model(name, 10, **kwargs)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  variables = model.init(jax.random.key(seed), x)
  tx = srigl_jax.srigl(
      optax.sgd(0.1),
      sparsity=sparsity,
      distribution=dist,
      update_every=10,
      stop_step=100,
      dense_layers=(".*depthwise.*",),
      key=jax.random.key(seed + 1),
  )
  masks = srigl_jax.get_masks(tx.init(variables["params"]))

  def ablate_some(path, m):
    if m is None or "head" in jax.tree_util.keystr(path):
      return m
    m = np.asarray(m).copy()
    n = m.shape[-1]
    m[..., rng.choice(n, max(1, int(n * ablate)), replace=False)] = False
    return m

  masks = jax.tree_util.tree_map_with_path(ablate_some, masks, is_leaf=lambda m: m is None)

  def perturb(path, a):
    leaf = jax.tree_util.keystr(path)
    if "batch_stats" in leaf and "var" in leaf:
      return jnp.asarray(rng.uniform(0.5, 2.0, a.shape), a.dtype)
    if any(k in leaf for k in ("'bias'", "'scale'", "'mean'")):
      return jnp.asarray(rng.normal(0.2, 0.5, a.shape), a.dtype)
    return a

  variables = jax.tree_util.tree_map_with_path(perturb, dict(variables))
  return model, variables, masks, x


def masked_logits(model, variables, masks, x):
  params = jax.tree.map(
      lambda p, m: p if m is None else p * m,
      variables["params"],
      masks,
      is_leaf=lambda m: m is None,
  )
  return model.apply({**variables, "params": params}, x)


def assert_close(got, want):
  scale = max(1.0, float(jnp.abs(want).max()))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_family_converts_exactly(name):
  model, variables, masks, x = trained_like(name)
  converted = C.convert_model(model, variables, masks, x, impl="xla")
  layers = converted.plan["layers"]
  assert {e["format"] for e in layers.values()} == {"condensed"}
  kinds = {e["kind"] for e in layers.values()}
  # (ERK keeps some small layers dense, e.g. WRN's head: they are not listed.)
  assert kinds == {"dense"} if name == "mlp" else "conv" in kinds
  # Ablated neurons are not computed: fewer active neurons than neurons.
  assert any(e["active_neurons"] < e["neurons"] for e in layers.values())
  if name in ("mlp", "cnn", "resnet18", "resnet50", "wrn22"):
    assert sum(e["folded_inputs"] for e in layers.values()) > 0, "nothing folded"
  if name in ("resnet18", "resnet50", "wrn22", "mobilenet_v3_small"):
    assert converted.plan["folded_batchnorms"], "no BatchNorm folded"
  for batch in (1, 3):
    want = masked_logits(model, variables, masks, x[:batch])
    for impl in IMPLS:
      got = jax.jit(
          lambda v, x, impl=impl: converted.__class__(model, v, converted.plan).apply(x, impl)
      )(converted.variables, x[:batch])
      assert got.shape == want.shape
      assert_close(got, want)


def test_resnet_folds_through_padding_with_a_bias_map():
  model, variables, masks, x = trained_like("resnet18", ablate=0.5)
  converted = C.convert_model(model, variables, masks, x, impl="xla")
  maps = [p for p, e in converted.plan["layers"].items() if e["bias_map"]]
  assert maps, "a 3x3 conv after an ablated producer needs a per-position bias"
  # The map is exact only for the converted size: another size is refused.
  with pytest.raises(ValueError, match="per-position bias built for"):
    converted.apply(jnp.zeros((1, 12, 12, 3)), impl="xla")


def test_structured_format_and_fold_none_are_exact_too():
  model, variables, masks, x = trained_like("resnet18")
  want = masked_logits(model, variables, masks, x)
  for kw in (dict(format="structured"), dict(fold="none", fold_batchnorm=False)):
    converted = C.convert_model(model, variables, masks, x, impl="xla", **kw)
    assert_close(converted.apply(x, impl="xla"), want)
  converted = C.convert_model(model, variables, masks, x, fold="none", fold_batchnorm=False)
  assert not converted.plan["folded_batchnorms"]
  assert all(e["folded_inputs"] == 0 for e in converted.plan["layers"].values())


@pytest.mark.parametrize("ablate", [0.0, 0.4])
def test_structured_places_kept_neurons_exactly_and_checks_their_ids(ablate):
  # With no neuron ablated the kept outputs are the full width, in place.
  model, variables, masks, x = trained_like("mlp", ablate=ablate)
  converted = C.convert_model(model, variables, masks, x, format="structured", impl="xla")
  assert jax.jit(converted.apply)(x[:0]).shape == (0, 10)
  for batch in (1, 3):
    got = jax.jit(converted.apply)(x[:batch])
    assert_close(got, masked_logits(model, variables, masks, x[:batch]))
  layer = next(p for p, e in converted.plan["layers"].items() if e["format"] == "structured")
  params = jax.tree.map(lambda a: a, converted.variables)
  ids = np.asarray(params["params"][layer]["neuron_ids"]).copy()
  ids[[0, 1]] = ids[[1, 0]]
  params["params"][layer]["neuron_ids"] = ids
  broken = C.ConvertedModel(model=model, variables=params, plan=converted.plan)
  with pytest.raises(ValueError, match=rf"layer '{layer}': neuron_ids must be strictly increasing"):
    broken.validate()


def test_converted_model_survives_orbax_and_json(tmp_path):
  model, variables, masks, x = trained_like("cnn")
  converted = C.convert_model(model, variables, masks, x, impl="xla")
  path = tmp_path / "ckpt"
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, converted.variables)
  with ocp.StandardCheckpointer() as ckptr:
    restored = ckptr.restore(path)
  plan = json.loads(json.dumps(converted.plan))
  again = C.ConvertedModel(model=model, variables=restored, plan=plan)
  np.testing.assert_array_equal(again.apply(x, impl="xla"), converted.apply(x, impl="xla"))


def test_ragged_conv_mask_is_refused_unless_structured():
  model, variables, masks, x = trained_like("cnn")
  m = np.asarray(masks["conv_1"]["kernel"]).copy()
  col = np.nonzero(m.reshape(-1, m.shape[-1]).any(0))[0][0]
  flat = m.reshape(-1, m.shape[-1])
  flat[np.nonzero(~flat[:, col])[0][0], col] = True  # one extra tap
  masks["conv_1"]["kernel"] = flat.reshape(m.shape)
  with pytest.raises(
      ValueError, match="'conv_1' is not constant fan-in.*on_unsupported='structured'"
  ):
    C.convert_model(model, variables, masks, x, fold="none")
  converted = C.convert_model(model, variables, masks, x, fold="none", on_unsupported="structured")
  assert converted.plan["layers"]["conv_1"]["format"] == "structured"
  assert_close(converted.apply(x, impl="xla"), masked_logits(model, variables, masks, x))
  with pytest.raises(ValueError, match="on_unsupported must be one of"):
    C.convert_model(model, variables, masks, x, on_unsupported="mask")


class DilatedConv(nn.Module):
  """A sparse dilated convolution: no condensed kernel, but a structured form."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(6, (3, 3), kernel_dilation=2, padding="SAME", name="dilated")(x)
    return nn.Dense(3, name="head")(nn.relu(x).reshape(x.shape[0], -1))


def test_dilated_conv_is_refused_unless_structured():
  model = DilatedConv()
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 7, 7, 3)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  mask = np.zeros((27, 6), bool)
  for j in (0, 2, 3, 5):  # channels 1 and 4 ablated, 5 taps each
    mask[np.random.default_rng(j).choice(27, 5, replace=False), j] = True
  masks = {
      "dilated": {"kernel": mask.reshape(3, 3, 3, 6), "bias": None},
      "head": {"kernel": None, "bias": None},
  }
  with pytest.raises(
      ValueError, match="'dilated' is a dilated convolution.*on_unsupported='structured'"
  ):
    C.convert_model(model, variables, masks, x)
  for kw in (dict(on_unsupported="structured"), dict(format="structured")):
    converted = C.convert_model(model, variables, masks, x, **kw)
    entry = converted.plan["layers"]["dilated"]
    assert (entry["format"], entry["active_neurons"], entry["fan_in"]) == ("structured", 4, 5)
    assert_close(converted.apply(x, impl="xla"), masked_logits(model, variables, masks, x))


def test_converted_layers_have_the_one_condensed_format():
  """Converted params are the fields of CondensedLayer / CondensedConv, as condense_* gives.

  Saved artefacts (orbax variables + the JSON plan) depend on these names.
  """
  model, variables, masks, x = trained_like("cnn")
  converted = C.convert_model(model, variables, masks, x, fold="none", fold_batchnorm=False)
  params = converted.variables["params"]
  for path, entry in converted.plan["layers"].items():
    assert {"kind", "format", "neurons", "active_neurons", "dense_fan_in", "fan_in"} <= set(entry)
    mask = np.asarray(masks[path]["kernel"])
    kernel = np.asarray(variables["params"][path]["kernel"]) * mask
    bias = np.asarray(variables["params"][path]["bias"])
    if entry["kind"] == "conv":
      want = C.condense_conv(kernel, mask, bias)
      fields = {"values": want.values, "taps": want.taps}
    else:
      want = C.condense_dense(kernel, mask, bias)
      fields = {"values": want.values, "indices": want.indices}
    fields.update(neuron_ids=want.neuron_ids, bias=want.bias)
    assert set(params[path]) == set(fields), path
    for name, value in fields.items():
      np.testing.assert_array_equal(params[path][name], value, err_msg=f"{path}/{name}")
  assert {e["kind"] for e in converted.plan["layers"].values()} == {"conv", "dense"}


def test_sparse_depthwise_conv_is_refused():
  model, variables, masks, x = trained_like("mobilenet_v3_small")
  kernel = variables["params"]["block0"]["depthwise_conv"]["kernel"]
  masks["block0"]["depthwise_conv"]["kernel"] = np.ones(kernel.shape, bool)
  with pytest.raises(ValueError, match="'block0/depthwise_conv' is a grouped or depthwise"):
    C.convert_model(model, variables, masks, x)


class SharedKernel(nn.Module):
  """Applies one Dense layer twice: no single consumer to condense."""

  @nn.compact
  def __call__(self, x):
    dense = nn.Dense(8, name="shared")
    return nn.Dense(3, name="head")(dense(nn.relu(dense(x.reshape(x.shape[0], -1)[:, :8]))))


def test_structure_the_converter_cannot_follow_is_refused():
  model = SharedKernel()
  x = jnp.ones((2, 8))
  variables = model.init(jax.random.key(0), x)
  masks = jax.tree.map(
      lambda p: np.ones(p.shape, bool) if p.ndim == 2 else None, variables["params"]
  )
  with pytest.raises(ValueError, match="'shared' has a sparse kernel that is not consumed"):
    C.convert_model(model, variables, masks, x)


LONG = __import__("os").environ.get("SRIGL_LONG_TESTS") == "1"
# Full-size families at their paper input sizes; the slow ones run with
# SRIGL_LONG_TESTS=1 (the whole-model benchmark also checks each of them).
FULL = {
    "mlp": True,
    "cnn": True,
    "resnet18": LONG,
    "wrn22": LONG,
    "resnet50": LONG,
    "vit_ti16": LONG,
    "vit_s16": LONG,
    "vit_b16": LONG,
    "mobilenet_v3_large": LONG,
    "mobilenet_v3_small": LONG,
}


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_size_model_converts_exactly(name):
  if not FULL[name]:
    pytest.skip("full-size conversion of this family runs with SRIGL_LONG_TESTS=1")
  from srigl_jax.benchmarks.model import synthetic_model  # pylint: disable=g-import-not-at-top

  model, variables, masks, shape = synthetic_model(name, 0.9, 0.1)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, *shape)), jnp.float32)
  converted = C.convert_model(model, variables, masks, x)  # self-checks on a probe
  assert {e["format"] for e in converted.plan["layers"].values()} == {"condensed"}
  assert_close(jax.jit(converted.apply)(x), masked_logits(model, variables, masks, x))
