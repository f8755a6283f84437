"""Tests of the sparse optimizer: exact masks on tiny layers, invariants on
random ones, moment resets, schedules, sharding and argument errors."""

import math
import os
import subprocess
import sys
import textwrap
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import srigl_jax
from srigl_jax.sparsity import layers as layers_lib
from srigl_jax.sparsity import select
from srigl_jax.sparsity import updates as upd

KEY = jax.random.key(0)
FAR = 10**9  # a stop_step so far away that the drop fraction is ~alpha


def _tx(method="srigl", **kw):
  kw.setdefault("sparsity", 0.5)
  kw.setdefault("key", KEY)
  kw.setdefault("stop_step", FAR)
  kw.setdefault("update_every", 1)
  kw.setdefault("distribution", "uniform")
  inner = kw.pop("inner", optax.sgd(0.0))
  return srigl_jax.sparse_optimizer(inner, method=method, **kw)


def _with_mask(state, path, mask):
  masks = jax.tree.map(lambda m: m, state.masks, is_leaf=lambda x: x is None)
  masks[path]["kernel"] = jnp.asarray(mask)
  return state._replace(masks=masks)


# --------------------------------------------------------------------------
# Layer-wise sparsity


def test_erk_matches_hand_computation():
  # p1 = 10/24, p2 = 30/200. Target = floor(.5*24) + floor(.5*200) = 112.
  # eps = 112 / (10 + 30) = 2.8 -> d1 = 1.167 > 1: layer 1 becomes dense;
  # eps = (112 - 24) / 30 -> d2 = 88 / 200 = 0.44.
  d = layers_lib.erk_densities({"a": (4, 6), "b": (10, 20)}, 0.5)
  assert d["a"] == 1.0
  assert d["b"] == pytest.approx(0.44, abs=1e-12)


def test_erk_total_budget_and_power_scale():
  shapes = {"c1": (3, 3, 3, 16), "c2": (3, 3, 16, 32), "fc": (512, 10)}
  d = layers_lib.erk_densities(shapes, 0.9)
  nnz = sum(d[p] * math.prod(s) for p, s in shapes.items())
  target = sum(math.floor(0.1 * math.prod(s) + 1e-6) for s in shapes.values())
  assert nnz == pytest.approx(target, rel=1e-9)
  # ERK gives the small first conv a higher density than the big layers.
  assert d["c1"] > d["c2"]
  flat = layers_lib.erk_densities(shapes, 0.9, power_scale=1e-9)
  assert max(flat.values()) - min(flat.values()) < 1e-6  # -> uniform


def test_uniform_budget_and_default_rules():
  params = {
      "Dense_0": {"kernel": jnp.zeros((10, 1)), "bias": jnp.zeros((1,))},
      "Conv_0": {"kernel": jnp.zeros((3, 3, 4, 8))},
      "attn": {
          "query": {"kernel": jnp.zeros((16, 2, 8))},
          "out": {"kernel": jnp.zeros((2, 8, 16))},
      },
      "Embed_0": {"embedding": jnp.zeros((100, 16))},
      "head": {"kernel": jnp.zeros((16, 10))},
  }
  specs = layers_lib.build_layer_specs(
      params, sparsity=0.9, distribution="uniform", constant_fan_in=False
  )
  assert set(specs) == {
      "Dense_0/kernel",
      "Conv_0/kernel",
      "attn/query/kernel",
      "attn/out/kernel",
      "head/kernel",
  }
  assert specs["Dense_0/kernel"].budget == 1  # floor(10 * 0.1), not 0
  assert specs["Conv_0/kernel"].fan_in_axes == (0, 1, 2)
  assert specs["attn/query/kernel"].fan_in_axes == (0,)
  assert specs["attn/query/kernel"].num_neurons == 16
  assert specs["attn/out/kernel"].fan_in_axes == (0, 1)
  assert specs["attn/out/kernel"].fan_in == 16
  assert not specs["head/kernel"].ablation
  assert specs["Conv_0/kernel"].ablation
  dense = layers_lib.build_layer_specs(
      params,
      sparsity=0.9,
      distribution="uniform",
      dense_layers=["Conv_0"],
      constant_fan_in=False,
  )
  assert "Conv_0/kernel" not in dense


# --------------------------------------------------------------------------
# Radix selection against a sort


def _ref_top(keys, n):
  flat = keys.ravel()
  order = np.lexsort((np.arange(flat.size), -flat.astype(np.int64)))
  n = min(n, int((flat > 0).sum()))
  sel = np.zeros(flat.size, bool)
  sel[order[:n]] = True
  return sel.reshape(keys.shape)


