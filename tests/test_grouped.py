"""Tests of group-shared constant fan-in (`group_size=G` of the sparse optimizer).

Exact masks on tiny layers derived by hand for G = 2 and G = 4, invariants on
random models over many mask updates, G = 1 bit-identical to the default,
layers whose width is not a multiple of G, argument errors, and sharding.

Notation in the hand cases: a group is G consecutive columns of the (D, N)
kernel; "A3" is the (group A, input row 3) entry; its drop score is the L1
norm of |W| over the group's G columns, its grow score the L1 norm of |grad|.
"""

import logging
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
from srigl_jax.sparsity import updates as upd

KEY = jax.random.key(0)
FAR = 10**9  # with update_every=1 the first update is at step 1: f_1 = alpha exactly


def _tx(method="srigl", **kw):
  kw.setdefault("sparsity", 0.5)
  kw.setdefault("key", KEY)
  kw.setdefault("stop_step", FAR)
  kw.setdefault("update_every", 1)
  kw.setdefault("distribution", "uniform")
  kw.setdefault("drop_fraction", 0.5)
  kw.setdefault("no_ablation", ())
  inner = kw.pop("inner", optax.sgd(0.0))
  return srigl_jax.sparse_optimizer(inner, method=method, **kw)


def _group_mask(d, group_size, rows_per_group):
  """(D, N) bool mask whose group p (columns p*G .. p*G+G-1) uses rows_per_group[p]."""
  mask = np.zeros((d, group_size * len(rows_per_group)), bool)
  for p, rows in enumerate(rows_per_group):
    for r in rows:
      mask[r, p * group_size : (p + 1) * group_size] = True
  return mask


def _update_once(mask, w, g, *, group_size, method="srigl", gamma_sal=0.0, sparsity=0.5):
  """One mask update (sgd(0): the drop score sees w itself) from the given mask."""
  params = {"Dense_0": {"kernel": jnp.zeros(w.shape)}}
  tx = _tx(method, sparsity=sparsity, gamma_sal=gamma_sal, group_size=group_size)
  state = tx.init(params)
  masks = {"Dense_0": {"kernel": jnp.asarray(mask)}}
  state = state._replace(masks=masks)
  params = {"Dense_0": {"kernel": jnp.asarray(w)}}
  u, state = jax.jit(tx.update)({"Dense_0": {"kernel": jnp.asarray(g)}}, state, params)
  new = optax.apply_updates(params, u)
  got = np.asarray(srigl_jax.get_masks(state)["Dense_0"]["kernel"])
  return got, np.asarray(new["Dense_0"]["kernel"]), state


# --------------------------------------------------------------------------
# G = 2: a (6, 8) Dense kernel, four groups A (cols 0-1), B (2-3), C (4-5),
# D (6-7). Sparsity 0.5: B = 24 weights, floor(24 / 2) = 12 entries, k0 = 3,
# guard m = floor(12 / 6) = 2 groups. alpha = 0.5 at step 1: the 12 active
# entries give n_prune = 6, n_keep = 6.


