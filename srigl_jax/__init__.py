"""SRigL: structured dynamic sparse training in JAX.

The sparse optimizer is an optax wrapper: see `srigl`, `rigl`, `set_sparse`,
`static_sparse` and `sparse_optimizer`.
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
from srigl_jax.sparsity import (
    DEFAULT_NO_ABLATION,
    METHODS,
    LayerSpec,
    SparseState,
    apply_masks,
    build_layer_specs,
    erk_densities,
    get_masks,
    global_sparsity,
    layer_stats,
    rigl,
    set_sparse,
    sparse_init,
    sparse_optimizer,
    srigl,
    static_sparse,
)

__version__ = "0.1.0"

# Deployment (a training workdir -> a saved condensed model -> serving) lives
# in srigl_jax.export, imported on first use: `python -m srigl_jax.export`
# would otherwise find the module already imported and run a second copy.
_EXPORT_NAMES = ("export_inference_model", "load_inference_model")


def __getattr__(name):
  if name in _EXPORT_NAMES:
    from srigl_jax import export  # pylint: disable=g-import-not-at-top

    return getattr(export, name)
  raise AttributeError(f"module 'srigl_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_EXPORT_NAMES))