def test_top_n_matches_sort_with_ties():
  rng = np.random.default_rng(0)
  top, per_col = jax.jit(select.top_n), jax.jit(select.top_n_per_column)
  # A few fixed shapes (each compiles once), many key draws per shape.
  for trial in range(24):
    d, n = [(1, 1), (7, 3), (33, 17), (40, 1)][trial % 4]
    hi = int(rng.choice([3, 10, 2**31 - 1]))
    keys = rng.integers(0, hi, size=(d, n)).astype(np.int32)
    k = int(rng.integers(0, d * n + 3))
    np.testing.assert_array_equal(np.asarray(top(keys, k)), _ref_top(keys, k))
    ks = rng.integers(0, d + 2, size=n)
    got = np.asarray(per_col(keys, jnp.asarray(ks)))
    for j in range(n):
      np.testing.assert_array_equal(got[:, j], _ref_top(keys[:, j], ks[j]))


def test_magnitude_keys_order_like_abs():
  x = jnp.array([0.0, -0.5, 0.25, 3.0, -3.0, 1e-30, 2.0])
  k = np.asarray(select.magnitude_keys(x))
  a = np.abs(np.asarray(x))
  assert (k >= 1).all()
  for i in range(len(a)):
    for j in range(len(a)):
      assert (a[i] < a[j]) == (k[i] < k[j])


# --------------------------------------------------------------------------
# Exact masks on tiny layers


def test_rigl_drop_and_grow_by_hand():
  params = {"Dense_0": {"kernel": jnp.zeros((4, 2))}}
  tx = _tx("rigl", sparsity=0.5, drop_fraction=0.6, no_ablation=())
  state = tx.init(params)
  mask = np.zeros((4, 2), bool)
  mask[[0, 1, 2], 0] = True
  mask[0, 1] = True
  state = _with_mask(state, "Dense_0", mask)
  w = np.zeros((4, 2), np.float32)
  w[0, 0], w[1, 0], w[2, 0], w[0, 1] = 0.9, -0.1, 0.5, 0.3
  g = np.full((4, 2), 0.01, np.float32)
  g[1, 0], g[3, 1], g[3, 0] = 0.8, -0.95, 0.2
  params = {"Dense_0": {"kernel": jnp.asarray(w)}}
  # n_ones = 4, n_prune = floor(4 * 0.6) = 2: drop -0.1 and 0.3 (smallest
  # |W|), grow the two largest |G| outside the kept set: (3,1) and (1,0).
  u, state = jax.jit(tx.update)({"Dense_0": {"kernel": jnp.asarray(g)}}, state, params)
  new_params = optax.apply_updates(params, u)
  expected = np.zeros((4, 2), bool)
  expected[[0, 1, 2], 0] = True
  expected[3, 1] = True
  got = np.asarray(srigl_jax.get_masks(state)["Dense_0"]["kernel"])
  np.testing.assert_array_equal(got, expected)
  k = np.asarray(new_params["Dense_0"]["kernel"])
  # (1, 0) was active before and is regrown: it keeps its value.
  assert k[1, 0] == np.float32(-0.1)
  assert k[3, 1] == 0.0 and k[0, 1] == 0.0  # new weight starts at 0; pruned is 0
  assert k[0, 0] == np.float32(0.9) and k[2, 0] == np.float32(0.5)


def _srigl_hand_case(gamma_sal):
  # D = 6 inputs, N = 4 neurons, sparsity 0.5 -> B = 12, k0 = 3, m = 2.
  params = {"Dense_0": {"kernel": jnp.zeros((6, 4))}}
  tx = _tx("srigl", sparsity=0.5, gamma_sal=gamma_sal, no_ablation=())
  state = tx.init(params)
  mask = np.zeros((6, 4), bool)
  mask[0:3, 0] = mask[0:3, 1] = mask[3:6, 2] = mask[3:6, 3] = True
  state = _with_mask(state, "Dense_0", mask)
  w = np.zeros((6, 4), np.float32)
  w[0:3, 0] = [0.9, 0.8, 0.7]
  w[0:3, 1] = [0.6, 0.55, 0.5]
  w[3:6, 2] = [0.45, 0.02, 0.01]
  w[3:6, 3] = [0.03, 0.04, 0.05]
  g = (np.arange(24, dtype=np.float32).reshape(6, 4) + 1) * 1e-3
  g[4, 0], g[5, 0], g[4, 1] = 9.0, 8.0, 7.0
  params = {"Dense_0": {"kernel": jnp.asarray(w)}}
  u, state = jax.jit(tx.update)({"Dense_0": {"kernel": jnp.asarray(g)}}, state, params)
  return optax.apply_updates(params, u), state


