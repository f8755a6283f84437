"""Condensed inference for constant fan-in sparse layers.

`condense` turns trained (params, masks) into condensed layers,
`condensed_matmul` runs them with the fastest kernel for the device, and
`convert_model` / `condensed_apply` serve a whole Flax model with its sparse
Dense layers condensed and ablated neurons folded away.
"""

from srigl_jax.condensed.convert import (
    CondensedDense,
    condensed_apply,
    condensed_interceptor,
    convert_model,
    sequential_fold_pairs,
)
from srigl_jax.condensed.dispatch import IMPLS, condensed_matmul, resolve_impl
from srigl_jax.condensed.layer import (
    CondensedLayer,
    StructuredLayer,
    condense,
    condense_dense,
    index_dtype_for,
    structured_from_mask,
)
from srigl_jax.condensed.native import (
    condensed_matmul_native,
    native_available,
    native_error,
    native_isas,
)
from srigl_jax.condensed.pallas_gpu import BlockSizes, condensed_matmul_pallas
from srigl_jax.condensed.xla import condensed_matmul_reference, condensed_matmul_xla

__all__ = [
    "BlockSizes",
    "CondensedDense",
    "CondensedLayer",
    "IMPLS",
    "StructuredLayer",
    "condense",
    "condense_dense",
    "condensed_apply",
    "condensed_interceptor",
    "condensed_matmul",
    "condensed_matmul_native",
    "condensed_matmul_pallas",
    "condensed_matmul_reference",
    "condensed_matmul_xla",
    "convert_model",
    "index_dtype_for",
    "native_available",
    "native_error",
    "native_isas",
    "resolve_impl",
    "sequential_fold_pairs",
    "structured_from_mask",
]