def _g2_case():
  mask = _group_mask(6, 2, [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]])
  w = np.zeros((6, 8), np.float32)
  # Group L1 of |W|: A0 1.0, A1 0.8, A2 0.7; B0 0.6, B1 0.5, B2 0.1;
  # C3 0.45, C4 0.02, C5 0.03; D3 0.04, D4 0.05, D5 0.06.
  w[0:3, 0:2] = [[0.9, -0.1], [0.4, 0.4], [-0.35, 0.35]]
  w[0:3, 2:4] = [[0.3, 0.3], [0.25, -0.25], [0.05, 0.05]]
  w[3:6, 4:6] = [[0.44, 0.01], [0.01, 0.01], [0.02, 0.01]]
  w[3:6, 6:8] = [[0.02, 0.02], [0.03, 0.02], [0.03, 0.03]]
  # Baseline |grad| (8 i + j + 1) * 1e-4: a group's baseline L1 is at most
  # 0.0095 and grows with the row. Large grow scores (group L1):
  g = (np.arange(48, dtype=np.float32).reshape(6, 8) + 1) * 1e-4
  g[0, 4:6] = [0.5, 0.5]  # C0 1.0
  g[1, 4:6] = [0.6, -0.3]  # C1 0.9
  g[4, 2:4] = [0.4, 0.4]  # B4 0.8
  g[3, 2:4] = [0.35, 0.35]  # B3 0.7
  g[3, 0:2] = [0.05, -0.6]  # A3 0.65
  g[0, 6:8] = [0.31, 0.31]  # D0 0.62
  g[5, 2:4] = [0.55, 0.05]  # B5 0.6: the largest single entry of column 2
  g[4, 0:2] = [0.15, 0.15]  # A4 0.3: beats A3 in column 0 alone
  g[2, 4:6] = [0.1, 0.1]  # C2 0.2
  g[2, 2:4] = [0.05, 0.05]  # B2 0.1
  return mask, w, g


def test_g2_ablates_a_group_and_grows_by_group_l1():
  # Keep the top-6 entries by |W| L1: A0 A1 A2 B0 B1 C3. Salient = kept or
  # top-6 by |grad| L1 (C0 C1 B4 B3 A3 D0): counts A 4, B 4, C 3, D 1.
  # tau = max(1, floor(0.7 * 3)) = 2; the guard's 3rd largest count is 3, so
  # tau stays 2 and group D (1 < 2) is ablated. k' = floor(12 / 3) = 4.
  # Re-keeping the top-6 over A, B, C keeps the same 6. Grow by |grad| L1:
  #   A (3 kept) + 1: A3 0.65 > A4 0.3 (column 0 alone would take row 4);
  #   B (2 kept) + 2: B4 0.8, B3 0.7 > B5 0.6 (column 2 alone would take B5);
  #   C (1 kept) + 3: C0, C1, C2.
  mask, w, g = _g2_case()
  got, new_w, state = _update_once(mask, w, g, group_size=2, gamma_sal=0.7)
  expected = _group_mask(6, 2, [[0, 1, 2, 3], [0, 1, 3, 4], [0, 1, 2, 3], []])
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(new_w[0:3, 0:2], w[0:3, 0:2])  # kept
  assert (new_w[3, 0:2] == 0).all()  # grown: starts at 0
  assert (new_w[2, 2:4] == 0).all()  # B2 pruned
  assert (new_w[4:6, 4:6] == 0).all()  # C4, C5 pruned
  assert (new_w[:, 6:8] == 0).all()  # group D ablated
  stats = srigl_jax.layer_stats(state)["Dense_0/kernel"]
  assert int(stats["group_size"]) == 2 and int(stats["groups"]) == 4
  assert int(stats["active_groups"]) == 3 and int(stats["active_neurons"]) == 6
  assert int(stats["fan_in"]) == 4 and int(stats["min_fan_in"]) == 4


def test_g2_without_ablation_regrows_to_k0():
  # gamma_sal = 0: no ablation, k' = k0 = 3. Same kept entries; grow:
  #   A: full; B + 1: B4; C + 2: C0, C1;
  #   D (nothing kept) + 3: D0 0.62, then baseline D5 0.0095 and D4 0.0079.
  # D4 and D5 were active before and are regrown: they keep their values.
  mask, w, g = _g2_case()
  got, new_w, state = _update_once(mask, w, g, group_size=2, gamma_sal=0.0)
  expected = _group_mask(6, 2, [[0, 1, 2], [0, 1, 4], [0, 1, 3], [0, 4, 5]])
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(new_w[4:6, 6:8], w[4:6, 6:8])  # regrown, kept
  assert (new_w[3, 6:8] == 0).all() and (new_w[0, 6:8] == 0).all()
  assert int(srigl_jax.layer_stats(state)["Dense_0/kernel"]["active_groups"]) == 4