def test_srigl_ablation_and_regrowth_by_hand():
  # n_prune = floor(12 * 0.3) = 3, n_keep = 9. Top-9 |W|: all of columns 0
  # and 1, 0.45 of column 2, 0.05 and 0.04 of column 3. Top-3 |G|: (4,0),
  # (5,0), (4,1). Salient counts: [5, 4, 1, 2]. tau = max(1, floor(.7*3)) = 2;
  # the 3rd largest count is 2, so the guard keeps tau = 2: column 2 is
  # ablated, k' = 12 // 3 = 4. Re-keeping the top-9 over the active columns
  # keeps all 9 of their weights; each active column grows 1 by |G|.
  new_params, state = _srigl_hand_case(gamma_sal=0.7)
  expected = np.zeros((6, 4), bool)
  expected[[0, 1, 2, 4], 0] = True
  expected[[0, 1, 2, 4], 1] = True
  expected[[2, 3, 4, 5], 3] = True
  got = np.asarray(srigl_jax.get_masks(state)["Dense_0"]["kernel"])
  np.testing.assert_array_equal(got, expected)
  k = np.asarray(new_params["Dense_0"]["kernel"])
  assert (k[:, 2] == 0).all()  # ablated neuron: no weights
  assert k[3, 3] == np.float32(0.03)  # kept
  assert k[4, 0] == 0.0 and k[2, 3] == 0.0  # grown, start at 0
  stats = srigl_jax.layer_stats(state)["Dense_0/kernel"]
  assert int(stats["active_neurons"]) == 3 and int(stats["fan_in"]) == 4


def test_srigl_without_ablation_keeps_fan_in():
  # gamma_sal = 0: no neuron is ablated, k' = k0 = 3. Column 2 keeps 0.45 and
  # regrows 2 by |G|; column 3 keeps 0.05 and 0.04 and regrows 1.
  _, state = _srigl_hand_case(gamma_sal=0.0)
  got = np.asarray(srigl_jax.get_masks(state)["Dense_0"]["kernel"])
  np.testing.assert_array_equal(got.sum(0), [3, 3, 3, 3])
  assert got[3, 2] and got[4, 3] and got[5, 3]
  # column 2 grows its two largest |G| among rows != 3: rows 5 and 4.
  np.testing.assert_array_equal(np.nonzero(got[:, 2])[0], [3, 4, 5])
  # column 3 grows its largest |G| among rows 0..3 (row 3 was dropped): row 3.
  np.testing.assert_array_equal(np.nonzero(got[:, 3])[0], [3, 4, 5])


def test_min_neuron_guard_lowers_threshold():
  spec = layers_lib.LayerSpec("l", (6, 4), (0,), 0.5, True)  # B=12, k0=3, m=2
  counts = jnp.array([5, 2, 1, 0], jnp.int32)
  # tau = max(1, floor(1.0 * 3)) = 3 would leave one neuron (k' = 12 > D).
  # The 3rd largest count is 1 < 3, so tau drops to 1: only neuron 3 goes.
  got = upd.neurons_to_ablate(counts, spec, gamma_sal=1.0)
  np.testing.assert_array_equal(np.asarray(got), [False, False, False, True])
  got = upd.neurons_to_ablate(jnp.array([5, 4, 3, 0]), spec, gamma_sal=1.0)
  np.testing.assert_array_equal(np.asarray(got), [False, False, False, True])
  got = upd.neurons_to_ablate(jnp.array([5, 4, 4, 2]), spec, gamma_sal=1.0)
  np.testing.assert_array_equal(np.asarray(got), [False, False, False, True])


def test_drop_fraction_schedule():
  f = lambda t: float(upd.drop_fraction(t, 0.3, 1000))
  assert f(0) == pytest.approx(0.3)
  assert f(500) == pytest.approx(0.15)
  assert f(1000) == pytest.approx(0.0, abs=1e-7)


# --------------------------------------------------------------------------
# Invariants on random models over many updates


