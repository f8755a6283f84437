"""Condensed inference for constant fan-in sparse layers.

`condense` turns trained (params, masks) into condensed layers,
`condensed_matmul` runs them with the fastest kernel for the device, and
`condense_conv` / `condensed_conv` do the same for convolutions, and
`convert_model` turns a whole trained Flax model into a `ConvertedModel` with
its sparse Dense, attention and Conv layers condensed, BatchNorm folded and
ablated neurons folded away.
"""

from srigl_jax.condensed.conv_layer import CondensedConv, condense_conv
from srigl_jax.condensed.conv_native import condensed_conv_native, conv_native_available
from srigl_jax.condensed.conv_pallas import ConvBlockSizes, condensed_conv_pallas
from srigl_jax.condensed.conv_xla import condensed_conv_reference, condensed_conv_xla
from srigl_jax.condensed.convert import ConvertedModel, condensed_apply, convert_model
from srigl_jax.condensed.dispatch import IMPLS, condensed_conv, condensed_matmul, resolve_impl
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
    "ConvBlockSizes",
    "CondensedConv",
    "ConvertedModel",
    "CondensedLayer",
    "IMPLS",
    "StructuredLayer",
    "condense",
    "condense_dense",
    "condensed_apply",
    "condense_conv",
    "condensed_conv",
    "condensed_conv_native",
    "condensed_conv_pallas",
    "condensed_conv_reference",
    "condensed_conv_xla",
    "condensed_matmul",
    "condensed_matmul_native",
    "condensed_matmul_pallas",
    "condensed_matmul_reference",
    "condensed_matmul_xla",
    "conv_native_available",
    "convert_model",
    "index_dtype_for",
    "native_available",
    "native_error",
    "native_isas",
    "resolve_impl",
    "structured_from_mask",
]
