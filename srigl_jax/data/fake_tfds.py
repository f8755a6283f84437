"""Small stand-ins for TFDS's cifar10 and imagenet2012, prepared offline as array_record.

They are written by the real TFDS builders (so `tfds.data_source` reads them
exactly like the real thing) with generated images in place of the
downloads: PNG for cifar10, JPEG for imagenet2012. Tests use them to check
the TFDS path; `srigl_jax.benchmarks.input` uses them to measure JPEG
decoding and augmentation.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np

ShapeFn = Callable[[np.random.Generator], tuple[int, int, int]]


def natural_image(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
  """A uint8 image with smooth structure plus noise, so JPEG compresses it as it would a photo."""
  h, w, c = shape
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  image = np.empty((h, w, c), np.float32)
  for ch in range(c):
    fy, fx, phase = rng.uniform(0.005, 0.05), rng.uniform(0.005, 0.05), rng.uniform(0, 6.3)
    image[..., ch] = 128 + 80 * np.sin(fy * y + fx * x + phase) * np.cos(0.5 * fx * y - phase)
  image += rng.normal(0, 12, image.shape)
  return np.clip(image, 0, 255).astype(np.uint8)


def _encoded(array: np.ndarray, image_format: str) -> io.BytesIO:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  f = io.BytesIO()
  Image.fromarray(array).save(f, format=image_format, quality=90)
  f.seek(0)
  return f


def _code_path(builder_class):
  # tfds derives a builder's code path from its module, which fails for a
  # class defined inside a package without the optional importlib_resources;
  # the real builder's file serves (only its checksums file is looked up).
  import inspect  # pylint: disable=g-import-not-at-top

  from etils import epath  # pylint: disable=g-import-not-at-top

  return epath.Path(inspect.getfile(builder_class))


def prepare(
    data_dir: str,
    name: str,
    splits: dict[str, tuple[int, ShapeFn]],
    *,
    seed: int = 0,
    image_fn: Callable[[np.random.Generator, tuple[int, int, int]], np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
  """Prepares a fake `name` ('cifar10' or 'imagenet2012') under `data_dir`.

  Args:
    data_dir: the TFDS data dir to write into.
    name: 'cifar10' (PNG images) or 'imagenet2012' (JPEG images).
    splits: split name -> (number of examples, function drawing an image shape).
    seed: seeds the images.
    image_fn: (rng, shape) -> uint8 image; default uniform noise.

  Returns:
    Example key -> the image written (before encoding); labels are i % 10.

  Raises:
    ImportError: this tfds lacks the builder (imagenet2012 moved between
      tfds versions).
  """
  from tensorflow_datasets.core import registered  # pylint: disable=g-import-not-at-top

  image_fn = image_fn or (lambda rng, shape: rng.integers(0, 256, shape, dtype=np.uint8))
  written: dict[str, np.ndarray] = {}

  def examples(split, n, shape_fn, split_seed, image_format, extra):
    rng = np.random.default_rng([seed, split_seed])
    for i in range(n):
      key = f"{split}_{i}"
      image = image_fn(rng, tuple(int(d) for d in shape_fn(rng)))
      written[key] = image
      yield key, {"image": _encoded(image, image_format), "label": i % 10, **extra(key)}

  def generators(image_format, extra):
    return {
        split: examples(split, n, shape_fn, k, image_format, extra)
        for k, (split, (n, shape_fn)) in enumerate(sorted(splits.items()))
    }

  with registered.skip_registration():
    if name == "cifar10":
      from tensorflow_datasets.image_classification import cifar  # pylint: disable=g-import-not-at-top

      class FakeCifar10(cifar.Cifar10):
        name = "cifar10"
        code_path = _code_path(cifar.Cifar10)

        def _split_generators(self, dl_manager):
          return generators("PNG", lambda key: {"id": key})

      builder = FakeCifar10
    elif name == "imagenet2012":
      from tensorflow_datasets.datasets.imagenet2012 import (  # pylint: disable=g-import-not-at-top
          imagenet2012_dataset_builder as inb,
      )

      class FakeImagenet(inb.Builder):
        name = "imagenet2012"
        code_path = _code_path(inb.Builder)

        @classmethod
        def get_metadata(cls):
          return inb.Builder.get_metadata()

        def _split_generators(self, dl_manager):
          return generators("JPEG", lambda key: {"file_name": key + ".JPEG"})

      builder = FakeImagenet
    else:
      raise ValueError(f"no fake for {name!r}; cifar10 or imagenet2012")
    builder(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return written