# --------------------------------------------------------------------------
# G = 4: a (6, 12) Dense kernel, three groups P (cols 0-3), Q (4-7), R (8-11).
# Sparsity 0.5: B = 36, floor(36 / 4) = 9 entries, k0 = 3, guard m =
# floor(9 / 6) = 1. R is ablated at the start and P, Q hold 4 entries each
# (k' = 9 // 2 from an earlier ablation): 8 entries, n_prune = 4, n_keep = 4.


def _g4_case():
  mask = _group_mask(6, 4, [[0, 1, 2, 3], [2, 3, 4, 5], []])
  w = np.zeros((6, 12), np.float32)
  # |W| L1: P0 1.0, P1 0.9, P2 0.7, P3 0.8; Q2 0.04, Q3 0.05, Q4 0.06, Q5 0.07.
  w[0:4, 0:4] = [
      [0.25, -0.25, 0.25, 0.25],
      [0.3, 0.2, 0.2, -0.2],
      [0.64, 0.02, 0.02, 0.02],  # the largest single weight, smallest L1 in P
      [0.2, 0.2, 0.2, 0.2],
  ]
  w[2:6, 4:8] = [
      [0.01, 0.01, 0.01, 0.01],
      [0.02, 0.01, 0.01, 0.01],
      [0.015, 0.015, 0.015, 0.015],
      [0.04, 0.01, 0.01, 0.01],
  ]
  # Baseline |grad| (12 i + j + 1) * 1e-4: group p, row i has L1
  # (48 i + 16 p + 10) * 1e-4 <= 0.0282. Large grow scores (group L1):
  g = (np.arange(72, dtype=np.float32).reshape(6, 12) + 1) * 1e-4
  g[1, 8:12] = [0.5, 0.5, 0.5, 0.5]  # R1 2.0
  g[4, 8:12] = [0.4, 0.4, -0.4, 0.3]  # R4 1.5
  g[0, 4:8] = [0.3, 0.3, 0.3, 0.3]  # Q0 1.2
  g[0, 8:12] = [0.2, 0.3, 0.3, 0.3]  # R0 1.1
  g[1, 4:8] = [0.2, 0.1, 0.1, 0.1]  # Q1 0.5
  g[4, 0:4] = [0.1, 0.1, 0.1, 0.1]  # P4 0.4
  g[2, 8:12] = [0.075, 0.075, 0.075, 0.075]  # R2 0.3
  return mask, w, g


def test_g4_revives_a_group_and_truncates_by_group_l1():
  # Keep the top-4 by |W| L1: all of P (1.0, 0.9, 0.8, 0.7). Top-4 by |grad|
  # L1: R1 R4 Q0 R0. Counts: P 4, Q 1, R 3. tau = max(1, floor(0.5 * 3)) = 1;
  # guard: 2nd largest count 3. Nothing is ablated: R comes back and
  # k' = floor(9 / 3) = 3. P holds 4 > 3 and keeps its 3 largest by |W| L1
  # (P0 P1 P3), dropping P2 whose 0.64 is the layer's largest single weight.
  # Grow: Q (0 kept) + 3: Q0 1.2, Q1 0.5, then baseline Q5 0.0266 (Q5 was
  # active: it keeps its value); R + 3: R1, R4, R0.
  mask, w, g = _g4_case()
  got, new_w, state = _update_once(mask, w, g, group_size=4, gamma_sal=0.5)
  expected = _group_mask(6, 4, [[0, 1, 3], [0, 1, 5], [0, 1, 4]])
  np.testing.assert_array_equal(got, expected)
  assert (new_w[2, 0:4] == 0).all()  # P2 truncated away
  np.testing.assert_array_equal(new_w[[0, 1, 3], 0:4], w[[0, 1, 3], 0:4])
  np.testing.assert_array_equal(new_w[5, 4:8], w[5, 4:8])  # Q5 regrown, kept
  assert (new_w[2:5, 4:8] == 0).all()  # Q2..Q4 pruned
  assert (new_w[:, 8:12] == 0).all()  # R grown: starts at 0
  stats = srigl_jax.layer_stats(state)["Dense_0/kernel"]
  assert int(stats["active_groups"]) == 3 and int(stats["fan_in"]) == 3
  # Without ablation R is active anyway and k' = k0 = 3: the same masks.
  got0, _, _ = _update_once(mask, w, g, group_size=4, gamma_sal=0.0)
  np.testing.assert_array_equal(got0, expected)


