"""Metric writers with clu's `MetricWriter` interface, without TensorFlow.

`clu.metric_writers` imports TensorFlow when it is imported, and srigl_jax does
not depend on TensorFlow. These writers keep clu's method names
(`write_scalars(step, scalars)`, `flush()`, `close()`) so that a clu writer can
be dropped in where TensorFlow is available. TensorBoard event files are
written with `tensorboardX`, a pure-Python event writer (it needs protobuf
only).
"""

from __future__ import annotations

import abc
import json
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging


class MetricWriter(abc.ABC):
  """The subset of `clu.metric_writers.MetricWriter` the trainer uses."""

  @abc.abstractmethod
  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes scalar values (Python or numpy/jax scalars) for `step`."""

  def flush(self) -> None:
    """Makes everything written so far durable."""

  def close(self) -> None:
    """Flushes and releases resources."""
    self.flush()


def _to_float(v: Any) -> float:
  return float(np.asarray(v))


class TensorBoardWriter(MetricWriter):
  """Writes TensorBoard event files into `logdir` (via tensorboardX)."""

  def __init__(self, logdir: str):
    import tensorboardX  # pylint: disable=g-import-not-at-top

    self._writer = tensorboardX.SummaryWriter(logdir=logdir, flush_secs=30)

  def write_scalars(self, step, scalars):
    for name, value in scalars.items():
      self._writer.add_scalar(name, _to_float(value), global_step=int(step))

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class JsonlWriter(MetricWriter):
  """Appends one JSON object per `write_scalars` call: {'step': s, ...}.

  Non-finite values are written as null (strict JSON has no NaN).
  """

  def __init__(self, path: str):
    self._path = path
    self._file = open(path, 'a', encoding='utf-8')

  def write_scalars(self, step, scalars):
    record = {'step': int(step)}
    for name, value in scalars.items():
      if isinstance(value, str):
        record[name] = value
        continue
      v = np.asarray(value)
      x = v.item()
      record[name] = x if (not isinstance(x, float) or math.isfinite(x)) else None
    self._file.write(json.dumps(record) + '\n')

  def flush(self):
    if not self._file.closed:
      self._file.flush()
      os.fsync(self._file.fileno())

  def close(self):
    self.flush()
    self._file.close()


class MultiWriter(MetricWriter):
  """Forwards every call to several writers."""

  def __init__(self, writers: Sequence[MetricWriter]):
    self._writers = list(writers)

  def write_scalars(self, step, scalars):
    for w in self._writers:
      w.write_scalars(step, scalars)

  def flush(self):
    for w in self._writers:
      w.flush()

  def close(self):
    for w in self._writers:
      w.close()


class NoOpWriter(MetricWriter):
  """Writes nothing (processes other than 0 of a multi-process job)."""

  def write_scalars(self, step, scalars):
    del step, scalars


def _read_jsonl(
    path: str,
) -> tuple[list[dict[str, Any]], list[tuple[int, str]], tuple[int, str] | None, bool]:
  """Records of a metrics.jsonl file, its damaged lines, and its torn end.

  A process killed while its buffered writes reach the disk can leave half a
  line at the end (no newline after it): the torn end. It is kept only if it
  happens to be a whole record. Any other line that is not a JSON object
  (damaged on disk, or two writers interleaved) is damaged.

  Returns:
    (records, [(1-based line number, text)] of the damaged lines, (number,
    text) of a torn last line that is not a record or None, whether the file
    ends without a newline).
  """
  if not os.path.exists(path):
    return [], [], None, False
  with open(path, encoding='utf-8', errors='replace') as f:
    lines = f.read().split('\n')
  tail = lines.pop()  # '' when the file ends with a newline.
  unterminated = bool(tail.strip())
  records, bad, torn = [], [], None
  for number, line in enumerate(lines + [tail], 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      record = None
    if isinstance(record, dict):
      records.append(record)
    elif number > len(lines):
      torn = (number, line)
    else:
      bad.append((number, line))
  return records, bad, torn, unterminated


def _excerpt(text: str) -> str:
  return repr(text if len(text) <= 80 else text[:80] + '...')


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """Reads a metrics.jsonl file into a list of records (missing file: []).

  A torn last line (a run writing or killed while writing) is left out; any
  other damaged line is left out with a warning naming it.
  """
  records, bad, _, _ = _read_jsonl(path)
  for number, text in bad:
    logging.warning(
        '%s line %d is not a JSON record (%s); skipped it.', path, number, _excerpt(text)
    )
  return records


def truncate_jsonl(path: str, max_step: int) -> None:
  """Drops records with step > max_step (used when resuming a run).

  The steps after the last checkpoint of a stopped run are trained again on
  resume; dropping their old records keeps one record per step. A torn last
  line (the run was killed mid-write) is dropped too, with a warning. Any
  other damaged line is dropped with a warning naming it, after the file is
  copied to `PATH.corrupt-TIME` (nothing is lost; the run goes on).
  """
  records, bad, torn, unterminated = _read_jsonl(path)
  kept = [r for r in records if r.get('step', 0) <= max_step]
  if len(kept) == len(records) and not bad and not unterminated:
    return
  if torn is not None:
    logging.warning(
        '%s: dropped its torn last line %d (%s), cut off when a run was killed while '
        'writing it; that step is trained again.',
        path,
        torn[0],
        _excerpt(torn[1]),
    )
  if bad:
    backup = f'{path}.corrupt-{time.strftime("%Y%m%dT%H%M%S")}'
    shutil.copyfile(path, backup)
    logging.warning(
        '%s: dropped %d damaged line(s) that are not JSON records (line %s); the file '
        'as it was is kept in %s.',
        path,
        len(bad),
        ', '.join(f'{n}: {_excerpt(t)}' for n, t in bad[:5]),
        backup,
    )
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    for r in kept:
      f.write(json.dumps(r) + '\n')
  os.replace(tmp, path)
