"""Randomised invariant checks of the sparse optimizer over many mask updates.

Each case draws a random model (Dense, Conv, attention q/k/v and out kernels,
a classifier head), a method (srigl/rigl/set), a sparsity in [0.5, 0.995]
(clipped to what every layer can take), gamma_sal in [0, 1] and a gradient
accumulation, then runs many mask updates with random gradients and checks,
after every update and every layer:

  * SRigL: every active neuron has the same fan-in k' = B // n_active, so
    k' * n_active <= B < (k' + 1) * n_active; layers exempt from ablation (the
    head) and runs with gamma_sal = 0 keep every neuron;
  * RigL/SET: exactly B non-zeros;
  * every pruned weight and every ablated neuron's weights are exactly 0, and
    so is the momentum at masked positions;
  * no NaN or inf anywhere.

Compilation dominates on CPU, so a case compiles one step (its shapes and
sparsity are fixed) and reuses it for all its updates. The CI run takes 3
cases (conv + attention + head with ablation, dense + head with gradient
accumulation, RigL); SRIGL_LONG_TESTS=1 runs 24 with more updates each
(SRIGL_INVARIANT_SEED picks another draw).
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import srigl_jax
from srigl_jax.sparsity import updates as upd

LONG = os.environ.get('SRIGL_LONG_TESTS') == '1'
SEED = int(os.environ.get('SRIGL_INVARIANT_SEED', '0'))
N_CASES = 24 if LONG else 3
N_UPDATES = 120 if LONG else 20


@dataclasses.dataclass(frozen=True)
class Case:
  shapes: dict[str, tuple[int, ...]]
  method: str
  sparsity: float
  distribution: str
  gamma_sal: float
  grad_accumulation: int
  update_every: int
  seed: int


# CI: every kind of layer once, in as few layers as possible (each compiles).
CI_KINDS = (('conv', 'attention'), ('dense',), ('dense',))


def _draw_shapes(rng: np.random.Generator, kinds=None) -> dict[str, tuple[int, ...]]:
  shapes = {}
  if kinds is None:
    kinds = rng.choice(['dense', 'conv', 'attention'], size=rng.integers(1, 4))
  for i, kind in enumerate(kinds):
    if kind == 'dense':
      shapes[f'dense_{i}/kernel'] = (int(rng.integers(8, 97)), int(rng.integers(4, 65)))
    elif kind == 'conv':
      k = int(rng.choice([1, 3]))
      shapes[f'conv_{i}/kernel'] = (k, k, int(rng.integers(2, 17)), int(rng.integers(4, 33)))
    else:
      embed, heads = int(rng.integers(8, 33)), int(rng.integers(1, 5))
      head_dim = int(rng.integers(2, 9))
      for name in ('query', 'key', 'value'):
        shapes[f'attn_{i}/{name}/kernel'] = (embed, heads, head_dim)
      shapes[f'attn_{i}/out/kernel'] = (heads, head_dim, embed)
  shapes['head/kernel'] = (int(rng.integers(8, 65)), int(rng.integers(2, 11)))
  return shapes


def _params(shapes) -> dict:
  params: dict = {}
  for path, shape in shapes.items():
    *parents, leaf = path.split('/')
    node = params
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.zeros(shape, jnp.float32)
    node['bias'] = jnp.zeros(shape[-1:], jnp.float32)  # A dense leaf.
  return params


def _specs(case: Case, sparsity: float):
  return srigl_jax.build_layer_specs(
      _params(case.shapes),
      sparsity=sparsity,
      distribution=case.distribution,
      constant_fan_in=case.method == 'srigl',
  )


def _clip_sparsity(case: Case) -> float:
  """The drawn sparsity, lowered until every layer can take it."""
  s = case.sparsity
  while s > 0.0:
    try:
      _specs(case, s)
      return s
    except ValueError:
      s = round(s - 0.005, 6)
  raise AssertionError(f'no valid sparsity for {case}')


def draw_case(index: int) -> Case:
  rng = np.random.default_rng([SEED, index])
  method = (
      ['srigl', 'srigl', 'rigl', 'set'][index % 4]
      if LONG
      else ['srigl', 'srigl', 'rigl'][index % 3]
  )
  update_every = int(rng.integers(1, 5))
  # CI: the second SRigL case (and odd long cases) accumulates gradients.
  accum = int(rng.integers(2, update_every + 2)) if index % 2 else 1
  update_every = max(update_every, accum)
  case = Case(
      shapes=_draw_shapes(rng, None if LONG else CI_KINDS[index]),
      method=method,
      # Half the draws near the top of the range, where fan-ins are 1-3.
      sparsity=float(rng.uniform(0.5, 0.995) if rng.random() < 0.5 else rng.uniform(0.97, 0.995)),
      distribution=str(rng.choice(['erk', 'uniform'])),
      gamma_sal=(0.0 if index % 5 == 4 else float(rng.uniform(0.3 if index == 0 else 0.0, 1.0))),
      grad_accumulation=accum,
      update_every=update_every,
      seed=index,
  )
  return dataclasses.replace(case, sparsity=_clip_sparsity(case))


def _make_run(case: Case):
  """The optimizer, its initial state and params, and one jitted step."""
  tx = srigl_jax.sparse_optimizer(
      optax.sgd(0.5, momentum=0.9),
      method=case.method,
      sparsity=case.sparsity,
      key=jax.random.key(case.seed),
      stop_step=10**9,
      distribution=case.distribution,
      update_every=case.update_every,
      drop_fraction=0.5,
      gamma_sal=case.gamma_sal,
      grad_accumulation=case.grad_accumulation,
  )

  @jax.jit
  def init(params):
    # One compile instead of one per eager op of the mask draw.
    opt_state = tx.init(params)
    return srigl_jax.sparse_init(params, opt_state, jax.random.key(case.seed + 1)), opt_state

  params, opt_state = init(_params(case.shapes))
  specs = opt_state.layers.by_path()

  def random_grads(key, scales):
    # Per-neuron scales spread over four decades make some neurons' weights
    # and gradients small, so SRigL ablates them.
    def leaf(kp, p):
      path = srigl_jax.sparsity.layers.path_str(kp)
      g = jax.random.normal(
          jax.random.fold_in(key, zlib.crc32(path.encode())), p.shape, jnp.float32
      )
      if path in specs:
        g = upd.from_matrix(upd.to_matrix(g, specs[path]) * scales[path][None], specs[path])
      return g

    return jax.tree_util.tree_map_with_path(leaf, params)

  @jax.jit
  def step(params, opt_state, key, scales):
    grads = random_grads(key, scales)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return params, opt_state, specs, step


def _matrix(x, spec) -> np.ndarray:
  """numpy twin of `updates.to_matrix` (eager jnp would compile per shape)."""
  return np.transpose(np.asarray(x), spec.perm).reshape(spec.fan_in, spec.num_neurons)


def check_invariants(case: Case, params, opt_state, specs, where: str) -> int:
  """Asserts the invariants of the module doc; returns ablated neurons."""
  params, masks, trace = jax.device_get(
      (params, srigl_jax.get_masks(opt_state), opt_state.inner_state[0].trace)
  )
  masks = dict(jax.tree_util.tree_leaves_with_path(masks))
  flat_params = dict(jax.tree_util.tree_leaves_with_path(params))
  trace = dict(jax.tree_util.tree_leaves_with_path(trace))
  for leaf in jax.tree.leaves(params) + list(trace.values()):
    assert np.all(np.isfinite(np.asarray(leaf))), f'{where}: non-finite value'
  ablated_total = 0
  assert len(masks) == len(specs)
  for kp, mask in masks.items():
    path = srigl_jax.sparsity.layers.path_str(kp)
    spec = specs[path]
    m = _matrix(mask, spec)
    w = _matrix(flat_params[kp], spec)
    mom = _matrix(trace[kp], spec)
    at = f'{where}, layer {path} {spec.shape}'
    assert np.all(w[~m] == 0.0), f'{at}: a pruned weight is not exactly 0'
    assert np.all(mom[~m] == 0.0), f'{at}: momentum at a pruned weight'
    per = m.sum(0)
    b = spec.budget
    if case.method == 'srigl':
      active = per > 0
      n_active = int(active.sum())
      assert n_active >= 1, f'{at}: every neuron ablated'
      k = per[active]
      assert np.all(k == k[0]), f'{at}: fan-in not constant: {np.unique(k)}'
      k = int(k[0])
      assert (
          k * n_active <= b < (k + 1) * n_active
      ), f'{at}: fan-in {k} x {n_active} active neurons vs budget {b}'
      assert k <= spec.fan_in
      assert np.all(w[:, ~active] == 0.0), f'{at}: ablated neuron not empty'
      if not spec.ablation or case.gamma_sal == 0.0:
        assert n_active == spec.num_neurons, f'{at}: ablated without ablation'
      ablated_total += spec.num_neurons - n_active
    else:
      assert int(m.sum()) == b, f'{at}: {int(m.sum())} non-zeros, budget {b}'
  return ablated_total


CASES = [draw_case(i) for i in range(N_CASES)]


@pytest.mark.parametrize(
    'case',
    CASES,
    ids=[
        f'{c.method}-s{c.sparsity:.3f}-g{c.gamma_sal:.2f}-acc{c.grad_accumulation}'
        f'-{len(c.shapes)}layers'
        for c in CASES
    ],
)
def test_invariants_hold_after_every_update(case):
  params, opt_state, specs, step = _make_run(case)
  assert specs, case
  check_invariants(case, params, opt_state, specs, 'init')
  rng = np.random.default_rng(case.seed)
  scales = {
      p: jnp.asarray(10.0 ** rng.uniform(-4, 0, s.num_neurons), jnp.float32)
      for p, s in specs.items()
  }
  key = jax.random.key(case.seed + 2)
  ablated = 0
  for i in range(N_UPDATES * case.update_every):
    params, opt_state = step(params, opt_state, jax.random.fold_in(key, i), scales)
    if (i + 1) % case.update_every == 0:
      ablated += check_invariants(case, params, opt_state, specs, f'{case} after step {i + 1}')
  assert int(opt_state.count) == N_UPDATES * case.update_every
  assert step._cache_size() == 1  # pylint: disable=protected-access
  if case.method == 'srigl' and case.gamma_sal >= 0.3:
    # Otherwise the ablation invariants above were never exercised.
    assert ablated > 0, 'no neuron was ever ablated'
