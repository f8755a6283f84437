"""SRigL: structured dynamic sparse training in JAX.

The sparse optimizer is an optax wrapper: see `srigl`, `rigl`, `set_sparse`,
`static_sparse` and `sparse_optimizer`.
"""

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

# Deployment: a training workdir -> a saved condensed model -> serving.
from srigl_jax.export import export_inference_model, load_inference_model

__version__ = "0.1.0"