def test_g4_ablates_a_group():
  # gamma_sal = 1: tau = max(1, floor(1 * 3)) = 3 and the guard's 2nd largest
  # count is 3: Q (1 < 3) is ablated, R (3) is not. k' = floor(9 / 2) = 4.
  # Re-keeping the top-4 over P and R keeps all of P (4 <= k'). R grows 4:
  # R1 2.0, R4 1.5, R0 1.1, R2 0.3.
  mask, w, g = _g4_case()
  got, new_w, state = _update_once(mask, w, g, group_size=4, gamma_sal=1.0)
  expected = _group_mask(6, 4, [[0, 1, 2, 3], [], [0, 1, 2, 4]])
  np.testing.assert_array_equal(got, expected)
  assert (new_w[:, 4:8] == 0).all()
  np.testing.assert_array_equal(new_w[0:4, 0:4], w[0:4, 0:4])
  stats = srigl_jax.layer_stats(state)["Dense_0/kernel"]
  assert int(stats["active_groups"]) == 2 and int(stats["active_neurons"]) == 8
  assert int(stats["fan_in"]) == 4


def test_rigl_g2_drops_and_grows_group_entries():
  # (6, 4), G = 2: U (cols 0-1), V (2-3). B = 12, floor(12 / 2) = 6 entries.
  # U uses rows 0-3, V rows 0-1; n_prune = floor(6 * 0.5) = 3, n_keep = 3.
  # |W| L1: U0 0.9, U1 0.1, U2 0.5, U3 0.05, V0 0.3, V1 0.6 -> keep U0 V1 U2.
  # Grow the 3 largest |grad| L1 outside the kept set: V2 0.8, U1 0.7, V5 0.6
  # (U4 0.55 loses although its 0.5 is column 0's largest entry). U1 was
  # active and is regrown: it keeps its value.
  mask = _group_mask(6, 2, [[0, 1, 2, 3], [0, 1]])
  w = np.zeros((6, 4), np.float32)
  w[0:4, 0:2] = [[0.5, 0.4], [0.05, 0.05], [0.25, -0.25], [0.03, 0.02]]
  w[0:2, 2:4] = [[0.1, 0.2], [0.3, 0.3]]
  g = (np.arange(24, dtype=np.float32).reshape(6, 4) + 1) * 1e-4  # L1 <= 0.0047
  g[2, 2:4] = [0.4, 0.4]
  g[1, 0:2] = [0.35, -0.35]
  g[5, 2:4] = [0.3, 0.3]
  g[4, 0:2] = [0.5, 0.05]
  g[0, 2:4] = [0.1, 0.1]
  got, new_w, _ = _update_once(mask, w, g, group_size=2, method="rigl")
  expected = _group_mask(6, 2, [[0, 1, 2], [1, 2, 5]])
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(new_w[1, 0:2], w[1, 0:2])
  assert (new_w[3, 0:2] == 0).all() and (new_w[0, 2:4] == 0).all()
  assert (new_w[[2, 5], 2:4] == 0).all()


# --------------------------------------------------------------------------
# Invariants on random models over many updates


def _params(rng, shapes):
  params = {}
  for path, shape in shapes.items():
    *parents, leaf = path.split("/")
    node = params
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(rng.normal(size=shape), jnp.float32)
    node["bias"] = jnp.zeros(shape[-1:], jnp.float32)
  return params


def _matrix(x, spec):
  return np.transpose(np.asarray(x), spec.perm).reshape(spec.fan_in, spec.num_neurons)