def _random_params(rng):
  d_in = int(rng.integers(8, 40))
  h = int(rng.integers(8, 48))
  heads, hd = 2, int(rng.integers(4, 8))
  return {
      "conv": {
          "kernel": jnp.asarray(rng.normal(size=(3, 3, 4, h)), jnp.float32),
          "bias": jnp.zeros((h,)),
      },
      "dense": {"kernel": jnp.asarray(rng.normal(size=(d_in, h)), jnp.float32)},
      "attn": {
          "query": {"kernel": jnp.asarray(rng.normal(size=(h, heads, hd)), jnp.float32)},
          "out": {"kernel": jnp.asarray(rng.normal(size=(heads, hd, h)), jnp.float32)},
      },
      "head": {"kernel": jnp.asarray(rng.normal(size=(h, 5)), jnp.float32)},
  }


def _check_invariants(state, params, method):
  stats = srigl_jax.layer_stats(state)
  specs = state.layers.by_path()
  masks = srigl_jax.get_masks(state)
  for kp, m in jax.tree_util.tree_leaves_with_path(masks):
    path = layers_lib.path_str(kp)
    spec = specs[path]
    mm = np.asarray(upd.to_matrix(m, spec))
    per = mm.sum(0)
    if method == "srigl":
      active = per[per > 0]
      assert len(set(active.tolist())) == 1, (path, per)  # constant fan-in
      assert active[0] * len(active) <= spec.budget
      assert 1 <= active[0] <= spec.fan_in
      if not spec.ablation:
        assert (per == spec.k0).all(), (path, per)
    else:
      assert mm.sum() == spec.budget
    assert int(stats[path]["active_neurons"]) == int((per > 0).sum())
  # Pruned weights exactly zero, no NaN anywhere.
  for m, p in zip(jax.tree.leaves(masks), _sparse_leaves(params, masks)):
    p = np.asarray(p)
    assert np.isfinite(p).all()
    assert (p[~np.asarray(m)] == 0).all()


def _sparse_leaves(params, masks):
  out = []
  jax.tree.map(
      lambda m, p: out.append(p) if m is not None else None,
      masks,
      params,
      is_leaf=lambda x: x is None,
  )
  return out


@pytest.mark.parametrize(
    "method,gamma,acc",
    [("srigl", 0.3, 1), ("srigl", 0.95, 2), ("srigl", 0.0, 1), ("rigl", 0.0, 2), ("set", 0.0, 1)],
)
def test_invariants_over_many_updates(method, gamma, acc):
  # A fixed seed per case (hash() of a str is salted per process).
  rng = np.random.default_rng(zlib.crc32(f"{method},{gamma},{acc}".encode()))
  for trial in range(1):
    params = _random_params(rng)
    # Up to the largest sparsity every layer can take with fan-in >= 1.
    min_fan_in = min(
        s.fan_in
        for s in layers_lib.build_layer_specs(params, sparsity=0.5, distribution="uniform").values()
    )
    sparsity = float(rng.uniform(0.5, min(0.97, 1 - 1 / min_fan_in - 1e-3)))
    tx = srigl_jax.sparse_optimizer(
        optax.adam(1e-2),
        method=method,
        sparsity=sparsity,
        key=jax.random.key(trial),
        stop_step=60,
        update_every=acc * 2,
        gamma_sal=gamma,
        grad_accumulation=acc,
        distribution="uniform",
    )
    state = tx.init(params)
    params = srigl_jax.apply_masks(params, state)

    @jax.jit
    def step(params, state, k):
      g = jax.tree.map(lambda p: jax.random.normal(k, p.shape) * (1 + jnp.abs(p)), params)
      u, state = tx.update(g, state, params)
      return optax.apply_updates(params, u), state

    for t in range(24):
      params, state = step(params, state, jax.random.key(100 + t))
      if (t + 1) % (acc * 2) == 0:
        _check_invariants(state, params, method)
    assert step._cache_size() == 1  # mask updates never recompile


def test_masks_change_only_on_schedule():
  params = {"Dense_0": {"kernel": jnp.ones((16, 8))}}
  # stop_step=12: the last update (step 9) still prunes floor(32 * 0.044) = 1.
  tx = _tx("rigl", sparsity=0.75, update_every=3, stop_step=12, inner=optax.sgd(0.1))
  state = tx.init(params)
  step = jax.jit(tx.update)
  prev = np.asarray(srigl_jax.get_masks(state)["Dense_0"]["kernel"])
  changed_at = []
  for t in range(1, 16):
    g = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(t), (16, 8))}}
    u, state = step(g, state, params)
    params = optax.apply_updates(params, u)
    cur = np.asarray(srigl_jax.get_masks(state)["Dense_0"]["kernel"])
    if (cur != prev).any():
      changed_at.append(t)
    prev = cur
  assert changed_at == [3, 6, 9]


