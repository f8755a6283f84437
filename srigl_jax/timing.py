"""Timing shared by the benchmarks and the export report.

`time_interleaved` calls every function once per round, in a fixed order, so
load that comes and goes on a shared machine hits them all alike and their
ratio stays fair even when absolute times drift. `sync_cpu_dispatch` turns
JAX's asynchronous CPU dispatch off while timing, and `cpu_model` names the
CPU a record was measured on.

Device time (`chained_calls`, `per_call_seconds`): a program that makes N
dependent calls of a function, timed against one that makes ``n_base`` (0 or
1) of them with the same arguments; the difference over ``N - n_base`` is the
device time of one call, with the launch and dispatch overhead of the
program, paid once by both, cancelled. `trace_device_time` reads the same
from the device's side, a profiler trace of one run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Timings",
    "chained_calls",
    "cpu_model",
    "device_busy",
    "per_call_seconds",
    "sync_cpu_dispatch",
    "time_interleaved",
    "trace_device_time",
]

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


def chained_calls(fn: Callable[[Any, Any], Any], n: int) -> Callable[[tuple, tuple], tuple]:
  """A jitted program of ``n`` dependent calls ``fn(x, params)``, one argument set each.

  The program takes ``xs`` and ``params``, tuples of argument sets, and call
  ``i`` uses set ``i % len(xs)``; pass a set per call (``len(xs) >= n``), so
  that no two calls are the same computation for XLA to merge. Before each
  call its arguments pass through one `jax.lax.optimization_barrier`
  together with the previous call's output, which is returned from there:
  XLA can neither hoist a call, nor fuse the work of two calls into one
  kernel, nor schedule call ``i + 1`` (its weight preprocessing included)
  before call ``i``. (XLA's GPU compiler removes the barriers only after
  scheduling; its CPU compiler removes them early, so on a CPU the order is
  not guaranteed.) Every output is returned, so no call is dropped and no
  extra reduction is timed. The arguments are passed as they are, one buffer
  per array, as a served model passes its params: no slicing or copying
  inside the program. Unused arguments are kept (``keep_unused``), so a
  program of 0 calls takes the same arguments as one of ``n``.

  The calls are still independent in data: where the runtime may overlap
  independent kernels (XLA's GPU command buffers do by default), serialise
  it (``--xla_gpu_command_buffer_scheduling_mode=SERIALIZE``).

  Args:
    fn: ``fn(x, params) -> array or pytree``.
    n: the number of calls (0 returns one scalar).

  Returns:
    ``program(xs, params) -> tuple`` of the ``n`` outputs, jitted.
  """

  def program(xs, params):
    outs = []
    for i in range(n):
      args = (xs[i % len(xs)], params[i % len(params)])
      if outs:
        # The previous output leaves through the barrier and is returned from
        # there: XLA drops a barrier element that nobody reads.
        x, p, outs[-1] = jax.lax.optimization_barrier((*args, outs[-1]))
      else:
        x, p = jax.lax.optimization_barrier(args)
      outs.append(fn(x, p))
    return tuple(outs) if outs else (jnp.zeros((), jnp.float32),)

  return jax.jit(program, keep_unused=True)


def per_call_seconds(t_n: float, t_base: float, n: int, n_base: int = 0) -> float:
  """Device time of one call from two chained programs (`chained_calls`).

  ``(t_n - t_base) / (n - n_base)``: what the ``n - n_base`` extra calls
  added to the program's time; the dispatch, launch and synchronisation that
  both programs pay once cancel.

  Args:
    t_n: seconds of the program of ``n`` calls (a median over repeats).
    t_base: seconds of the program of ``n_base`` calls, same arguments.
    n: calls in the long program.
    n_base: calls in the short one (0 or 1).

  Returns:
    Seconds per call (negative only when noise exceeds the calls' time).

  Raises:
    ValueError: ``n <= n_base``.
  """
  if n <= n_base:
    raise ValueError(f"the long program needs more calls than the base: n={n}, n_base={n_base}")
  return (t_n - t_base) / (n - n_base)


# Lines of a device plane that the profiler derives from the stream lines
# (the same time again, per XLA op or module): left out of the busy time.
_DERIVED_LINES = ("XLA Ops", "XLA Modules", "Steps", "Framework", "Source", "TensorFlow", "Launch")


def device_busy(intervals: Sequence[tuple[int, int]]) -> tuple[int, int, int]:
  """Busy time, span and summed duration (ns) of ``(start, end)`` intervals.

  Busy time is the length of their union; where kernels overlapped, the
  summed duration exceeds it.
  """
  busy, total, end = 0, 0, None
  for a, b in sorted(intervals):
    total += b - a
    if end is None or a >= end:
      busy += b - a
      end = b
    elif b > end:
      busy += b - end
      end = b
  span = max(b for _, b in intervals) - min(a for a, _ in intervals) if intervals else 0
  return busy, span, total


def trace_device_time(call: Callable[[], Any], n: int) -> dict[str, float] | None:
  """The device's own account of one run of ``call`` (``n`` calls), from a profiler trace.

  Returns:
    ``busy_us`` (union of the device's kernel and copy intervals) and
    ``span_us`` (first start to last end), both per call, and ``overlap``
    (summed durations over busy time: 1.0 when nothing ran concurrently);
    None without a device plane (CPU) or when the trace fails.
  """
  with tempfile.TemporaryDirectory() as d:
    try:
      with jax.profiler.trace(d):
        jax.block_until_ready(call())
      (path,) = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
      data = jax.profiler.ProfileData.from_file(path)
    except Exception as e:  # pylint: disable=broad-except
      print(f"profiler trace failed: {e!r}", file=sys.stderr)
      return None
  intervals = []
  for plane in data.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    lines = list(plane.lines)
    streams = [l for l in lines if l.name.startswith("Stream")]
    for line in streams or [l for l in lines if not l.name.startswith(_DERIVED_LINES)]:
      intervals += [(e.start_ns, e.end_ns) for e in line.events]
  if not intervals:
    return None
  busy, span, total = device_busy(intervals)
  return dict(busy_us=busy / n / 1e3, span_us=span / n / 1e3, overlap=total / max(busy, 1))


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
