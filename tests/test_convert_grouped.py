"""Whole-model conversion of models trained with group-shared fan-in (group_size=G).

Grouped-trained models (masks from the sparse optimizer's own init with
group_size, whole groups ablated, a few real mask updates for the MLP)
convert exactly; the detection picks each layer's G; an int group_size is
enforced; group_size=1 and ungrouped models keep today's format.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import srigl_jax
from srigl_jax import condensed as C
from srigl_jax.models import get_model

NATIVE = C.native_available() and jax.default_backend() == "cpu"
IMPLS = ["xla"] + (["native"] if NATIVE else [])

# name: (kwargs, input shape with batch 3, distribution, G)
MODELS = {
    "mlp": (dict(hidden_sizes=(32, 16)), (3, 6, 6, 1), "erk", 8),
    "cnn": (dict(features=(8, 16), hidden_size=16), (3, 9, 9, 1), "erk", 4),
    "resnet18": (dict(width=8, stage_sizes=(1, 1)), (3, 9, 9, 3), "erk", 4),
    "vit_tiny_test": (dict(num_layers=1), (3, 8, 8, 3), "uniform", 8),
}


def grouped_tx(dist, group_size, sparsity=0.7, seed=1):
  return srigl_jax.srigl(
      optax.sgd(0.1),
      sparsity=sparsity,
      distribution=dist,
      update_every=1,
      stop_step=100,
      group_size=group_size,
      key=jax.random.key(seed),
  )


def trained_like(name, group_size=None, ablate=0.3, seed=0):
  """A model with grouped SRigL masks (whole groups ablated) and non-trivial BN stats."""
  kwargs, shape, dist, g = MODELS[name]
  g = g if group_size is None else group_size
  model = get_model(name, 10, **kwargs)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  variables = model.init(jax.random.key(seed), x)
  state = grouped_tx(dist, g).init(variables["params"])
  masks = srigl_jax.get_masks(state)
  trained_g = {p: int(s["group_size"]) for p, s in srigl_jax.layer_stats(state).items()}

  def ablate_groups(path, m):
    if m is None or "head" in jax.tree_util.keystr(path):
      return m
    m = np.asarray(m).copy()
    lg = trained_g[_path(path)]
    flat = m.reshape(-1, m.shape[-1])
    n_groups = flat.shape[1] // lg
    for grp in rng.choice(n_groups, max(1, int(n_groups * ablate)), replace=False):
      flat[:, grp * lg : (grp + 1) * lg] = False
    return flat.reshape(m.shape)

  masks = jax.tree_util.tree_map_with_path(ablate_groups, masks, is_leaf=lambda m: m is None)

  def perturb(path, a):
    leaf = jax.tree_util.keystr(path)
    if "batch_stats" in leaf and "var" in leaf:
      return jnp.asarray(rng.uniform(0.5, 2.0, a.shape), a.dtype)
    if any(k in leaf for k in ("'bias'", "'scale'", "'mean'")):
      return jnp.asarray(rng.normal(0.2, 0.5, a.shape), a.dtype)
    return a

  variables = jax.tree_util.tree_map_with_path(perturb, dict(variables))
  return model, variables, masks, x, trained_g


def _path(key_path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in key_path)


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


def run(converted, x, impl):
  fn = jax.jit(lambda v, x: C.ConvertedModel(converted.model, v, converted.plan).apply(x, impl))
  return fn(converted.variables, x)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_grouped_models_convert_exactly_with_detected_groups(name):
  model, variables, masks, x, trained_g = trained_like(name)
  converted = C.convert_model(model, variables, masks, x, impl="xla")
  layers = converted.plan["layers"]
  grouped = 0
  for path, entry in layers.items():
    want_g = trained_g[path + "/kernel"]
    assert entry["format"] == "condensed"
    mask = np.asarray(_get(masks, path + "/kernel"))
    flat = mask.reshape(-1, mask.shape[-1])
    if flat.all(axis=0).all():
      # An ERK-dense layer: every neuron uses every input, one group of all.
      assert entry["group_size"] == flat.shape[1], path
    else:
      assert entry["group_size"] == want_g, path
    p = _get(converted.variables["params"], path)
    if entry["group_size"] > 1:
      grouped += 1
      assert set(p) >= {"values", "group_ids", "bias"} and "neuron_ids" not in p
      assert p["values"].ndim == 3 and p["values"].shape[2] == entry["group_size"]
    else:
      assert p["values"].ndim == 2 and "neuron_ids" in p
  assert grouped >= 2
  # Whole groups were ablated: fewer active neurons than neurons.
  assert any(e["active_neurons"] < e["neurons"] for e in layers.values())
  for batch in (1, 3):
    want = masked_logits(model, variables, masks, x[:batch])
    for impl in IMPLS:
      assert_close(run(converted, x[:batch], impl), want)


def _get(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def test_folding_and_batchnorm_keep_groups_whole():
  model, variables, masks, x, _ = trained_like("resnet18", ablate=0.5)
  converted = C.convert_model(model, variables, masks, x, impl="xla")
  layers = converted.plan["layers"]
  assert converted.plan["folded_batchnorms"]
  folded = [p for p, e in layers.items() if e["folded_inputs"] and e["group_size"] > 1]
  assert folded, "a grouped layer reading an ablated producer folds its inputs"
  assert_close(run(converted, x, "xla"), masked_logits(model, variables, masks, x))


def test_int_group_size_is_enforced_and_one_keeps_todays_format():
  model, variables, masks, x, trained_g = trained_like("cnn")
  by_int = C.convert_model(model, variables, masks, x, impl="xla", group_size=4)
  for path, entry in by_int.plan["layers"].items():
    # The head's width (10) is not a multiple of 4: it trained ungrouped.
    assert entry["group_size"] == (1 if path == "head" else 4)
    assert trained_g[path + "/kernel"] == entry["group_size"]
  with pytest.raises(ValueError, match="layer 'conv_0'.*not grouped by group_size=8"):
    C.convert_model(model, variables, masks, x, group_size=8)
  ungrouped = C.convert_model(model, variables, masks, x, impl="xla", group_size=1)
  assert {e["group_size"] for e in ungrouped.plan["layers"].values()} == {1}
  want = masked_logits(model, variables, masks, x)
  assert_close(run(by_int, x, "xla"), want)
  assert_close(run(ungrouped, x, "xla"), want)
  with pytest.raises(ValueError, match="group_size must be an integer"):
    C.convert_model(model, variables, masks, x, group_size=0)


def test_ungrouped_models_keep_todays_format_bit_identical():
  model, variables, masks, x, _ = trained_like("cnn", group_size=1)
  detected = C.convert_model(model, variables, masks, x, impl="xla")
  ones = C.convert_model(model, variables, masks, x, impl="xla", group_size=1)
  assert {e["group_size"] for e in detected.plan["layers"].values()} <= {1, 6, 8, 16}
  for path, entry in detected.plan["layers"].items():
    mask = np.asarray(_get(masks, path + "/kernel"))
    if not mask.all():
      assert entry["group_size"] == 1, path
      a, b = _get(detected.variables["params"], path), _get(ones.variables["params"], path)
      assert jax.tree.structure(a) == jax.tree.structure(b)
      for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert u.dtype == v.dtype
        np.testing.assert_array_equal(u, v)


def test_a_few_real_mask_updates_then_convert():
  """MLP trained for a few SRigL steps with group_size=8 (masks really updated)."""
  model = get_model("mlp", 10, hidden_sizes=(32, 16))
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((16, 6, 6, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 16))
  params = model.init(jax.random.key(0), x)["params"]
  tx = srigl_jax.srigl(
      optax.sgd(0.5),
      sparsity=0.8,
      distribution="erk",
      update_every=2,
      stop_step=12,
      drop_fraction=0.5,
      gamma_sal=0.5,
      group_size=8,
      key=jax.random.key(1),
  )
  state = tx.init(params)
  first = srigl_jax.get_masks(state)

  @jax.jit
  def step(params, state):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, x), y
    ).mean()
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(12):
    params, state = step(params, state)
  masks = srigl_jax.get_masks(state)
  changed = any(
      not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(masks))
  )
  assert changed, "the masks were never updated"
  converted = C.convert_model(model, {"params": params}, masks, x[:2], impl="xla")
  gs = {p: e["group_size"] for p, e in converted.plan["layers"].items()}
  assert gs["dense_0"] == gs["dense_1"] == 8 and gs["head"] == 1
  want = masked_logits(model, {"params": params}, masks, x)
  for impl in IMPLS:
    assert_close(run(converted, x, impl), want)


def test_a_grouped_dense_general_out_projection():
  # Attention's out projection reads two axes (heads, head_dim) per neuron.
  model, variables, masks, x, _ = trained_like("vit_tiny_test")
  converted = C.convert_model(model, variables, masks, x, impl="xla")
  entry = converted.plan["layers"]["encoderblock_0/attention/out"]
  assert entry["group_size"] == 8 and entry["in_shape"] == [2, 16]
  assert isinstance(model, nn.Module)


def test_grouped_converted_model_is_validated():
  """`ConvertedModel.validate` (convert_model's and the loader's check) on grouped layers."""
  model, variables, masks, x, _ = trained_like("cnn")
  converted = C.convert_model(model, variables, masks, x, impl="xla")
  assert converted.validate() is converted
  layers = converted.plan["layers"]
  grouped = {p: e for p, e in layers.items() if e.get("group_size", 1) > 1}
  conv_path = next(p for p, e in grouped.items() if e["kind"] == "conv")
  dense_path = next(p for p, e in grouped.items() if e["kind"] == "dense")

  def with_param(path, key, edit):
    params = jax.tree.map(np.array, converted.variables["params"])
    node = _get(params, path)
    node[key] = edit(np.array(node[key]))
    return C.ConvertedModel(model, {**converted.variables, "params": params}, converted.plan)

  def set_at(a, pos, v):
    a[pos] = v
    return a

  fan = layers[conv_path]["dense_fan_in"]
  bad = with_param(conv_path, "taps", lambda t: set_at(t, (0, 1), fan))
  with pytest.raises(ValueError, match=rf"layer '{conv_path}': taps\[0, 1\] = {fan} is outside"):
    bad.validate()
  n_groups = layers[dense_path]["neurons"] // layers[dense_path]["group_size"]
  bad = with_param(dense_path, "group_ids", lambda i: set_at(i, 0, n_groups))
  with pytest.raises(
      ValueError, match=rf"layer '{dense_path}': group_ids\[0\] = {n_groups} is outside"
  ):
    bad.validate()
  bad = with_param(dense_path, "values", lambda v: v[:, :, :-1])
  with pytest.raises(ValueError, match=rf"layer '{dense_path}': values must be \(n_groups, k, "):
    bad.validate()
  # A grouped layer's arrays without its group ids (neuron ids instead).
  params = jax.tree.map(np.array, converted.variables["params"])
  node = _get(params, dense_path)
  node["neuron_ids"] = node.pop("group_ids")
  bad = C.ConvertedModel(model, {**converted.variables, "params": params}, converted.plan)
  with pytest.raises(ValueError, match=rf"layer '{dense_path}': .*need .*'group_ids'"):
    bad.validate()