def test_grad_accumulation_window():
  params = {"Dense_0": {"kernel": jnp.ones((4, 4))}}
  tx = _tx("rigl", update_every=4, grad_accumulation=2, stop_step=100)
  state = tx.init(params)
  gs = [jnp.full((4, 4), float(i + 1)) for i in range(4)]
  for g in gs:
    _, state = tx.update({"Dense_0": {"kernel": g}}, state, params)
  # The grow score at step 4 is the sum of the grads of steps 3 and 4.
  np.testing.assert_allclose(np.asarray(state.grad_acc["Dense_0"]["kernel"]), 7.0)


# --------------------------------------------------------------------------
# Semantics of one call


@pytest.mark.parametrize("inner_name", ["sgd_momentum", "adam", "chain"])
def test_moments_reset_where_mask_changed(inner_name):
  inner = {
      "sgd_momentum": optax.sgd(0.1, momentum=0.9),
      "adam": optax.adam(0.1),
      "chain": optax.chain(
          optax.clip_by_global_norm(1.0), optax.add_decayed_weights(1e-4), optax.adam(0.1)
      ),
  }[inner_name]
  init_params = {"Dense_0": {"kernel": jax.random.normal(KEY, (12, 6)), "bias": jnp.zeros((6,))}}

  def run(update_every):
    tx = _tx("srigl", sparsity=0.7, update_every=update_every, inner=inner, no_ablation=())
    state = tx.init(init_params)
    params = srigl_jax.apply_masks(init_params, state)
    step = jax.jit(lambda g, s, p: tx.update(g, s, p))
    for t in range(1, 4):
      before = np.asarray(srigl_jax.get_masks(state)["Dense_0"]["kernel"])
      g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(t), p.shape), params)
      u, state = step(g, state, params)
      params = optax.apply_updates(params, u)
    return before, state, params

  before, state, params = run(update_every=3)
  after = np.asarray(srigl_jax.get_masks(state)["Dense_0"]["kernel"])
  changed = before != after
  assert changed.any()
  n_checked = 0
  for leaf in jax.tree.leaves(state.inner_state):
    if getattr(leaf, "shape", None) == (12, 6):
      n_checked += 1
      leaf = np.asarray(leaf)
      assert (leaf[changed] == 0).all()
      assert (leaf[~after] == 0).all()  # inactive positions never accumulate
      assert (leaf[after & ~changed] != 0).any()
  assert n_checked >= 1
  # A twin run whose masks never change (same masks, gradients and steps):
  # the reset touches nothing but the kernel's moments where the mask changed,
  # so the dense bias's moments are equal, and so are the kernel's elsewhere.
  _, twin, _ = run(update_every=1000)
  n_bias = 0
  for leaf, twin_leaf in zip(jax.tree.leaves(state.inner_state), jax.tree.leaves(twin.inner_state)):
    shape = getattr(leaf, "shape", None)
    if shape == (6,):
      n_bias += 1
      assert (np.asarray(leaf) != 0).any()
      np.testing.assert_array_equal(leaf, twin_leaf)
    elif shape == (12, 6):
      np.testing.assert_array_equal(np.asarray(leaf)[~changed], np.asarray(twin_leaf)[~changed])
  assert n_bias >= 1
  # Pruned weights are exactly zero.
  k = np.asarray(params["Dense_0"]["kernel"])
  assert (k[~after] == 0).all()


def test_masked_weights_zero_whatever_the_user_did():
  params = {"Dense_0": {"kernel": jnp.ones((8, 8))}}
  tx = _tx("static", sparsity=0.5, inner=optax.adamw(0.1, weight_decay=0.1))
  state = tx.init(params)  # params deliberately left dense
  g = {"Dense_0": {"kernel": jnp.ones((8, 8))}}
  u, state = tx.update(g, state, params)
  new = optax.apply_updates(params, u)
  m = np.asarray(srigl_jax.get_masks(state)["Dense_0"]["kernel"])
  k = np.asarray(new["Dense_0"]["kernel"])
  assert (k[~m] == 0).all() and (k[m] != 0).all()
  assert m.sum() == 32


