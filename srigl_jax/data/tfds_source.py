"""TFDS datasets prepared in a data_dir, read with `tfds.data_source` (array_record).

No TensorFlow is needed to read. The prepared directory is checked by hand
before tfds is called, because asking tfds for a missing dataset starts a
download that can retry for minutes; here a missing dataset is an immediate
error saying how to prepare it.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from srigl_jax.data.errors import DataFormatError, DatasetNotFoundError

_VERSION_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")

_PREPARE_COMMON = (
    "tfds.data_source reads array_record files and never downloads here. Prepare "
    "the dataset once on a machine with internet access (preparing needs "
    "TensorFlow; reading does not):\n"
    "  pip install tensorflow tensorflow-datasets array_record\n"
)
_HOW_TO_PREPARE = {
    "cifar10": _PREPARE_COMMON
    + "  tfds build cifar10 --data_dir={data_dir} --file_format=array_record\n"
    "then copy {data_dir}/cifar10 to this machine, and point the config at it with "
    "--config.input.data_dir=DIR (or the TFDS_DATA_DIR environment variable).",
    "imagenet2012": _PREPARE_COMMON
    + "  # ImageNet cannot be downloaded automatically: get ILSVRC2012_img_train.tar\n"
    "  # and ILSVRC2012_img_val.tar from https://image-net.org (registration needed)\n"
    "  # and put them in {data_dir}/downloads/manual/, then:\n"
    "  tfds build imagenet2012 --data_dir={data_dir} --file_format=array_record\n"
    "then point the config at it with --config.input.data_dir=DIR (or the "
    "TFDS_DATA_DIR environment variable).",
}


def default_data_dir() -> str:
  """TFDS's default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def how_to_prepare(name: str, data_dir: str) -> str:
  """The instructions shown when `name` is not prepared in `data_dir`."""
  template = _HOW_TO_PREPARE.get(
      name,
      _PREPARE_COMMON + "  tfds build {name} --data_dir={data_dir} --file_format=array_record",
  )
  return template.format(name=name, data_dir=data_dir)


def find_prepared_version(name: str, data_dir: str, splits: Sequence[str]) -> str:
  """Checks that `name` is prepared as array_record in `data_dir`, without tfds.

  Args:
    name: TFDS dataset name, e.g. 'cifar10'.
    data_dir: the TFDS data directory (holding `name/VERSION/`).
    splits: splits that must be present, e.g. ('train', 'test').

  Returns:
    The newest prepared version, e.g. '3.0.2'.

  Raises:
    DatasetNotFoundError: nothing prepared, or a split is missing; the message
      says how to prepare the dataset.
    DataFormatError: prepared, but as TFRecord, which needs TensorFlow.
  """
  ds_dir = os.path.join(data_dir, name)
  versions = []
  if os.path.isdir(ds_dir):
    for entry in os.listdir(ds_dir):
      match = _VERSION_RE.match(entry)
      if match and os.path.isfile(os.path.join(ds_dir, entry, "dataset_info.json")):
        versions.append((tuple(int(g) for g in match.groups()), entry))
  if not versions:
    raise DatasetNotFoundError(
        f"{name}: no prepared dataset in {ds_dir} (expected "
        f"{ds_dir}/<version>/dataset_info.json).\n{how_to_prepare(name, data_dir)}"
    )
  version = max(versions)[1]
  version_dir = os.path.join(ds_dir, version)
  for split in splits:
    if glob.glob(os.path.join(version_dir, f"{name}-{split}.array_record*")):
      continue
    if glob.glob(os.path.join(version_dir, f"{name}-{split}.tfrecord*")):
      raise DataFormatError(
          f"{name}: {version_dir} holds TFRecord files, which need TensorFlow to "
          f"read. Rebuild as array_record:\n{how_to_prepare(name, data_dir)}"
      )
    raise DatasetNotFoundError(
        f"{name}: split '{split}' missing in {version_dir} (no "
        f"{name}-{split}.array_record-* files).\n{how_to_prepare(name, data_dir)}"
    )
  return version


def open_data_source(name: str, data_dir: str, split: str) -> Sequence[Any]:
  """Opens one split of a prepared dataset with `tfds.data_source`.

  Call `find_prepared_version` first (the pipeline does); this passes
  `download=False` as a second guard against a download attempt.

  Args:
    name: TFDS dataset name.
    data_dir: the TFDS data directory.
    split: split name.

  Returns:
    A random-access sequence of example dicts.
  """
  version = find_prepared_version(name, data_dir, [split])
  # Imported here so that the local-file and synthetic paths never pay for
  # importing tfds.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds.data_source(
      f"{name}:{version}", split=split, data_dir=data_dir, download=False, try_gcs=False
  )


class RandomAccessSplit:
  """Adapts a random-access source of example dicts to the pipeline's reader.

  Works with what `tfds.data_source` returns and with any object having
  `__len__` and `__getitem__` (tests use plain lists of dicts).

  Args:
    source: the random-access source.
    image_key: feature holding the uint8 (H, W, C) image.
    label_key: feature holding the integer label.
    num_examples: use only the first `num_examples` (None: all).
  """

  def __init__(
      self,
      source: Sequence[Any],
      image_key: str = "image",
      label_key: str = "label",
      num_examples: int | None = None,
  ):
    self._source = source
    self._image_key = image_key
    self._label_key = label_key
    total = len(source)
    if num_examples is not None and num_examples > total:
      raise ValueError(f"num_examples={num_examples} but the split has {total}")
    self._len = total if num_examples is None else num_examples

  def __len__(self) -> int:
    return self._len

  def read(self, indices: Sequence[int]) -> tuple[list[np.ndarray], np.ndarray]:
    """Reads examples by index.

    Args:
      indices: example indices in [0, len).

    Returns:
      (images, labels): a list of uint8 (H, W, C) arrays, whose sizes may
      differ, and int32 (len(indices),) labels.
    """
    indices = [int(i) for i in indices]
    if any(i < 0 or i >= self._len for i in indices):
      raise IndexError(f"index out of range [0, {self._len})")
    getitems = getattr(self._source, "__getitems__", None)
    # Batched reads let array_record group file accesses.
    examples = getitems(indices) if getitems else [self._source[i] for i in indices]
    images = []
    for ex in examples:
      image = np.asarray(ex[self._image_key], dtype=np.uint8)
      images.append(image[..., None] if image.ndim == 2 else image)
    labels = np.asarray([int(ex[self._label_key]) for ex in examples], np.int32)
    return images, labels

  def read_all(self, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Reads the whole split into memory (fixed-size images only).

    Returns:
      images uint8 (N, H, W, C) and labels int32 (N,).
    """
    images, labels = [], []
    for start in range(0, self._len, chunk):
      ims, labs = self.read(range(start, min(start + chunk, self._len)))
      images.extend(ims)
      labels.append(labs)
    if not images:
      raise DataFormatError("empty split")
    if len({im.shape for im in images}) != 1:
      raise DataFormatError("images differ in shape; cannot cache the split in memory")
    return np.stack(images), np.concatenate(labels)
