"""Condensed inference for constant fan-in sparse layers.

``dense/`` and ``conv/`` hold the two layer kinds side by side, each with the
same parts: ``format`` (the storage pytree and the function that condenses a
kernel from its mask), ``reference`` (plain jnp, what the tests compare
against), ``xla``, ``native`` (C++ via XLA FFI, CPU) and ``pallas`` (GPU).
`condensed_matmul` and `condensed_conv` (``dispatch``) check their input and
run the fastest kernel for the device. Layers trained with group-shared
fan-in (`srigl(..., group_size=G)`) have grouped formats
(`GroupedCondensedLayer`, `GroupedCondensedConv`) whose kernels read each
gathered input once for the G neurons of a group; the same entry points run
them. ``structured`` is the fallback format
for layers that cannot be condensed. ``convert/`` converts for inference: a
params tree (`condense`, Dense layers) or a whole trained Flax model
(`convert_model` -> `ConvertedModel`: sparse Dense, attention and Conv layers
condensed, BatchNorm folded, ablated neurons folded away).
"""

from srigl_jax.condensed._native_lib import native_available, native_error, native_isas
from srigl_jax.condensed.conv import (
    CondensedConv,
    ConvBlockSizes,
    ConvGeometry,
    GroupedCondensedConv,
    GroupedConvBlockSizes,
    condense_conv,
    condense_grouped_conv,
    condensed_conv_native,
    condensed_conv_pallas,
    condensed_conv_reference,
    condensed_conv_xla,
    conv_geometry,
    grouped_conv_native,
    grouped_conv_pallas,
    grouped_conv_xla,
)
from srigl_jax.condensed.convert import ConvertedModel, condense, condensed_apply, convert_model
from srigl_jax.condensed.dense import (
    BlockSizes,
    CondensedLayer,
    GroupedBlockSizes,
    GroupedCondensedLayer,
    condense_dense,
    condense_grouped_dense,
    condensed_matmul_native,
    condensed_matmul_pallas,
    condensed_matmul_reference,
    condensed_matmul_xla,
    grouped_matmul_native,
    grouped_matmul_pallas,
    grouped_matmul_xla,
    index_dtype_for,
)
from srigl_jax.condensed.dispatch import IMPLS, condensed_conv, condensed_matmul, resolve_impl
from srigl_jax.condensed.structured import StructuredLayer, structured_from_mask

__all__ = [
    "BlockSizes",
    "CondensedConv",
    "CondensedLayer",
    "ConvBlockSizes",
    "ConvGeometry",
    "ConvertedModel",
    "GroupedBlockSizes",
    "GroupedCondensedConv",
    "GroupedCondensedLayer",
    "GroupedConvBlockSizes",
    "IMPLS",
    "StructuredLayer",
    "condense",
    "condense_conv",
    "condense_dense",
    "condense_grouped_conv",
    "condense_grouped_dense",
    "condensed_apply",
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
    "conv_geometry",
    "convert_model",
    "grouped_conv_native",
    "grouped_conv_pallas",
    "grouped_conv_xla",
    "grouped_matmul_native",
    "grouped_matmul_pallas",
    "grouped_matmul_xla",
    "index_dtype_for",
    "native_available",
    "native_error",
    "native_isas",
    "resolve_impl",
    "structured_from_mask",
]