def test_get_masks_inside_chain_and_sparse_init():
  params = {"Dense_0": {"kernel": jnp.ones((64, 32))}, "head": {"kernel": jnp.ones((32, 4))}}
  sp = srigl_jax.srigl(optax.sgd(0.1), sparsity=0.9, key=KEY, stop_step=100, distribution="uniform")
  tx = optax.chain(optax.clip_by_global_norm(1.0), sp)
  state = tx.init(params)
  masks = srigl_jax.get_masks(state)
  assert masks["Dense_0"]["kernel"].shape == (64, 32)
  np.testing.assert_array_equal(np.asarray(masks["Dense_0"]["kernel"]).sum(0), 6)
  new = srigl_jax.sparse_init(params, state, jax.random.key(5))
  k = np.asarray(new["Dense_0"]["kernel"])
  m = np.asarray(masks["Dense_0"]["kernel"])
  assert (k[~m] == 0).all() and (k[m] != 0).all()
  # He normal with the sparse fan-in 6: std sqrt(2 / 6).
  assert np.std(k[m]) == pytest.approx(math.sqrt(2 / 6), rel=0.15)


def test_dense_method_is_a_passthrough():
  params = {"Dense_0": {"kernel": jnp.ones((4, 4))}}
  tx = srigl_jax.sparse_optimizer(
      optax.sgd(0.5), method="dense", sparsity=0.9, key=KEY, stop_step=10
  )
  state = tx.init(params)
  assert srigl_jax.get_masks(state)["Dense_0"]["kernel"] is None
  u, _ = tx.update({"Dense_0": {"kernel": jnp.ones((4, 4))}}, state, params)
  np.testing.assert_allclose(np.asarray(u["Dense_0"]["kernel"]), -0.5)


# --------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sparsity=1.0), r"outside \[0, 1\)"),
        (dict(sparsity=-0.1), r"outside \[0, 1\)"),
        (dict(gamma_sal=-0.5), "gamma_sal must be >= 0"),
        (dict(update_every=0), "update_every"),
        (dict(stop_step=0), "stop_step"),
        (dict(distribution="erkk"), "distribution=.* is unknown"),
        (dict(sparse_rule="convs"), "Unknown sparse rule"),
        (dict(method="rigll"), "Unknown method"),
        (dict(grad_accumulation=5, update_every=2), "grad_accumulation"),
        (dict(key=None), "PRNG key is required"),
    ],
)
def test_bad_arguments(kwargs, match):
  base = dict(method="srigl", sparsity=0.9, key=KEY, stop_step=10)
  base.update(kwargs)
  with pytest.raises((ValueError, TypeError), match=match):
    srigl_jax.sparse_optimizer(optax.sgd(0.1), **base)


def test_layer_whose_fan_in_would_reach_zero():
  params = {"Dense_0": {"kernel": jnp.zeros((1000, 10))}}
  tx = srigl_jax.srigl(
      optax.sgd(0.1), sparsity=0.9995, key=KEY, stop_step=10, distribution="uniform"
  )
  with pytest.raises(
      ValueError, match=r"Dense_0/kernel.*largest sparsity this layer can take is 0\.9990"
  ):
    tx.init(params)
  # RigL has no per-neuron constraint and accepts it.
  srigl_jax.rigl(
      optax.sgd(0.1), sparsity=0.9995, key=KEY, stop_step=10, distribution="uniform"
  ).init(params)


# --------------------------------------------------------------------------
# Sharding


_SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import srigl_jax
    assert jax.device_count() == 8
    params = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(1), (64, 32))},
              "conv": {"kernel": jax.random.normal(jax.random.key(2), (3, 3, 8, 16))},
              "head": {"kernel": jax.random.normal(jax.random.key(3), (32, 8))}}
    tx = srigl_jax.srigl(optax.sgd(0.1, 0.9), sparsity=0.9, key=jax.random.key(0),
                         stop_step=100, update_every=2, gamma_sal=0.5)
    def run(shard):
        mesh = Mesh(np.array(jax.devices()), ("d",))
        spec = lambda x: NamedSharding(mesh, P(*([None] * (x.ndim - 1)), "d") if shard else P())
        p = jax.device_put(params, jax.tree.map(spec, params))
        state = jax.jit(tx.init)(p)
        @jax.jit
        def step(p, s, k):
            g = jax.tree.map(lambda x: jax.random.normal(k, x.shape), p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s
        for t in range(8):
            p, state = step(p, state, jax.random.key(10 + t))
        return jax.tree.map(np.asarray, (p, srigl_jax.get_masks(state)))
    a, b = run(False), run(True)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    print("SHARDED_OK")
""")


def test_sharded_update_equals_single_device():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, "-c", _SHARDED], capture_output=True, text=True, env=env, timeout=300
  )
  assert "SHARDED_OK" in out.stdout, out.stderr[-3000:]
