"""The jitted steps: train (with gradient accumulation), eval, mask statistics.

Each `make_*` returns a plain function that the trainer loop jits with its
shardings and donated buffers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from srigl_jax.sparsity import transform as sparse_transform
from srigl_jax.training import faults
from srigl_jax.training.state import TrainState

_LAYER_FIELDS = ('density', 'active_neurons', 'neurons', 'fan_in', 'min_fan_in')


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy; labels are int ids or soft targets."""
  num_classes = logits.shape[-1]
  if labels.ndim == logits.ndim:
    targets = labels.astype(jnp.float32)
  else:
    targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _hard_labels(labels):
  return jnp.argmax(labels, -1) if labels.ndim == 2 else labels


def _variables(params, batch_stats):
  return {'params': params, 'batch_stats': batch_stats} if batch_stats else {'params': params}


def make_train_step(model, config, dropout_key, batch_sharding):
  """Builds `train_step(state, batch) -> (state, metrics)` (not yet jitted)."""
  accum = int(config.optim.grad_accum_steps)
  smoothing = float(config.optim.label_smoothing)
  skip_bad_steps = bool(config.get('skip_bad_steps', False))

  def loss_fn(params, batch_stats, batch, rng):
    logits, new_vars = model.apply(
        _variables(params, batch_stats),
        batch['image'],
        train=True,
        mutable=['batch_stats'],
        rngs={'dropout': rng},
    )
    loss = jnp.mean(cross_entropy(logits, batch['label'], smoothing))
    correct = jnp.mean((jnp.argmax(logits, -1) == _hard_labels(batch['label'])).astype(jnp.float32))
    return loss, (new_vars.get('batch_stats', batch_stats), correct)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, batch):
    rng = jax.random.fold_in(dropout_key, state.step)
    if accum == 1:
      (loss, (batch_stats, acc)), grads = grad_fn(state.params, state.batch_stats, batch, rng)
    else:
      # Micro-batch i takes rows i, i + accum, ... so that every device holds
      # its share of every micro-batch (a contiguous split would put each
      # micro-batch on a few devices only).
      def split(x):
        x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
        x = jnp.swapaxes(x, 0, 1)
        return jax.lax.with_sharding_constraint(
            x,
            jax.sharding.NamedSharding(
                batch_sharding.mesh, jax.sharding.PartitionSpec(None, 'data')
            ),
        )

      micro = jax.tree.map(split, batch)
      zeros = jax.tree.map(jnp.zeros_like, state.params)

      def body(carry, xs):
        g_sum, loss_sum, acc_sum, bs = carry
        mb, i = xs
        (loss, (bs, acc)), g = grad_fn(state.params, bs, mb, jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, g_sum, g), loss_sum + loss, acc_sum + acc, bs), None

      (grads, loss, acc, batch_stats), _ = jax.lax.scan(
          body, (zeros, 0.0, 0.0, state.batch_stats), (micro, jnp.arange(accum))
      )
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss, acc = loss / accum, acc / accum
    finite = faults.finite_flags(grads)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if skip_bad_steps:
      new_state = faults.keep_if_finite(faults.step_ok(loss, finite), new_state, state)
    return new_state, {'loss': loss, 'accuracy': acc, faults.GRAD_FINITE: finite}

  return train_step


def make_eval_step(model):
  """Builds `eval_step(state, batch) -> sums` over the real (mask 1) rows."""

  def eval_step(state, batch):
    logits = model.apply(_variables(state.params, state.batch_stats), batch['image'], train=False)
    mask = batch['mask']
    correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
    loss = cross_entropy(logits, batch['label'])
    return {
        'correct': jnp.sum(correct * mask),
        'loss': jnp.sum(loss * mask),
        'count': jnp.sum(mask),
    }

  return eval_step


def sparsity_metrics(state: TrainState) -> dict[str, jax.Array]:
  """Global sparsity and per-layer mask statistics as flat scalar metrics."""
  out = {'global_sparsity': sparse_transform.global_sparsity(state.opt_state, state.params)}
  for path, stats in sparse_transform.layer_stats(state.opt_state).items():
    for field in _LAYER_FIELDS:
      out[f'{path}/{field}'] = stats[field]
  return out