SHAPES = {
    "dense/kernel": (24, 16),
    "conv/kernel": (3, 3, 4, 8),
    # A depthwise-shaped kernel: the optimizer sees only shapes and trains it
    # like any conv (the condensed converter is what refuses depthwise convs).
    "dw/kernel": (3, 3, 1, 8),
    "attn/query/kernel": (16, 2, 4),  # fan-in 16, 8 neurons (heads x head_dim)
    "attn/out/kernel": (2, 4, 16),  # fan-in 8, 16 neurons
    "head/kernel": (16, 6),  # exempt from ablation; ungrouped when 6 % G != 0
}


@pytest.mark.parametrize(
    "method,group_size,distribution,gamma_sal,acc",
    [
        ("srigl", 2, "erk", 0.5, 1),
        ("srigl", 4, "uniform", 0.9, 2),
        ("srigl", 8, "erk", 0.0, 1),
        ("rigl", 4, "uniform", 0.0, 2),
        ("set", 2, "erk", 0.0, 1),
        ("static", 4, "uniform", 0.0, 1),
    ],
)
def test_grouped_invariants_over_many_updates(method, group_size, distribution, gamma_sal, acc):
  seed = zlib.crc32(f"{method},{group_size},{distribution}".encode())
  rng = np.random.default_rng(seed)
  params = _params(rng, SHAPES)
  update_every = 2 * acc
  tx = srigl_jax.sparse_optimizer(
      optax.sgd(0.3, momentum=0.9),
      method=method,
      sparsity=0.8,
      key=jax.random.key(seed),
      stop_step=10**6,
      distribution=distribution,
      update_every=update_every,
      drop_fraction=0.5,
      gamma_sal=gamma_sal,
      grad_accumulation=acc,
      group_size=group_size,
  )
  state = tx.init(params)
  specs = state.layers.by_path()
  for path, spec in specs.items():
    n = spec.num_neurons
    assert spec.group_size == (group_size if n % group_size == 0 else 1), path
  assert any(s.group_size == group_size for s in specs.values())
  params = srigl_jax.sparse_init(params, state, jax.random.key(1))
  # Per-group gradient scales over four decades make some groups weak
  # enough to be ablated.
  scales = {}
  for path, spec in specs.items():
    per_group = 10.0 ** rng.uniform(-4, 0, spec.num_groups)
    scales[path] = jnp.asarray(np.repeat(per_group, spec.group_size), jnp.float32)

  @jax.jit
  def step(params, state, key):
    def grad(kp, p):
      path = layers_lib.path_str(kp)
      g = jax.random.normal(jax.random.fold_in(key, zlib.crc32(path.encode())), p.shape)
      if path not in specs:
        return g
      return upd.from_matrix(upd.to_matrix(g, specs[path]) * scales[path], specs[path])

    grads = jax.tree_util.tree_map_with_path(grad, params)
    u, state = tx.update(grads, state, params)
    return optax.apply_updates(params, u), state

  ablated = 0
  prev = jax.device_get(srigl_jax.get_masks(state))
  for t in range(12 * update_every):
    params, state = step(params, state, jax.random.key(100 + t))
    if (t + 1) % update_every:
      continue
    masks, p_host, trace = jax.device_get(
        (srigl_jax.get_masks(state), params, state.inner_state[0].trace)
    )
    stats = jax.device_get(srigl_jax.layer_stats(state))
    flat = {layers_lib.path_str(kp): x for kp, x in jax.tree_util.tree_leaves_with_path(masks)}
    flat_prev = dict(
        (layers_lib.path_str(kp), x) for kp, x in jax.tree_util.tree_leaves_with_path(prev)
    )
    flat_p = dict(
        (layers_lib.path_str(kp), x) for kp, x in jax.tree_util.tree_leaves_with_path(p_host)
    )
    flat_t = dict(
        (layers_lib.path_str(kp), x) for kp, x in jax.tree_util.tree_leaves_with_path(trace)
    )
    for path, spec in specs.items():
      at = f"step {t + 1}, {path} {spec.shape} G={spec.group_size}"
      size = spec.group_size
      m = _matrix(flat[path], spec)
      d, n = m.shape
      groups = m.reshape(d, n // size, size)
      assert (groups == groups[:, :, :1]).all(), f"{at}: a group's columns differ"
      m_g = groups[:, :, 0]
      per = m_g.sum(0)
      b_g = spec.budget // size
      if method == "srigl":
        active = per > 0
        n_active = int(active.sum())
        k = per[active]
        assert n_active >= 1 and (k == k[0]).all(), f"{at}: fan-in not constant {per}"
        k = int(k[0])
        assert k * n_active <= b_g < (k + 1) * n_active, at
        assert size * k * n_active <= spec.budget, at
        assert k <= spec.fan_in
        if not spec.ablation or gamma_sal == 0.0:
          assert n_active == spec.num_groups, f"{at}: ablated without ablation"
        ablated += spec.num_groups - n_active
      else:
        assert int(m_g.sum()) == b_g, f"{at}: {int(m_g.sum())} entries, budget {b_g}"
      w = _matrix(flat_p[path], spec)
      mom = _matrix(flat_t[path], spec)
      changed = m != _matrix(flat_prev[path], spec)
      assert (w[~m] == 0).all(), f"{at}: a masked weight is not 0"
      assert (mom[~m] == 0).all() and (mom[changed] == 0).all(), f"{at}: moments"
      s = stats[path]
      assert int(s["group_size"]) == size and int(s["groups"]) == n // size
      assert int(s["active_groups"]) == int((per > 0).sum())
    prev = masks
  assert step._cache_size() == 1  # pylint: disable=protected-access
  if method == "srigl" and gamma_sal > 0:
    assert ablated > 0, "no group was ever ablated"


def test_sparse_init_uses_each_neurons_sparse_fan_in():
  params = {"Dense_0": {"kernel": jnp.ones((64, 32))}}
  tx = _tx("srigl", sparsity=0.9, group_size=8)
  state = tx.init(params)
  m = np.asarray(srigl_jax.get_masks(state)["Dense_0"]["kernel"])
  assert (m.sum(0) == 6).all()  # k0 = floor(204 / 32)
  assert (m.reshape(64, 4, 8) == m.reshape(64, 4, 8)[:, :, :1]).all()
  k = np.asarray(srigl_jax.sparse_init(params, state, jax.random.key(5))["Dense_0"]["kernel"])
  assert (k[~m] == 0).all() and (k[m] != 0).all()
  assert np.std(k[m]) == pytest.approx(np.sqrt(2 / 6), rel=0.15)


# --------------------------------------------------------------------------
# G = 1 is SRigL bit for bit


@pytest.mark.parametrize("method", ["srigl", "rigl"])
def test_group_size_one_is_bit_identical(method):
  rng = np.random.default_rng(7)
  params = _params(
      rng, {"dense/kernel": (20, 12), "conv/kernel": (3, 3, 3, 8), "head/kernel": (12, 5)}
  )

  def run(**extra):
    tx = srigl_jax.sparse_optimizer(
        optax.adam(1e-2),
        method=method,
        sparsity=0.8,
        key=jax.random.key(3),
        stop_step=100,
        update_every=2,
        gamma_sal=0.9,
        **extra,
    )
    state = tx.init(params)
    init_masks = jax.device_get(srigl_jax.get_masks(state))
    p = srigl_jax.apply_masks(params, state)

    @jax.jit
    def step(p, state, k):
      g = jax.tree.map(lambda x: jax.random.normal(k, x.shape) * (1 + x), p)
      u, state = tx.update(g, state, p)
      return optax.apply_updates(p, u), state

    for t in range(10):
      p, state = step(p, state, jax.random.key(t))
    return init_masks, jax.device_get((p, srigl_jax.get_masks(state), state.inner_state))

  (init_a, a), (_, b) = run(), run(group_size=1)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  # The comparison covers mask updates that changed the masks.
  assert any((x != y).any() for x, y in zip(jax.tree.leaves(init_a), jax.tree.leaves(a[1])))


# --------------------------------------------------------------------------
# Widths that G does not divide


def test_layer_whose_width_g_does_not_divide_trains_ungrouped(caplog):
  params = {
      "Dense_0": {"kernel": jax.random.normal(KEY, (8, 12))},
      "head": {"kernel": jax.random.normal(jax.random.key(1), (12, 10))},
  }
  tx = _tx(
      "srigl",
      sparsity=0.7,
      group_size=4,
      gamma_sal=0.5,
      inner=optax.sgd(0.1),
      no_ablation=layers_lib.DEFAULT_NO_ABLATION,
  )
  with caplog.at_level(logging.WARNING):
    state = tx.init(params)
  assert "'head/kernel' 10" in caplog.text and "ungrouped" in caplog.text
  specs = state.layers.by_path()
  assert specs["Dense_0/kernel"].group_size == 4 and specs["head/kernel"].group_size == 1
  stats = srigl_jax.layer_stats(state)
  assert int(stats["head/kernel"]["group_size"]) == 1
  assert int(stats["head/kernel"]["groups"]) == 10
  assert int(stats["Dense_0/kernel"]["groups"]) == 3
  step = jax.jit(tx.update)
  ungrouped_seen = False
  for t in range(6):
    g = jax.tree.map(lambda x: jax.random.normal(jax.random.key(t), x.shape), params)
    u, state = step(g, state, params)
    params = optax.apply_updates(params, u)
    masks = srigl_jax.get_masks(state)
    dense = np.asarray(masks["Dense_0"]["kernel"]).reshape(8, 3, 4)
    assert (dense == dense[:, :, :1]).all()
    head = np.asarray(masks["head"]["kernel"])
    assert (head.sum(0) == 3).all()  # k0 = floor(36 / 10) per neuron, no ablation
    # Neighbouring head neurons pick their inputs independently.
    ungrouped_seen |= bool(
        (head.reshape(12, 5, 2)[:, :, 0] != head.reshape(12, 5, 2)[:, :, 1]).any()
    )
  assert ungrouped_seen


def test_no_width_divisible_raises_at_init():
  params = {"a": {"kernel": jnp.zeros((8, 10))}, "b": {"kernel": jnp.zeros((10, 6))}}
  for method in ("srigl", "rigl", "static"):
    tx = _tx(method, group_size=4)
    with pytest.raises(ValueError, match=r"^group_size=4 divides.*'a/kernel' 10, 'b/kernel' 6"):
      tx.init(params)


def test_rigl_budget_below_one_group_raises():
  # RigL needs no fan-in per neuron, but a layer must keep one group entry.
  params = {"a": {"kernel": jnp.zeros((100, 8))}}
  tx = _tx("rigl", sparsity=0.995, group_size=8)  # B = 4 < 8
  with pytest.raises(ValueError, match=r"'a/kernel'.*group_size=8"):
    tx.init(params)


@pytest.mark.parametrize("method", ["srigl", "rigl", "set", "static"])
@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "4", None])
def test_bad_group_size_refused_at_construction(method, bad):
  with pytest.raises(ValueError, match=r"^group_size must be an integer >= 1"):
    _tx(method, group_size=bad)


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
                         stop_step=100, update_every=2, gamma_sal=0.5, group_size=4,
                         grad_accumulation=2)
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
    m = b[1]["Dense_0"]["kernel"].reshape(64, 8, 4)
    assert (m == m[:, :, :1]).all()
    print("SHARDED_OK")
""")


def test_grouped_sharded_update_equals_single_device():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, "-c", _SHARDED], capture_output=True, text=True, env=env, timeout=300
  )
  assert "SHARDED_OK" in out.stdout, out.stderr[-3000:]
