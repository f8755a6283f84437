"""A loaded model: `InferenceModel`, and the apply function of an artefact's variables.

`apply_fn(model, kind, plan, impl)` is how an artefact's variables are run: the
Flax module itself for a 'dense' artefact, `condensed.ConvertedModel` for a
'condensed' one. `srigl_jax.export` verifies the converted model with the same
function that `InferenceModel` jits.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from srigl_jax import condensed
from srigl_jax.serving.preprocessing import apply_preprocessing

_log = logging.getLogger(__name__)
_ASYNC_FLAG = 'jax_cpu_enable_async_dispatch'


def _cpu_client_exists() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top

    return bool(xla_bridge.backends_are_initialized())
  except (ImportError, AttributeError):
    return True  # Unknown: assume the setting can no longer take effect.


def choose_cpu_dispatch(sync: bool = True) -> bool:
  """Sets JAX's CPU dispatch for one-at-a-time serving; returns whether it applies.

  With asynchronous dispatch (JAX's default) a CPU computation is handed to
  a worker thread and the caller blocks until that thread wakes it again. A
  server that answers one request at a time waits for every result anyway,
  so the hand-off only adds two thread wake-ups per call: the loaded default
  model (MLP 784-1024-1024-10 at 90%, batch 1, 2-core AVX-512 Xeon) took a
  median 64-66 us with synchronous dispatch against 82-99 us with the
  default, in separate processes. Synchronous dispatch runs the computation
  on the calling thread.

  JAX reads ``jax_cpu_enable_async_dispatch`` once, when it creates its CPU
  client (the process's first computation or array), so this only takes
  effect before that; afterwards the process keeps the dispatch it has and
  this logs why.

  Args:
    sync: True for synchronous dispatch (one call at a time); False for
      asynchronous (a caller that overlaps Python work with computation).

  Returns:
    Whether the setting takes effect (no CPU client existed yet).
  """
  if jax.config.values.get(_ASYNC_FLAG) is None:
    return False
  if _cpu_client_exists():
    if bool(jax.config.values[_ASYNC_FLAG]) == sync:
      _log.info(
          'JAX already runs; it keeps %s CPU dispatch. For one-at-a-time serving load '
          'the model before any other JAX computation, or set '
          'JAX_CPU_ENABLE_ASYNC_DISPATCH=false.',
          'asynchronous' if sync else 'synchronous',
      )
    return False
  jax.config.update(_ASYNC_FLAG, not sync)
  return True


def apply_fn(model, kind: str, plan, impl: str):
  """`f(variables, x) -> float32 logits` of a 'condensed' or 'dense' artefact.

  Args:
    model: the Flax module.
    kind: 'condensed' or 'dense'.
    plan: the converter's plan (`ConvertedModel.plan`; unused for 'dense').
    impl: the condensed kernel choice ('auto': the fastest for the device).

  Returns:
    The function; the variables are its argument, not constants baked into
    the compiled executable.
  """
  if kind == 'dense':

    def dense_apply(variables, x):
      return model.apply(variables, x, train=False).astype(jnp.float32)

    return dense_apply

  def condensed_apply(variables, x):
    converted = condensed.ConvertedModel(model=model, variables=variables, plan=plan)
    return converted.apply(x, impl=impl).astype(jnp.float32)

  return condensed_apply


class InferenceModel:
  """A loaded inference artefact: `model(x) -> logits`, jitted.

  Attributes:
    path: the folder it was loaded from.
    manifest: its manifest.json.
    kind: 'condensed' or 'dense'.
    input_shape: (H, W, C) of one input.
    input_dtype: the dtype of the input.
    num_classes: the number of logits.
    impl: the kernel choice ('auto': the fastest for the device).
    module: the Flax module.
    variables: the (converted) variables.
  """

  def __init__(self, path: str, manifest: dict[str, Any], model, variables, impl: str = 'auto'):
    self.path = path
    self.manifest = manifest
    self.kind = manifest['kind']
    self.input_shape = tuple(manifest['input']['shape'])
    self.input_dtype = np.dtype(manifest['input']['dtype'])
    self.num_classes = int(manifest['model']['num_classes'])
    self.impl = impl
    self.module = model
    self.variables = variables
    self._fn = jax.jit(apply_fn(model, self.kind, manifest['plan'], impl))
    self._compiled: dict[int, Any] = {}

  def compile(self, batch_size: int):
    """Compiles the model for one batch size ahead of time (once; cached).

    A call with a batch size not seen before compiles it then; this lets a
    server compile the sizes it expects before its first request.

    Args:
      batch_size: the number of inputs per call (>= 1).

    Returns:
      The compiled executable, `f(variables, x) -> logits`.
    """
    exe = self._compiled.get(batch_size)
    if exe is None:
      x = jax.ShapeDtypeStruct((batch_size, *self.input_shape), self.input_dtype)
      exe = self._fn.lower(self.variables, x).compile()
      self._compiled[batch_size] = exe
    return exe

  @property
  def compiled_batch_sizes(self) -> tuple[int, ...]:
    """The batch sizes compiled so far."""
    return tuple(sorted(self._compiled))

  @property
  def layers(self) -> dict[str, Any]:
    """Per layer: format, kind, density, neurons, active neurons, fan-in."""
    return self.manifest['layers']

  def __call__(self, x) -> jax.Array:
    """Float32 logits (N, num_classes) of preprocessed input (N, *input_shape).

    A batch of 0 gives an empty (0, num_classes) result. Each batch size is
    compiled once, on its first call (or by `compile`).

    Raises:
      ValueError: wrong shape or dtype (raw images: use `preprocess` first).
    """
    dtype = getattr(x, 'dtype', None)
    if dtype is None:
      x = np.asarray(x)
      dtype = x.dtype
    want = '(N, ' + ', '.join(map(str, self.input_shape)) + ')'
    if np.dtype(dtype) != self.input_dtype:
      hint = (
          ' These look like raw images: call model.preprocess(raw) first.'
          if np.dtype(dtype) == np.uint8
          else ''
      )
      raise ValueError(
          f'Input dtype {np.dtype(dtype)} but this model takes ' f'{self.input_dtype} {want}.{hint}'
      )
    if tuple(x.shape[1:]) != self.input_shape or len(x.shape) < 2:
      raise ValueError(
          f'Input shape {tuple(x.shape)} but this model takes {want}. Raw '
          'images go through model.preprocess(raw); add a batch axis for one '
          'example (x[None]).'
      )
    if x.shape[0] == 0:
      # Nothing to compute; the kernels are never called on an empty batch.
      return jnp.zeros((0, self.num_classes), jnp.float32)
    return self.compile(int(x.shape[0]))(self.variables, x)

  def preprocess(self, raw) -> np.ndarray:
    """The eval preprocessing recorded at export (uint8 images -> input)."""
    return apply_preprocessing(self.manifest['preprocessing'], raw)

  def predict(self, raw) -> np.ndarray:
    """Class ids of raw uint8 images."""
    return np.asarray(jnp.argmax(self(self.preprocess(raw)), -1))
