"""Condensed Dense layers: the format and one kernel per backend.

``format`` (`CondensedLayer`, `condense_dense`; with group-shared fan-in
`GroupedCondensedLayer`, `condense_grouped_dense`), ``reference`` (plain jnp),
``xla``, ``native`` (C++ via XLA FFI, CPU) and ``pallas`` (GPU).
"""

from srigl_jax.condensed.dense.format import (
    CondensedLayer,
    GroupedCondensedLayer,
    condense_dense,
    condense_grouped_dense,
    fan_in_counts,
    index_dtype_for,
)
from srigl_jax.condensed.dense.native import condensed_matmul_native, grouped_matmul_native
from srigl_jax.condensed.dense.pallas import (
    BlockSizes,
    GroupedBlockSizes,
    condensed_matmul_pallas,
    grouped_matmul_pallas,
)
from srigl_jax.condensed.dense.reference import condensed_matmul_reference
from srigl_jax.condensed.dense.xla import condensed_matmul_xla, grouped_matmul_xla
