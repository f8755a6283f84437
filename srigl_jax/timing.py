"""Timing helpers shared by the benchmarks and the export report."""

from __future__ import annotations

import contextlib

import jax

__all__ = ["sync_cpu_dispatch"]

_FLAG = "jax_cpu_enable_async_dispatch"


@contextlib.contextmanager
def sync_cpu_dispatch(enabled: bool = True):
  """Turns JAX's asynchronous CPU dispatch off inside the block (if ``enabled``).

  Timing code waits for every call anyway, as a server that answers each
  request does; the asynchronous hand-off to a worker thread would only add
  the same constant to every measured call. Functions should be compiled
  inside the block too. A JAX release without the flag keeps its default.

  Args:
    enabled: False leaves dispatch as it is (e.g. a benchmark flag).

  Yields:
    None.
  """
  saved = jax.config.values.get(_FLAG)
  if saved is None or not enabled:
    yield
    return
  jax.config.update(_FLAG, False)
  try:
    yield
  finally:
    jax.config.update(_FLAG, saved)
