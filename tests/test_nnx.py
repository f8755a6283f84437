"""Flax NNX: the sparse optimizer on `nnx.state(model, nnx.Param)`.

An NNX state holds each array inside an `nnx.Param` Variable, whose key path
ends in the Variable's `value` attribute ('linear1/kernel/value'), and
`nnx.Optimizer` hands `tx.init` that state but `tx.update` plain arrays. Here
small NNX models (two `nnx.Linear` layers and a head; two `nnx.Conv` layers and
a head) train through `nnx.Optimizer`, and after every mask update each sparse
layer keeps its budget and constant fan-in, masked and ablated weights are
exactly 0 in the model itself, newly grown weights start at 0 with their Adam
moments reset, and the masks and weights equal, bit for bit, those of the same
model written in Linen and trained on the same data. The plain use (`tx.init`
/ `tx.update` on NNX states, without `nnx.Optimizer`) gives the same masks.
Then: `nnx.MultiHeadAttention` kernels get Linen's fan-in axes; a sparse
optimizer that selects no layer is refused at `init`; `convert_model` refuses
NNX models.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import srigl_jax
from srigl_jax.sparsity import NoSparseLayerError

UPDATE_EVERY = 3
STEPS = 24  # 8 mask updates; stop_step is beyond the last step


class MLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.linear1 = nnx.Linear(16, 32, rngs=rngs)
    self.linear2 = nnx.Linear(32, 32, rngs=rngs)
    self.head = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.linear1(x))
    x = nnx.relu(self.linear2(x))
    return self.head(x)


class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32, name='linear1')(x))
    x = nn.relu(nn.Dense(32, name='linear2')(x))
    return nn.Dense(10, name='head')(x)


class CNN(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, (3, 3), rngs=rngs)
    self.head = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    return self.head(x.mean(axis=(1, 2)))


class LinenCNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name='conv1')(x))
    x = nn.relu(nn.Conv(16, (3, 3), name='conv2')(x))
    return nn.Dense(10, name='head')(x.mean(axis=(1, 2)))


def _tx():
  return srigl_jax.srigl(
      optax.adam(1e-2),
      sparsity=0.8,
      update_every=UPDATE_EVERY,
      stop_step=STEPS + 10,
      gamma_sal=0.3,
      key=jax.random.key(2),
  )


def _data(kind):
  if kind == 'mlp':
    x = jax.random.normal(jax.random.key(0), (64, 16))
    return x, jnp.argmax(x[:, :10], axis=1)
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
  return x, jax.random.randint(jax.random.key(1), (16,), 0, 10)


def _loss(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _leaves(tree):
  """path -> numpy array of a tree, NNX Variables unwrapped."""
  flat = jax.tree_util.tree_leaves_with_path(nnx.as_pure(tree))
  return {srigl_jax.sparsity.layers.path_str(kp): np.asarray(x) for kp, x in flat}


def _matrix(w, spec):
  """The (fan-in, neurons) matrix of a kernel (`updates.to_matrix` in numpy)."""
  return np.transpose(w, spec.perm).reshape(spec.fan_in, -1)


def _check_layers(state, params):
  """Budget, constant fan-in, no weight on ablated neurons or masked positions."""
  params = _leaves(params)
  for path, m in _leaves(state.masks).items():
    spec = state.layers.by_path()[path]
    per = _matrix(m, spec).sum(axis=0)
    active = per > 0
    k, n_active = int(per.max()), int(active.sum())
    # The layer's budget B, up to the floor of B / active neurons.
    assert k * n_active <= spec.budget < (k + 1) * n_active, path
    assert np.all(per[active] == k), path
    if not spec.ablation:
      assert n_active == spec.num_neurons, path
    w = params[path]
    assert np.all(w[~m] == 0), path
    assert np.all(_matrix(w, spec)[:, ~active] == 0), path


@pytest.mark.parametrize('kind', ['mlp', 'cnn'])
def test_nnx_optimizer_trains_constant_fan_in_like_linen(kind):
  nnx_model, linen_model = {'mlp': (MLP, LinenMLP), 'cnn': (CNN, LinenCNN)}[kind]
  x, y = _data(kind)
  model = nnx_model(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
  state = srigl_jax.find_sparse_state(optimizer.opt_state)
  sparse = {'mlp': {'linear1', 'linear2', 'head'}, 'cnn': {'conv1', 'conv2', 'head'}}[kind]
  assert {s.path for s in state.layers.specs} == {f'{name}/kernel' for name in sparse}
  sparse_init = jax.jit(srigl_jax.sparse_init)
  nnx.update(
      model, sparse_init(nnx.state(model, nnx.Param), optimizer.opt_state, jax.random.key(3))
  )
  _check_layers(state, nnx.state(model, nnx.Param))

  # The same kernels in Linen's layout (NNX attribute names are Linen's module
  # names) and the same key: the same masks.
  tx = _tx()
  linen_params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  linen_state = tx.init(linen_params)
  for a, b in zip(jax.tree.leaves(state.masks), jax.tree.leaves(linen_state.masks), strict=True):
    np.testing.assert_array_equal(a, b)

  @nnx.jit
  def nnx_step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: _loss(m(x), y))(model)
    optimizer.update(model, grads)
    return loss

  @jax.jit
  def linen_step(params, opt_state):
    loss, grads = jax.value_and_grad(lambda p: _loss(linen_model().apply({'params': p}, x), y))(
        params
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses, moved = [], set()
  for step in range(1, STEPS + 1):
    old_masks = srigl_jax.get_masks(optimizer.opt_state)
    losses.append(float(nnx_step(model, optimizer)))
    linen_params, linen_state, _ = linen_step(linen_params, linen_state)
    if step % UPDATE_EVERY:
      continue
    state = srigl_jax.find_sparse_state(optimizer.opt_state)
    params = nnx.state(model, nnx.Param)
    assert int(state.count) == step
    _check_layers(state, params)
    mu = optax.tree_utils.tree_get(state.inner_state, 'mu')
    nu = optax.tree_utils.tree_get(state.inner_state, 'nu')
    old, weights, mu, nu = map(_leaves, (old_masks, params, mu, nu))
    for path, new in _leaves(state.masks).items():
      changed = new != old[path]
      moved.update([path] if changed.any() else [])
      assert np.all(weights[path][new & changed] == 0), path  # grown weights start at 0
      assert np.all(mu[path][changed] == 0) and np.all(nu[path][changed] == 0), path
    # The Linen model, same kernels, key and data: the same masks and weights.
    for a, b in zip(jax.tree.leaves(state.masks), jax.tree.leaves(linen_state.masks), strict=True):
      np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree.leaves(nnx.to_pure_dict(params)), jax.tree.leaves(linen_params), strict=True
    ):
      np.testing.assert_array_equal(a, b)
  assert moved == {f'{name}/kernel' for name in sparse}  # every layer's mask moved
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])


def test_plain_tx_on_nnx_states_matches_nnx_optimizer():
  x, y = _data('mlp')
  loss_fn = lambda m: _loss(m(x), y)

  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _tx(), wrt=nnx.Param)
  step = nnx.jit(lambda m, o: o.update(m, nnx.grad(loss_fn)(m)))
  for _ in range(2 * UPDATE_EVERY):
    step(model, optimizer)

  model2 = MLP(nnx.Rngs(0))
  tx = _tx()
  params = nnx.state(model2, nnx.Param)
  opt_state = tx.init(params)
  graphdef, params, rest = nnx.split(model2, nnx.Param, ...)

  @jax.jit
  def plain_step(params, opt_state):
    grads = nnx.grad(loss_fn)(nnx.merge(graphdef, params, rest))
    updates, opt_state = tx.update(grads, opt_state, params)
    # Updates come back in the grads' Param Variables, so optax applies them.
    assert isinstance(updates['linear1']['kernel'], nnx.Param)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(2 * UPDATE_EVERY):
    new_params, new_state = plain_step(params, opt_state)
    assert jax.tree.structure(new_state) == jax.tree.structure(opt_state)
    params, opt_state = new_params, new_state
  nnx.update(model2, params)

  for a, b in zip(
      jax.tree.leaves(srigl_jax.get_masks(opt_state)),
      jax.tree.leaves(srigl_jax.get_masks(optimizer.opt_state)),
      strict=True,
  ):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(
      jax.tree.leaves(nnx.state(model2, nnx.Param)),
      jax.tree.leaves(nnx.state(model, nnx.Param)),
      strict=True,
  ):
    np.testing.assert_array_equal(a, b)


def test_mask_helpers_on_nnx_states():
  model = MLP(nnx.Rngs(0))
  tx = _tx()
  opt_state = tx.init(nnx.state(model, nnx.Param))
  masks = srigl_jax.get_masks(opt_state)
  assert masks['linear1']['kernel'].dtype == jnp.bool_ and masks['linear1']['bias'] is None

  masked = srigl_jax.apply_masks(nnx.state(model, nnx.Param), opt_state)
  assert isinstance(masked['linear1']['kernel'], nnx.Param)
  nnx.update(model, masked)
  kernel = np.asarray(model.linear1.kernel[...])
  assert np.all(kernel[~np.asarray(masks['linear1']['kernel'])] == 0)
  assert np.any(kernel != 0)

  new = srigl_jax.sparse_init(nnx.state(model, nnx.Param), opt_state, jax.random.key(1))
  assert isinstance(new['linear1']['kernel'], nnx.Param)
  nnx.update(model, new)
  stats = srigl_jax.layer_stats(opt_state)
  assert set(stats) == {'linear1/kernel', 'linear2/kernel', 'head/kernel'}
  for name in ('linear1', 'linear2', 'head'):
    w, m = np.asarray(getattr(model, name).kernel[...]), np.asarray(masks[name]['kernel'])
    assert np.all(w[~m] == 0) and np.all(w[m] != 0)
    assert int(stats[f'{name}/kernel']['fan_in']) == int(m.sum(axis=0).max())
  assert 0.75 < float(srigl_jax.global_sparsity(opt_state, nnx.state(model, nnx.Param))) < 0.8


def test_nnx_attention_kernels_get_linen_fan_in_axes():
  nnx_attention = nnx.MultiHeadAttention(
      num_heads=2, in_features=16, qkv_features=16, decode=False, rngs=nnx.Rngs(0)
  )
  linen_params = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=16).init(
      jax.random.key(0), jnp.zeros((1, 4, 16))
  )['params']
  kwargs = dict(sparsity=0.8, distribution='uniform')
  specs = srigl_jax.build_layer_specs(nnx.state(nnx_attention, nnx.Param), **kwargs)
  assert specs == srigl_jax.build_layer_specs(linen_params, **kwargs)
  assert {p: s.fan_in_axes for p, s in specs.items()} == {
      'key/kernel': (0,),
      'out/kernel': (0, 1),
      'query/kernel': (0,),
      'value/kernel': (0,),
  }


def test_no_layer_to_sparsify_is_refused_at_init():
  params = {f'w{i}': jnp.zeros((4, 4)) for i in range(8)}
  tx = srigl_jax.srigl(optax.sgd(0.1), sparsity=0.9, stop_step=10, key=jax.random.key(0))
  with pytest.raises(NoSparseLayerError) as info:
    tx.init(params)
  message = str(info.value)
  assert info.value.argument == 'sparse_rule'
  assert message.startswith('No layer to sparsify at sparsity=0.9: training would stay dense.')
  assert "sparse_rule='kernels' (every leaf named 'kernel' of rank >= 2)" in message
  assert "matched none of the 8 parameter(s) given: 'w0' (4, 4)," in message
  assert '... (2 more)' in message
  assert 'nnx.state(model, nnx.Param)' in message and "method='dense'" in message

  # Every kernel kept dense by dense_layers.
  tx = srigl_jax.srigl(
      optax.sgd(0.1), sparsity=0.9, stop_step=10, key=jax.random.key(0), dense_layers=('.*',)
  )
  with pytest.raises(NoSparseLayerError) as info:
    tx.init({'a': {'kernel': jnp.zeros((4, 4))}})
  assert info.value.argument == 'dense_layers'
  assert "dense_layers=('.*',) keeps every one dense: 'a/kernel' (4, 4)" in str(info.value)

  # Dense training on purpose is accepted.
  for kwargs in (dict(method='dense', sparsity=0.9), dict(method='srigl', sparsity=0.0)):
    tx = srigl_jax.sparse_optimizer(optax.sgd(0.1), stop_step=10, key=jax.random.key(0), **kwargs)
    assert tx.init(params).layers.specs == ()


def test_convert_model_refuses_nnx():
  model = MLP(nnx.Rngs(0))
  x = jnp.zeros((1, 16))
  masks = srigl_jax.get_masks(_tx().init(nnx.state(model, nnx.Param)))
  with pytest.raises(TypeError, match='Flax NNX models are not supported yet'):
    srigl_jax.convert_model(model, {'params': nnx.state(model, nnx.Param)}, masks, x)
  with pytest.raises(TypeError, match=r'got Flax NNX variables .*flax\.linen\.Module'):
    srigl_jax.convert_model(LinenMLP(), nnx.state(model, nnx.Param), masks, x)
  with pytest.raises(TypeError, match='to_pure_dict'):
    srigl_jax.convert_model(LinenMLP(), {'params': nnx.state(model, nnx.Param)}, masks, x)

  # The workaround the message gives: the same model in Linen, plain arrays.
  converted = srigl_jax.convert_model(
      LinenMLP(), {'params': nnx.to_pure_dict(nnx.state(model, nnx.Param))}, masks, x
  )
  masked = srigl_jax.apply_masks(nnx.state(model, nnx.Param), masks)
  nnx.update(model, masked)
  np.testing.assert_allclose(converted.apply(x), model(x), rtol=1e-5, atol=1e-6)
