"""The native CPU kernel library, shared by the Dense and conv kernels.

The package build compiles ``csrc/`` into ``libsrigl_condensed.so`` next to
this file. The library holds one XLA FFI handler per kind of layer (`KERNELS`:
Dense and conv, plain and grouped),
each with generic, AVX2 and AVX-512 variants; the ``isa`` attribute of a call
picks one (``'auto'``: the widest this CPU runs). Loading the library registers
every handler as an FFI target for XLA:CPU, once per process.

If the library was not built or cannot be loaded, `native_available()` is
False and `native_error()` says why; `srigl_jax.condensed.resolve_impl('auto')`
then picks the XLA kernels.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["ISAS", "KERNELS", "ffi_call", "native_available", "native_error", "native_isas"]

_LIB_NAME = "libsrigl_condensed.so"
# Values of the FFI calls' ``isa`` attribute.
ISAS = {"auto": 0, "generic": 1, "avx2": 2, "avx512": 3}


@dataclasses.dataclass(frozen=True)
class NativeKernel:
  """One FFI handler of the library.

  Attributes:
    target: the FFI target name it is registered under.
    handler: the exported symbol of the XLA FFI handler.
    variant_name: exported ``const char* (int64 isa)``: the name of the
      variant an ``isa`` code runs here, '' when it is not built or the CPU
      lacks it.
  """

  target: str
  handler: str
  variant_name: str


KERNELS = {
    "dense": NativeKernel(
        "srigl_condensed_matmul_f32", "SriglCondensedMatmulF32", "SriglCondensedKernelName"
    ),
    "conv": NativeKernel(
        "srigl_condensed_conv_f32", "SriglCondensedConvF32", "SriglCondensedConvKernelName"
    ),
    "grouped_dense": NativeKernel(
        "srigl_grouped_matmul_f32", "SriglGroupedMatmulF32", "SriglGroupedKernelName"
    ),
    "grouped_conv": NativeKernel(
        "srigl_grouped_conv_f32", "SriglGroupedConvF32", "SriglGroupedConvKernelName"
    ),
}


def _candidates():
  env = os.environ.get("SRIGL_JAX_NATIVE_LIB")
  if env:
    yield Path(env)
  yield Path(__file__).with_name(_LIB_NAME)
  # Editable installs keep Python sources in the checkout but install the
  # compiled library into site-packages, which is on sys.path.
  for entry in sys.path:
    if entry:
      yield Path(entry) / "srigl_jax" / "condensed" / _LIB_NAME


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
  """Loads the library and registers its FFI targets; (library, '') or (None, why)."""
  if sys.platform == "win32":
    return None, "the native kernels are only built on Linux/macOS"
  tried = []
  for path in _candidates():
    if not path.is_file():
      tried.append(str(path))
      continue
    try:
      lib = ctypes.cdll.LoadLibrary(str(path))
      for kernel in KERNELS.values():
        capsule = jax.ffi.pycapsule(getattr(lib, kernel.handler))
        jax.ffi.register_ffi_target(kernel.target, capsule, platform="cpu")
        name_of = getattr(lib, kernel.variant_name)
        name_of.restype = ctypes.c_char_p
        name_of.argtypes = [ctypes.c_int64]
    except (OSError, AttributeError) as e:
      return None, f"could not load {path} (rebuild it with the package): {e}"
    return lib, ""
  return None, (
      f"{_LIB_NAME} was not built (reinstall with a C++17 compiler and CMake "
      f"available; looked in {tried[0]} and on sys.path)"
  )


def native_available() -> bool:
  """Whether the native CPU kernels (Dense and conv) are built and loadable."""
  return _load()[0] is not None


def native_error() -> str:
  """Why the native kernels are unavailable ('' when they are available)."""
  return _load()[1]


def native_isas(kind: str = "dense") -> dict[str, str]:
  """Kernel variants usable here, e.g. ``{'auto': 'avx512', 'generic': ...}``.

  Args:
    kind: a key of `KERNELS`.

  Returns:
    ``isa`` value -> name of the variant it runs; empty when the library is
    unavailable.
  """
  lib = _load()[0]
  if lib is None:
    return {}
  name_of = getattr(lib, KERNELS[kind].variant_name)
  names = {isa: name_of(code).decode() for isa, code in ISAS.items()}
  return {isa: name for isa, name in names.items() if name}


def ffi_call(
    kind: str,
    out_shape: tuple[int, ...],
    x: jax.Array,
    indices: jax.Array,
    layer,
    *,
    max_threads: int,
    isa: str,
    ids: jax.Array | None = None,
    **attrs: int,
) -> jax.Array:
  """Calls one native kernel with operands in the dtypes its handler binds.

  The operands are the input, the indices, and the layer's values, neuron
  (or group) ids and full bias. The input and the bias go in as float32, ids
  as int32, indices as int16 or int32 (other integer dtypes as int32), values
  as bfloat16 when they are stored so (the kernels read them as they are),
  else as float32. The kernels accumulate in float32.

  Args:
    kind: a key of `KERNELS`.
    out_shape: the float32 result's shape.
    x: the input.
    indices: ``(rows, k)`` input indices (Dense) or taps (conv).
    layer: the `CondensedLayer`, `CondensedConv` or a grouped format.
    max_threads: cap on threads (0 = XLA's intra-op pool size).
    isa: a key of `ISAS`.
    ids: the row ids the kernel takes (a grouped layer's ``group_ids``);
      default the layer's ``neuron_ids``.
    **attrs: the kernel's further int64 attributes (conv geometry).

  Returns:
    The float32 result.

  Raises:
    RuntimeError: the library is not available (see `native_error`).
    ValueError: an unknown ``isa``.
  """
  if not native_available():
    raise RuntimeError(f"srigl_jax native kernels unavailable: {native_error()}")
  if isa not in ISAS:
    raise ValueError(f"isa must be one of {sorted(ISAS)}, got {isa!r}")
  if indices.dtype not in (jnp.int16, jnp.int32):
    indices = indices.astype(jnp.int32)
  values = layer.values
  if values.dtype != jnp.bfloat16:
    values = values.astype(jnp.float32)
  call = jax.ffi.ffi_call(
      KERNELS[kind].target, jax.ShapeDtypeStruct(out_shape, jnp.float32), vmap_method="sequential"
  )
  return call(
      x.astype(jnp.float32),
      indices,
      values,
      (layer.neuron_ids if ids is None else ids).astype(jnp.int32),
      layer.bias_or_zeros(jnp.float32),
      max_threads=np.int64(max_threads),
      isa=np.int64(ISAS[isa]),
      **{name: np.int64(v) for name, v in attrs.items()},
  )
