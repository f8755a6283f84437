"""Sparse training: layer-wise sparsity, masks, and the optax transformation."""

from srigl_jax.sparsity.layers import (
    DEFAULT_NO_ABLATION,
    LayerSpec,
    NoSparseLayerError,
    SparseArgumentError,
    build_layer_specs,
    default_fan_in_axes,
    erk_densities,
)
from srigl_jax.sparsity.transform import (
    METHODS,
    SparseState,
    apply_masks,
    find_sparse_state,
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

__all__ = [
    "DEFAULT_NO_ABLATION",
    "METHODS",
    "LayerSpec",
    "NoSparseLayerError",
    "SparseArgumentError",
    "SparseState",
    "apply_masks",
    "build_layer_specs",
    "default_fan_in_axes",
    "erk_densities",
    "find_sparse_state",
    "get_masks",
    "global_sparsity",
    "layer_stats",
    "rigl",
    "set_sparse",
    "sparse_init",
    "sparse_optimizer",
    "srigl",
    "static_sparse",
]
