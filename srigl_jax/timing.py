"""Timing shared by the benchmarks and the export report.

`time_interleaved` calls every function once per round, in a fixed order, so
load that comes and goes on a shared machine hits them all alike and their
ratio stays fair even when absolute times drift. `sync_cpu_dispatch` turns
JAX's asynchronous CPU dispatch off while timing, and `cpu_model` names the
CPU a record was measured on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

__all__ = ["Timings", "cpu_model", "sync_cpu_dispatch", "time_interleaved"]

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


@dataclasses.dataclass(frozen=True)
class Timings:
  """Seconds per call of each timed function, one entry per round.

  Attributes:
    seconds: name -> the time of its call in each round, in round order.
  """

  seconds: dict[str, list[float]]

  @property
  def rounds(self) -> int:
    """How many rounds were timed."""
    return len(next(iter(self.seconds.values()), []))

  def median_us(self, name: str) -> float:
    """Median microseconds per call of one function."""
    return float(np.median(self.seconds[name])) * 1e6

  def medians_us(self) -> dict[str, float]:
    """Median microseconds per call of every function."""
    return {name: self.median_us(name) for name in self.seconds}

  def paired_ratio(self, slow: str, fast: str) -> float:
    """Median over rounds of ``slow``'s time / ``fast``'s time in that round.

    Both calls of a round ran within microseconds of each other, so a load
    spike that slows one round slows both sides of its ratio.
    """
    a, b = np.asarray(self.seconds[slow]), np.asarray(self.seconds[fast])
    return float(np.median(a / np.maximum(b, 1e-12)))


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    *,
    budget_s: float,
    max_rounds: int = 200,
    min_rounds: int = 3,
    warmup: int = 2,
) -> Timings:
  """Times every function once per round until the budget is spent.

  Each function is first called ``warmup`` times (compilation, caches). Then
  rounds run until ``max_rounds``, or until at least ``min_rounds`` are done
  and ``budget_s`` seconds have passed. Every call is waited for
  (`jax.block_until_ready`).

  Args:
    fns: name -> a function of no arguments returning arrays.
    budget_s: seconds after which no new round starts (once ``min_rounds``
      are done).
    max_rounds: the most rounds.
    min_rounds: the fewest rounds, whatever the budget.
    warmup: untimed calls of each function first.

  Returns:
    The `Timings`.
  """
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  seconds: dict[str, list[float]] = {name: [] for name in fns}
  start = time.perf_counter()
  for r in range(max_rounds):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      seconds[name].append(time.perf_counter() - t0)
    if r + 1 >= min_rounds and time.perf_counter() - start > budget_s:
      break
  return Timings(seconds)


def cpu_model() -> str:
  """The CPU's model name and its widest vector extension, e.g. 'AMD EPYC ... (avx512)'."""
  name, flags = "unknown", set()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name") and name == "unknown":
          name = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
          flags = set(line.split(":", 1)[1].split())
  except OSError:
    pass
  isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "-"
  return f"{name} ({isa})"
