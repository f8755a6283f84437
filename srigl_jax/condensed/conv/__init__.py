"""Condensed convolutions: the format and one kernel per backend.

``format`` (`CondensedConv`, `condense_conv`; with group-shared fan-in
`GroupedCondensedConv`, `condense_grouped_conv`; the plane layout and its
`ConvGeometry`), ``reference`` (plain jnp), ``xla``, ``native`` (C++ via XLA
FFI, CPU) and ``pallas`` (GPU).
"""

from srigl_jax.condensed.conv.format import (
    CondensedConv,
    ConvGeometry,
    GroupedCondensedConv,
    condense_conv,
    condense_grouped_conv,
    conv_geometry,
    normalize_padding,
)
from srigl_jax.condensed.conv.native import condensed_conv_native, grouped_conv_native
from srigl_jax.condensed.conv.pallas import (
    ConvBlockSizes,
    GroupedConvBlockSizes,
    condensed_conv_pallas,
    grouped_conv_pallas,
)
from srigl_jax.condensed.conv.reference import condensed_conv_reference
from srigl_jax.condensed.conv.xla import condensed_conv_xla, grouped_conv_xla
