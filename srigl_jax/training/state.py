"""The train state and its initialisation.

`TrainState` is flax's TrainState plus BatchNorm statistics; `make_init_fn`
builds the function that `jax.eval_shape` traces before anything is compiled
(the sparse optimizer's init checks every layer's fan-in) and `jax.jit` runs
to create the first state.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax.training import train_state

from srigl_jax import config_lib
from srigl_jax.sparsity import transform as sparse_transform

# The values of `sparsity.init`: He-normal with each neuron's sparse fan-in, or
# the model's own init with the masked weights zeroed.
INITS = ('sparse_he', 'masked')


class TrainState(train_state.TrainState):
  """Flax TrainState plus BatchNorm statistics.

  `opt_state` holds the sparse optimizer's `SparseState` (masks included), so
  `srigl_jax.get_masks(state)` and `srigl_jax.layer_stats(state)` work on it.
  """

  batch_stats: Any = flax.struct.field(default_factory=dict)


def make_init_fn(
    config, model, tx, image_shape, reinit_key, call_order: dict[str, int] | None = None
):
  """Builds `init(key) -> TrainState` (for `jax.eval_shape` and `jax.jit`).

  Args:
    config: the full config (`sparsity.init` picks the sparse re-init).
    model: the Flax module.
    tx: the sparse optimizer.
    image_shape: (H, W, C) of the inputs.
    reinit_key: PRNG key of the sparse He re-initialisation.
    call_order: if given, filled with module path -> call index during the
      first trace, to list layers input side first (pytrees sort dict keys,
      which puts 'head' before 'stem' and 'block10' before 'block2').

  Returns:
    The init function.

  Raises:
    ConfigError: an unknown `sparsity.init`.
  """
  if config.sparsity.init not in INITS:
    raise config_lib.ConfigError(
        f'sparsity.init={config.sparsity.init!r} is unknown. Fix: use one of {list(INITS)}.',
        field='sparsity.init',
    )
  order = {} if call_order is None else call_order

  def record_call(next_fun, args, kwargs, context):
    if context.method_name == '__call__':
      order.setdefault('/'.join(context.module.path), len(order))
    return next_fun(*args, **kwargs)

  def init(key):
    params_key, dropout_init_key = jax.random.split(key)
    dummy = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    with flax.linen.intercept_methods(record_call):
      variables = model.init(
          {'params': params_key, 'dropout': dropout_init_key}, dummy, train=False
      )
    params = variables['params']
    opt_state = tx.init(params)
    if config.sparsity.init == 'sparse_he':
      params = sparse_transform.sparse_init(params, opt_state, reinit_key)
    else:
      params = sparse_transform.apply_masks(params, opt_state)
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        apply_fn=model.apply,
        params=params,
        tx=tx,
        opt_state=opt_state,
        batch_stats=variables.get('batch_stats', {}),
    )

  return init
