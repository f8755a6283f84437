"""A loaded model: `InferenceModel`, and the apply function of an artefact's variables.

`apply_fn(model, kind, plan, impl)` is how an artefact's variables are run: the
Flax module itself for a 'dense' artefact, `condensed.ConvertedModel` for a
'condensed' one. `srigl_jax.export` verifies the converted model with the same
function that `InferenceModel` jits.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from srigl_jax import condensed
from srigl_jax.serving.preprocessing import apply_preprocessing


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

  @property
  def layers(self) -> dict[str, Any]:
    """Per layer: format, kind, density, neurons, active neurons, fan-in."""
    return self.manifest['layers']

  def __call__(self, x) -> jax.Array:
    """Float32 logits (N, num_classes) of preprocessed input (N, *input_shape).

    A batch of 0 gives an empty (0, num_classes) result.

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
    return self._fn(self.variables, x)

  def preprocess(self, raw) -> np.ndarray:
    """The eval preprocessing recorded at export (uint8 images -> input)."""
    return apply_preprocessing(self.manifest['preprocessing'], raw)

  def predict(self, raw) -> np.ndarray:
    """Class ids of raw uint8 images."""
    return np.asarray(jnp.argmax(self(self.preprocess(raw)), -1))
