"""Every rule of the mask update (SRIGL_NOTES section 4) on hand-computed cases.

Each case is a single Dense kernel, viewed as a (D, N) matrix: rows are the
fan-in, columns are neurons. The expected mask, weights and optimizer moments
are written out in the test, with the derivation in comments; nothing is
computed by the code under test. The weights and gradients are chosen so that
a plausible mistake in the rule being tested (truncating by the grow score,
ceil instead of floor, the guard one place off, ...) gives a different mask.

Conventions of every case unless it says otherwise: sparsity 0.5 with the
uniform distribution (B = D * N / 2), `update_every=1` and a `stop_step` so far
away that the drop fraction of the first update is alpha itself (cos(pi / 1e9)
is 1 in float32), an inner optimizer with learning rate 0 (weights move only
through the mask update) but with moments, so that the reset of the moments is
visible: after one step the momentum trace is the masked gradient.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import srigl_jax
from srigl_jax.sparsity import updates as upd

FAR = 10**9  # stop_step: the drop fraction at step 1 is exactly alpha in float32
SMALL = 1e-3  # background gradient scale: below every gradient a case places


def _mask(d: int, n: int, rows_by_col: dict[int, tuple[int, ...]]) -> np.ndarray:
  """(d, n) bool mask, True at the listed rows of each column."""
  m = np.zeros((d, n), bool)
  for col, rows in rows_by_col.items():
    m[list(rows), col] = True
  return m


def _values(d: int, n: int, entries: dict[tuple[int, int], float], background=0.0) -> np.ndarray:
  """(d, n) float32 matrix: `entries` at their (row, col), background elsewhere."""
  if callable(background):
    x = background(d, n)
  else:
    x = np.full((d, n), background, np.float32)
  for (r, c), v in entries.items():
    x[r, c] = v
  return x


def _small_distinct(d: int, n: int) -> np.ndarray:
  """Distinct gradients 0.001 .. 0.001 * d * n, so no ties decide anything."""
  return (np.arange(d * n, dtype=np.float32).reshape(d, n) + 1) * SMALL


def _one_update(
    mask,
    w,
    g,
    *,
    alpha,
    gamma_sal=0.0,
    method='srigl',
    name='dense',
    inner=None,
    sparsity=0.5,
    count=0,
    stop_step=FAR,
    update_every=1,
):
  """One call of the sparse optimizer on {name: {kernel, bias}} from `mask`.

  Returns:
    (new mask, new kernel, new bias, inner state, the bias gradient).
  """
  d, n = w.shape
  params = {name: {'kernel': jnp.asarray(w), 'bias': jnp.full((n,), 0.25, jnp.float32)}}
  tx = srigl_jax.sparse_optimizer(
      inner if inner is not None else optax.sgd(0.0, momentum=0.9),
      method=method,
      sparsity=sparsity,
      key=jax.random.key(0),
      stop_step=stop_step,
      update_every=update_every,
      distribution='uniform',
      drop_fraction=alpha,
      gamma_sal=gamma_sal,
  )
  state = tx.init(params)
  masks = srigl_jax.get_masks(state)
  assert masks[name]['kernel'].shape == (d, n)
  masks = {name: {'kernel': jnp.asarray(mask), 'bias': None}}
  state = state._replace(masks=masks, count=jnp.int32(count))
  g_bias = jnp.arange(1, n + 1, dtype=jnp.float32) * 0.5
  grads = {name: {'kernel': jnp.asarray(g), 'bias': g_bias}}
  updates, state = jax.jit(tx.update)(grads, state, params)
  new = optax.apply_updates(params, updates)
  return (
      np.asarray(srigl_jax.get_masks(state)[name]['kernel']),
      np.asarray(new[name]['kernel']),
      np.asarray(new[name]['bias']),
      state.inner_state,
      np.asarray(g_bias),
  )


def _check_trace(inner_state, name, old, new, g, g_bias):
  """SGD momentum after one step: the masked gradient where the weight was and
  stays active, exactly 0 wherever the mask changed; the dense bias keeps its
  whole gradient (the reset never touches dense leaves)."""
  trace = optax.tree_utils.tree_get(inner_state, 'trace')
  np.testing.assert_array_equal(np.asarray(trace[name]['kernel']), np.where(old & new, g, 0.0))
  np.testing.assert_array_equal(np.asarray(trace[name]['bias']), g_bias)


# ---------------------------------------------------------------------------
# Step 6: a neuron holding more than k' keeps its k' largest by |W|.


def test_truncation_to_k_prime_is_by_magnitude():
  # D = 4, N = 3, B = 6, k0 = 2, m = floor(6 / 4) = 1. Neuron 2 was ablated
  # earlier, so neurons 0 and 1 hold k = 6 // 2 = 3 each.
  # alpha = 0.3: n_prune = floor(6 * 0.3) = 1, n_keep = 5; the smallest |W|,
  # (2, 1) = 0.05, is dropped. The top-1 |G| is (1, 2) = 0.9, in neuron 2.
  # Counts c = [3, 2, 1]; tau = max(1, floor(0.3 * 2)) = 1, guard: the 2nd
  # largest count is 2 >= 1. No neuron is ablated: neuron 2 comes back, and
  # k' = 6 // 3 = 2. Neuron 0 still holds 3 > k': it keeps rows 0 (0.9) and
  # 2 (0.5) by |W| and loses row 1 (0.2). By grow score it would keep rows 1
  # (0.03) and 0 (0.02); by index order rows 0 and 1. Neuron 1 holds k' = 2
  # already. Neuron 2 grows its two largest |G|: rows 1 (0.9) and 0 (0.5).
  d, n = 4, 3
  old = _mask(d, n, {0: (0, 1, 2), 1: (1, 2, 3)})
  w = _values(d, n, {(0, 0): 0.9, (1, 0): 0.2, (2, 0): 0.5, (1, 1): 0.8, (2, 1): 0.05, (3, 1): 0.7})
  g = _values(
      d,
      n,
      {
          (0, 0): 0.02,
          (1, 0): 0.03,
          (2, 0): 0.01,
          (3, 0): 0.04,
          (0, 2): 0.5,
          (1, 2): 0.9,
          (2, 2): 0.3,
          (3, 2): 0.1,
      },
      background=0.06,
  )
  new, kernel, _, inner, g_bias = _one_update(old, w, g, alpha=0.3, gamma_sal=0.3)
  np.testing.assert_array_equal(new, _mask(d, n, {0: (0, 2), 1: (1, 3), 2: (0, 1)}))
  # Kept weights keep their values; pruned ones (1, 0), (2, 1) are exactly 0
  # and the grown ones of neuron 2 start at 0.
  np.testing.assert_array_equal(
      kernel, _values(d, n, {(0, 0): 0.9, (2, 0): 0.5, (1, 1): 0.8, (3, 1): 0.7})
  )
  _check_trace(inner, 'dense', old, new, g, g_bias)


# ---------------------------------------------------------------------------
# Step 3: tau = max(1, floor(gamma_sal * k0)), and the min-neurons guard.


def _spec(shape, sparsity):
  params = {'dense': {'kernel': jnp.zeros(shape)}}
  (spec,) = srigl_jax.build_layer_specs(
      params, sparsity=sparsity, distribution='uniform', no_ablation=()
  ).values()
  return spec


@pytest.mark.parametrize(
    'shape,sparsity,gamma,k0,tau',
    [
        # (6, 4) at 0.5: B = 12, k0 = 3.
        ((6, 4), 0.5, 0.5, 3, 1),  # 1.5 -> 1 (ceil would give 2)
        ((6, 4), 0.5, 0.7, 3, 2),  # 2.1 -> 2 (0.7 * 3 = 2.0999... in binary)
        ((6, 4), 0.5, 0.95, 3, 2),  # 2.85 -> 2
        ((6, 4), 0.5, 1.0, 3, 3),
        ((6, 4), 0.5, 0.2, 3, 1),  # 0.6 -> 0 -> raised to 1
        ((6, 4), 0.5, 0.3, 3, 1),  # 0.9 -> 0 -> raised to 1
        # (10, 4) at 0.3: B = floor(40 * 0.7) = 28, k0 = 7.
        ((10, 4), 0.3, 0.3, 7, 2),  # 2.1 -> 2
        ((10, 4), 0.3, 0.5, 7, 3),  # 3.5 -> 3
        ((10, 4), 0.3, 0.95, 7, 6),  # 6.65 -> 6
    ],
)
def test_ablation_threshold_floor_and_minimum(shape, sparsity, gamma, k0, tau):
  spec = _spec(shape, sparsity)
  assert spec.k0 == k0
  assert upd.ablation_threshold(spec, gamma) == tau


def test_min_neuron_guard_uses_the_m_plus_1th_largest_count():
  # (4, 6) at 0.5: B = 12, D = 4, m = floor(12 / 4) = 3, k0 = 2. gamma 1.0
  # gives tau = 2. Counts sorted down: 5, 4, 3 | 1 | 0, 0. The 4th largest
  # (m + 1 = 4) is 1 < 2, so tau drops to 1: only the two zeros are ablated.
  # The 3rd largest (3) would keep tau = 2 and ablate the 1 too; the 5th
  # largest (0) would make tau 0 and ablate nothing.
  spec = _spec((4, 6), 0.5)
  counts = jnp.array([1, 5, 0, 3, 4, 0], jnp.int32)
  got = np.asarray(upd.neurons_to_ablate(counts, spec, gamma_sal=1.0))
  np.testing.assert_array_equal(got, [False, False, True, False, False, True])
  # When the 4th largest is >= tau the guard does nothing: tau = 2 ablates
  # every count below 2.
  counts = jnp.array([2, 5, 0, 3, 4, 1], jnp.int32)
  got = np.asarray(upd.neurons_to_ablate(counts, spec, gamma_sal=1.0))
  np.testing.assert_array_equal(got, [False, False, True, False, False, True])
  # A neuron with exactly tau salient weights stays (strictly less ablates).
  counts = jnp.array([2, 2, 2, 2, 2, 2], jnp.int32)
  assert not np.asarray(upd.neurons_to_ablate(counts, spec, gamma_sal=1.0)).any()


# The layout shared by the next three cases: D = 6, N = 4, B = 12, k0 = 3,
# m = floor(12 / 6) = 2; alpha = 0.25 gives n_prune = floor(12 * 0.25) = 3,
# n_keep = 9. Neurons 0 and 1 hold rows 0-2, neurons 2 and 3 rows 3-5.
_D, _N = 6, 4
_OLD = _mask(_D, _N, {0: (0, 1, 2), 1: (0, 1, 2), 2: (3, 4, 5), 3: (3, 4, 5)})


def test_threshold_is_floor_not_ceil():
  # W: the three smallest are (5, 2) = 0.02, (4, 3) = 0.03, (5, 3) = 0.01; the
  # drop keeps 3, 3, 2, 1 weights per neuron. The top-3 |G| are (3, 0) = 9,
  # (4, 0) = 8, (3, 1) = 7, all inactive: counts c = [5, 4, 2, 1].
  # gamma 0.5: tau = floor(1.5) = 1; guard: the 3rd largest count is 2 >= 1.
  # Neuron 3 (c = 1) is not ablated, k' = 3. (ceil(1.5) = 2 would ablate it.)
  # Growth by |G| among each neuron's entries not kept: neuron 2 regrows row
  # 5 (G = 6; it was just dropped, so it keeps its value 0.02), neuron 3
  # grows rows 0 (G = 5, new, starts at 0) and 4 (G = 4, regrown, keeps 0.03).
  w = _values(
      _D,
      _N,
      {
          (0, 0): 0.9,
          (1, 0): 0.8,
          (2, 0): 0.7,
          (0, 1): 0.6,
          (1, 1): 0.55,
          (2, 1): 0.5,
          (3, 2): 0.45,
          (4, 2): 0.4,
          (5, 2): 0.02,
          (3, 3): 0.35,
          (4, 3): 0.03,
          (5, 3): 0.01,
      },
  )
  g = _values(
      _D,
      _N,
      {(3, 0): 9.0, (4, 0): 8.0, (3, 1): 7.0, (5, 2): 6.0, (0, 3): 5.0, (4, 3): 4.0},
      background=_small_distinct,
  )
  new, kernel, _, inner, g_bias = _one_update(_OLD, w, g, alpha=0.25, gamma_sal=0.5)
  np.testing.assert_array_equal(
      new, _mask(_D, _N, {0: (0, 1, 2), 1: (0, 1, 2), 2: (3, 4, 5), 3: (0, 3, 4)})
  )
  want = w.copy()
  want[5, 3] = 0.0  # pruned
  want[0, 3] = 0.0  # grown: starts at 0 (it was 0 anyway)
  np.testing.assert_array_equal(kernel, want)  # (5, 2) and (4, 3) kept their values
  _check_trace(inner, 'dense', _OLD, new, g, g_bias)


# W and G of the ablation cases: neuron 3 holds the three smallest weights and
# its gradients are high (6, 5, 4) but below the layer's top-3 (9.5, 9, 8), so
# none of them is salient. (3, 0) holds 0.77 although inactive: a stale value
# that must neither count as kept nor survive as the start of a new weight.
# Neuron 0's largest |G|, 9.5, is at a weight it keeps, (0, 0): growth must
# pass over it to the largest among its inactive entries.
_W_ABL = _values(
    _D,
    _N,
    {
        (0, 0): 0.9,
        (1, 0): 0.8,
        (2, 0): 0.7,
        (3, 0): 0.77,
        (0, 1): 0.6,
        (1, 1): 0.55,
        (2, 1): 0.5,
        (3, 2): 0.45,
        (4, 2): 0.4,
        (5, 2): 0.35,
        (3, 3): 0.03,
        (4, 3): 0.02,
        (5, 3): 0.01,
    },
)
_G_ABL = _values(
    _D,
    _N,
    {(0, 0): 9.5, (3, 0): 9.0, (4, 1): 8.0, (0, 2): 7.0, (0, 3): 6.0, (1, 3): 5.0, (2, 3): 4.0},
    background=_small_distinct,
)


def test_ablation_minimum_threshold_and_growth_only_for_active_neurons():
  # Drop: top-9 |W| among active weights = all of neurons 0-2 ((3, 0) = 0.77
  # is inactive and ranks below every active weight); neuron 3 loses all 3.
  # Top-3 |G|: (0, 0) (kept already), (3, 0), (4, 1): counts c = [4, 4, 3, 0].
  # gamma 0.2: floor(0.6) = 0, raised to tau = 1; guard: the 3rd largest is
  # 3 >= 1. Neuron 3 (c = 0) is ablated although its gradients (6, 5, 4) beat
  # most gradients the active neurons grow by: growth only tops up active
  # neurons. k' = floor(12 / 3) = 4 (from the 3 active neurons, not all 4):
  # neurons 0, 1, 2 grow one weight each, the largest |G| among their
  # inactive entries: (3, 0) (not (0, 0), which is active), (4, 1), (0, 2).
  new, kernel, _, inner, g_bias = _one_update(_OLD, _W_ABL, _G_ABL, alpha=0.25, gamma_sal=0.2)
  np.testing.assert_array_equal(
      new, _mask(_D, _N, {0: (0, 1, 2, 3), 1: (0, 1, 2, 4), 2: (0, 3, 4, 5), 3: ()})
  )
  want = _W_ABL.copy()
  want[3:, 3] = 0.0  # the ablated neuron has no weight left
  want[3, 0] = 0.0  # grown: starts at 0, not at the stale 0.77
  np.testing.assert_array_equal(kernel, want)
  _check_trace(inner, 'dense', _OLD, new, _G_ABL, g_bias)


def test_head_is_exempt_from_ablation():
  # The same weights and gradients in a layer named `head` (exempt by the
  # default no_ablation): neuron 3 is not ablated, k' = k0 = 3, and neuron 3
  # regrows its 3 largest |G| among rows 0-5: rows 0, 1, 2 (6, 5, 4). Neurons
  # 0-2 hold 3 already and grow nothing.
  new, kernel, _, inner, g_bias = _one_update(
      _OLD, _W_ABL, _G_ABL, alpha=0.25, gamma_sal=0.2, name='head'
  )
  np.testing.assert_array_equal(
      new, _mask(_D, _N, {0: (0, 1, 2), 1: (0, 1, 2), 2: (3, 4, 5), 3: (0, 1, 2)})
  )
  want = _W_ABL.copy()
  want[3:, 3] = 0.0  # dropped
  want[3, 0] = 0.0  # inactive: masked to 0
  np.testing.assert_array_equal(kernel, want)
  _check_trace(inner, 'head', _OLD, new, _G_ABL, g_bias)


def test_guard_end_to_end_with_adam_moments():
  # D = 4, N = 6, B = 12, k0 = 2, m = floor(12 / 4) = 3; gamma 1.0: tau = 2.
  # alpha = 0.45: n_prune = floor(12 * 0.45) = 5, n_keep = 7. Neurons 0-2 hold
  # rows 0-1, neurons 3-5 rows 2-3. The top-7 |W| keep 2, 2, 2, 1, 0, 0. The
  # top-5 |G|: (2, 0), (2, 1), (2, 2) (inactive: +1 each) and (0, 0), (1, 0)
  # (already kept). Counts c = [3, 3, 3, 1, 0, 0]; the 4th largest (m + 1) is
  # 1 < tau, so tau = 1: neurons 4 and 5 are ablated, n_active = 4, k' = 3.
  # (The 3rd largest would keep tau = 2 and ablate neuron 3 too, k' = 4; the
  # 5th would give tau = 0, no ablation, k' = 2.) Neurons 0-2 grow row 2;
  # neuron 3 regrows row 3 (G 0.5, keeps 0.05) and grows row 0 (G 0.4).
  d, n = 4, 6
  old = _mask(d, n, {0: (0, 1), 1: (0, 1), 2: (0, 1), 3: (2, 3), 4: (2, 3), 5: (2, 3)})
  w = _values(
      d,
      n,
      {
          (0, 0): 0.9,
          (1, 0): 0.85,
          (0, 1): 0.8,
          (1, 1): 0.75,
          (0, 2): 0.7,
          (1, 2): 0.65,
          (2, 3): 0.6,
          (3, 3): 0.05,
          (2, 4): 0.04,
          (3, 4): 0.03,
          (2, 5): 0.02,
          (3, 5): 0.01,
      },
  )
  g = _values(
      d,
      n,
      {(2, 0): 9.0, (2, 1): 8.0, (2, 2): 7.0, (0, 0): 6.5, (1, 0): 6.4, (3, 3): 0.5, (0, 3): 0.4},
      background=_small_distinct,
  )
  new, kernel, _, inner, g_bias = _one_update(
      old, w, g, alpha=0.45, gamma_sal=1.0, inner=optax.adam(0.0)
  )
  np.testing.assert_array_equal(
      new, _mask(d, n, {0: (0, 1, 2), 1: (0, 1, 2), 2: (0, 1, 2), 3: (0, 2, 3), 4: (), 5: ()})
  )
  want = w.copy()
  want[:, 4:] = 0.0  # ablated
  np.testing.assert_array_equal(kernel, want)  # (3, 3) regrown with its value
  # Adam's first and second moments after one step: (1 - b) * g and
  # (1 - b2) * g^2 where the weight was and stays active, 0 where the mask
  # changed (or the weight was never active); the dense bias keeps both.
  mu = optax.tree_utils.tree_get(inner, 'mu')
  nu = optax.tree_utils.tree_get(inner, 'nu')
  stays = old & new
  np.testing.assert_allclose(np.asarray(mu['dense']['kernel']), np.where(stays, 0.1 * g, 0.0))
  np.testing.assert_allclose(
      np.asarray(nu['dense']['kernel']), np.where(stays, 0.001 * g * g, 0.0), rtol=1e-6
  )
  assert (np.asarray(mu['dense']['kernel'])[old != new] == 0).all()
  np.testing.assert_allclose(np.asarray(mu['dense']['bias']), 0.1 * g_bias, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(nu['dense']['bias']), 0.001 * g_bias**2, rtol=1e-6)


# ---------------------------------------------------------------------------
# Step 1: the cosine drop fraction, n_prune = floor(n_ones * f_t), and the
# layer-wise drop by |W| (RigL: no per-neuron constraint).


@pytest.mark.parametrize('t,total', [(0, 1000), (1, 1000), (250, 1000), (500, 1000), (999, 1000)])
def test_drop_fraction_is_the_cosine_schedule(t, total):
  want = 0.3 / 2 * (1 + math.cos(math.pi * t / total))
  assert float(upd.drop_fraction(t, 0.3, total)) == pytest.approx(want, rel=1e-6, abs=1e-7)


def test_rigl_drop_count_follows_the_cosine_at_the_update_step():
  # D = N = 5, sparsity 0.2: B = 20; every entry but the diagonal is active.
  # alpha 0.5, stop_step 3, update_every 2, from count 1: the call is step 2,
  # an update step (2 % 2 == 0, 2 < 3). f_2 = 0.25 * (1 + cos(2 pi / 3)) =
  # 0.125 and n_prune = floor(20 * 0.125) = 2. (A linear decay, 1/6, would
  # drop 3; f = alpha would drop 10; alpha * (1 + cos) would drop 5; the cosine
  # at the old count, 0.375, would drop 7.) RigL drops the 2 smallest |W|
  # layer-wise, (0, 1) = 0.01 and (3, 4) = 0.02, keeps (1, 0) = 0.03, and
  # grows the 2 largest |G| among the entries not kept: (2, 2) = 5, (4, 4) = 4.
  # The diagonal holds stale non-zero weights (100): inactive weights rank
  # below every active one in the drop, and the grown ones start at 0.
  d = 5
  old = ~np.eye(d, dtype=bool)
  w = 1.0 + np.arange(d * d, dtype=np.float32).reshape(d, d) / 100
  w[0, 1], w[3, 4], w[1, 0] = 0.01, 0.02, 0.03
  w[np.eye(d, dtype=bool)] = 100.0
  g = _values(d, d, {(2, 2): 5.0, (4, 4): 4.0}, background=_small_distinct)
  new, kernel, _, inner, g_bias = _one_update(
      old, w, g, alpha=0.5, method='rigl', sparsity=0.2, count=1, stop_step=3, update_every=2
  )
  want_mask = old.copy()
  want_mask[0, 1] = want_mask[3, 4] = False
  want_mask[2, 2] = want_mask[4, 4] = True
  np.testing.assert_array_equal(new, want_mask)
  np.testing.assert_array_equal(kernel, np.where(old & want_mask, w, 0.0))
  _check_trace(inner, 'dense', old, new, g, g_bias)


def test_rigl_grows_by_gradient_among_inactive_and_regrows_with_value():
  # D = 3, N = 4, sparsity 0.5: B = 6. alpha 0.5: n_prune = 3, n_keep = 3.
  # Active: (0, 0) .9, (1, 0) .05, (0, 1) .8, (2, 1) .04, (1, 2) .7, (2, 3) .03.
  # Drop the 3 smallest |W| layer-wise: (1, 0), (2, 1), (2, 3); neuron 3
  # loses its only weight (RigL has no per-neuron constraint).
  # The largest |G| overall is (0, 0) = 50, but it is kept: growth picks the 3
  # largest among the entries not kept: (2, 3) = 9 (just dropped: regrown with
  # its value 0.03), (1, 1) = 8 and (2, 0) = 7 (new, start at 0).
  d, n = 3, 4
  old = _mask(d, n, {0: (0, 1), 1: (0, 2), 2: (1,), 3: (2,)})
  w = _values(
      d, n, {(0, 0): 0.9, (1, 0): 0.05, (0, 1): 0.8, (2, 1): 0.04, (1, 2): 0.7, (2, 3): 0.03}
  )
  g = _values(
      d, n, {(0, 0): 50.0, (2, 3): 9.0, (1, 1): 8.0, (2, 0): 7.0}, background=_small_distinct
  )
  new, kernel, _, inner, g_bias = _one_update(old, w, g, alpha=0.5, method='rigl')
  np.testing.assert_array_equal(new, _mask(d, n, {0: (0, 2), 1: (0, 1), 2: (1,), 3: (2,)}))
  np.testing.assert_array_equal(
      kernel, _values(d, n, {(0, 0): 0.9, (0, 1): 0.8, (1, 2): 0.7, (2, 3): 0.03})
  )
  _check_trace(inner, 'dense', old, new, g, g_bias)


# ---------------------------------------------------------------------------
# SET: random growth, uniform over the entries not kept.


def test_set_grows_uniformly_at_random():
  # D = 4, N = 3, B = 6, alpha 0.5: n_prune = 3. The drop keeps (0, 0),
  # (1, 1), (2, 2) (the 3 largest |W|) and drops (1, 0), (2, 1), (3, 2).
  # Growth picks 3 of the 9 entries not kept, at random: over many keys each
  # of the 9 (the just-dropped ones included) is grown with probability 1/3.
  # The gradient points hard at (3, 0), (0, 1), (0, 2): growing by gradient
  # would pick those three every time.
  d, n = 4, 3
  old = _mask(d, n, {0: (0, 1), 1: (1, 2), 2: (2, 3)})
  w = _values(d, n, {(0, 0): 0.9, (1, 0): 0.1, (1, 1): 0.8, (2, 1): 0.2, (2, 2): 0.7, (3, 2): 0.3})
  g = _values(d, n, {(3, 0): 9.0, (0, 1): 8.0, (0, 2): 7.0}, background=_small_distinct)
  params = {'dense': {'kernel': jnp.asarray(w)}}
  tx = srigl_jax.set_sparse(
      optax.sgd(0.0),
      sparsity=0.5,
      key=jax.random.key(0),
      stop_step=FAR,
      update_every=1,
      distribution='uniform',
      drop_fraction=0.5,
  )
  state = tx.init(params)
  state = state._replace(masks={'dense': {'kernel': jnp.asarray(old)}})
  grads = {'dense': {'kernel': jnp.asarray(g)}}

  def new_mask(key):
    _, s = tx.update(grads, state._replace(key=key), params)
    return srigl_jax.get_masks(s)['dense']['kernel']

  draws = 900
  masks = np.asarray(jax.jit(jax.vmap(new_mask))(jax.random.split(jax.random.key(7), draws)))
  kept = _mask(d, n, {0: (0,), 1: (1,), 2: (2,)})
  assert masks[:, kept].all()
  assert (masks.sum(axis=(1, 2)) == 6).all()  # exactly n_prune = 3 grown
  counts = masks[:, ~kept].sum(0)  # grows per eligible entry, 9 entries
  expected = draws / 3
  chi2 = float(((counts - expected) ** 2 / expected).sum())
  # 8 degrees of freedom; 31.83 is the 0.9999 quantile (fixed keys, so the
  # test is deterministic; the bound only says the draw is plausible).
  assert chi2 < 31.83, (counts, chi2)
  # The just-dropped entries are eligible like any other inactive entry.
  dropped = _mask(d, n, {0: (1,), 1: (2,), 2: (3,)})
  assert masks[:, dropped].sum() > 0


# ---------------------------------------------------------------------------
# Static sparse training never changes the mask.


def test_static_masks_never_change():
  rng = np.random.default_rng(0)
  params = {
      'dense': {'kernel': jnp.asarray(rng.normal(size=(12, 8)), jnp.float32)},
      'head': {'kernel': jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)},
  }
  tx = srigl_jax.static_sparse(
      optax.sgd(0.1, momentum=0.9),
      sparsity=0.75,
      key=jax.random.key(3),
      update_every=1,
      stop_step=FAR,
      distribution='uniform',
  )
  state = tx.init(params)
  first = jax.tree.map(np.asarray, srigl_jax.get_masks(state))
  assert first['dense']['kernel'].sum() == 24 and first['head']['kernel'].sum() == 6

  @jax.jit
  def step(params, state, key):
    g = jax.tree.map(lambda p: jax.random.normal(key, p.shape) * 10, params)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state

  for t in range(30):
    params, state = step(params, state, jax.random.key(t))
    masks = srigl_jax.get_masks(state)
    for name in ('dense', 'head'):
      m = np.asarray(masks[name]['kernel'])
      np.testing.assert_array_equal(m, first[name]['kernel'])
      assert (np.asarray(params[name]['kernel'])[~m] == 0).all()
  assert (np.asarray(params['dense']['kernel'])[first['dense']['kernel']] != 0).all()
