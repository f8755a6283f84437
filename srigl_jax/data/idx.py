"""Reader for the IDX files of MNIST and Fashion-MNIST (raw or gzip-compressed).

The IDX header is 4 magic bytes (two zero bytes, a type code, the number of
dimensions), then one big-endian uint32 per dimension, then the data in C order.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from srigl_jax.data.errors import DataFormatError, DatasetNotFoundError

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# Where each dataset lives by default and how a user gets it there.
DEFAULT_DIRS = {
    "fashion_mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
}
_HOW_TO_GET = {
    "fashion_mnist": (
        "Install it with `sudo apt-get update && sudo apt-get install -y "
        "dataset-fashion-mnist` (Debian/Ubuntu; installs into "
        "/usr/share/datasets/fashion-mnist), or put the four IDX files in a "
        "directory and pass --config.input.data_dir=DIR."
    ),
    "mnist": (
        "Put the four MNIST IDX files (train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz; gzip or not) in a directory and pass "
        "--config.input.data_dir=DIR."
    ),
}

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def how_to_get(name: str) -> str:
  """Returns the instructions printed when the files of `name` are missing."""
  return _HOW_TO_GET.get(name, "Pass --config.input.data_dir=DIR.")


def parse_idx(data: bytes, path: str = "<bytes>") -> np.ndarray:
  """Parses the content of an IDX file.

  Args:
    data: the whole (decompressed) file content.
    path: file name, used in error messages only.

  Returns:
    The array, with native byte order and the shape given in the header.

  Raises:
    DataFormatError: bad magic, unknown type code, or a length that does not
      match the header.
  """
  if len(data) < 4:
    raise DataFormatError(
        f"{path}: {len(data)} bytes, too short for an IDX header (file truncated?)"
    )
  if data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES or data[3] == 0:
    raise DataFormatError(
        f"{path}: bad IDX magic {data[:4].hex()} (expected 0000TTNN with type "
        f"TT in {sorted(hex(t) for t in _IDX_DTYPES)} and NN >= 1 dimensions); "
        "not an IDX file or corrupted"
    )
  dtype = _IDX_DTYPES[data[2]]
  ndim = data[3]
  header_len = 4 + 4 * ndim
  if len(data) < header_len:
    raise DataFormatError(f"{path}: truncated IDX header ({len(data)} bytes)")
  dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  expected = header_len + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
  if len(data) != expected:
    raise DataFormatError(
        f"{path}: IDX header says shape {dims} ({expected} bytes in all) but the "
        f"file has {len(data)} bytes; the file is "
        f"{'truncated' if len(data) < expected else 'longer than its header says'}"
    )
  array = np.frombuffer(data, dtype, offset=header_len).reshape(dims)
  return array.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file; a name ending in `.gz` is decompressed.

  Args:
    path: the file.

  Returns:
    The array stored in the file.

  Raises:
    DatasetNotFoundError: the file does not exist.
    DataFormatError: the file is truncated or not IDX.
  """
  if not os.path.isfile(path):
    raise DatasetNotFoundError(f"IDX file not found: {path}")
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        data = f.read()
    else:
      with open(path, "rb") as f:
        data = f.read()
  except (EOFError, OSError, zlib.error) as e:
    raise DataFormatError(
        f"{path}: cannot decompress ({e}); the file is truncated or corrupted"
    ) from e
  return parse_idx(data, path)


def find_idx_file(data_dir: str, split: str, kind: str) -> str | None:
  """Returns the path of the `kind` ('images'/'labels') file of `split`, or None."""
  prefix = _SPLIT_PREFIX[split]
  ndim = 3 if kind == "images" else 1
  # Both the canonical names and the dotted variant some mirrors use.
  for base in (f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"):
    for name in (base + ".gz", base):
      path = os.path.join(data_dir, name)
      if os.path.isfile(path):
        return path
  return None


def load_idx_split(
    name: str, data_dir: str, split: str, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
  """Loads one split of an MNIST-like dataset stored as IDX files.

  Args:
    name: dataset name ('mnist', 'fashion_mnist'), for error messages.
    data_dir: directory holding the IDX files.
    split: 'train' or 'test'.
    num_classes: labels must lie in [0, num_classes).

  Returns:
    images: uint8 (N, H, W, 1); labels: int32 (N,).

  Raises:
    DatasetNotFoundError: a file is missing; the message says how to get it.
    DataFormatError: a file is truncated, not IDX, or inconsistent.
  """
  paths = {}
  for kind in ("images", "labels"):
    path = find_idx_file(data_dir, split, kind)
    if path is None:
      ndim = 3 if kind == "images" else 1
      want = os.path.join(data_dir, f"{_SPLIT_PREFIX[split]}-{kind}-idx{ndim}-ubyte[.gz]")
      raise DatasetNotFoundError(f"{name}: missing {split} {kind} file {want}. {how_to_get(name)}")
    paths[kind] = path
  images = read_idx(paths["images"])
  labels = read_idx(paths["labels"])
  if images.ndim != 3 or images.dtype != np.uint8:
    raise DataFormatError(
        f"{paths['images']}: expected uint8 images (N, H, W), got " f"{images.dtype} {images.shape}"
    )
  if labels.ndim != 1 or len(labels) != len(images):
    raise DataFormatError(
        f"{paths['labels']}: expected {len(images)} labels to match "
        f"{paths['images']}, got shape {labels.shape}"
    )
  if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataFormatError(
        f"{paths['labels']}: labels outside [0, {num_classes}): "
        f"min {labels.min()}, max {labels.max()}"
    )
  return images[..., None], labels.astype(np.int32)
