"""SRigL: structured dynamic sparse training in JAX.

The sparse optimizer is an optax wrapper: see `srigl`, `rigl`, `set_sparse`,
`static_sparse` and `sparse_optimizer` (all of `srigl_jax.sparsity` is here).
`convert_model` and the other names of `srigl_jax.condensed` turn a trained
model into its condensed form. `export_inference_model` (a training workdir ->
a verified inference folder, `srigl_jax.export`) and `load_inference_model`
(the folder -> a model to serve, `srigl_jax.serving`) are imported on first use.
"""

from srigl_jax.condensed import (
    CondensedConv,
    CondensedLayer,
    ConvertedModel,
    StructuredLayer,
    condense,
    condense_conv,
    condensed_apply,
    condensed_conv,
    condensed_matmul,
    convert_model,
    native_available,
)
from srigl_jax.sparsity import *  # noqa: F403  (the sparse optimizer's API, `sparsity.__all__`)
from srigl_jax.version import __version__

_LAZY_NAMES = ("export_inference_model", "load_inference_model")


def __getattr__(name):
  # Imported on first use: the export pulls in the trainer's build and the data
  # pipeline, serving orbax; and `python -m srigl_jax.export` would find its
  # module already imported and run a second copy.
  if name == "export_inference_model":
    from srigl_jax import export  # pylint: disable=g-import-not-at-top

    return export.export_inference_model
  if name == "load_inference_model":
    from srigl_jax import serving  # pylint: disable=g-import-not-at-top

    return serving.load_inference_model
  raise AttributeError(f"module 'srigl_jax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY_NAMES))
