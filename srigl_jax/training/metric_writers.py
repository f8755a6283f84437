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
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


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


def _read_jsonl(path: str) -> tuple[list[dict[str, Any]], bool]:
  """Records of a metrics.jsonl file and whether its last line was torn.

  A process killed while its buffered writes reach the disk can leave half a
  line at the end; that line is dropped (its step is trained again anyway).
  """
  if not os.path.exists(path):
    return [], False
  with open(path, encoding='utf-8') as f:
    lines = f.read().split('\n')
  tail = lines.pop()  # '' when the file ends with a newline.
  records = [json.loads(line) for line in lines if line.strip()]
  if not tail.strip():
    return records, False
  try:
    records.append(json.loads(tail))
    return records, True
  except json.JSONDecodeError:
    return records, True


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """Reads a metrics.jsonl file into a list of records (missing file: [])."""
  return _read_jsonl(path)[0]


def truncate_jsonl(path: str, max_step: int) -> None:
  """Drops records with step > max_step (used when resuming a run).

  The steps after the last checkpoint of a stopped run are trained again on
  resume; dropping their old records keeps one record per step. A torn last
  line (the run was killed mid-write) is dropped too.
  """
  records, torn = _read_jsonl(path)
  kept = [r for r in records if r.get('step', 0) <= max_step]
  if len(kept) == len(records) and not torn:
    return
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    for r in kept:
      f.write(json.dumps(r) + '\n')
  os.replace(tmp, path)
