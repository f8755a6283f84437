"""The input pipeline: config -> `Dataset` yielding numpy batches per process, on grain.

One grain `MapDataset` chain serves every source (IDX arrays, `tfds.data_source`,
synthetic arrays):

    ShuffledBatches(N, B / P) -> [p::P]            (this process's indices per step)
             -> read + augment (random_map)        (one vectorised call per batch)
             -> normalise -> mixup/cutmix (random_map) -> [start_step:]
             -> to_iter_dataset (threads) -> mp_prefetch (worker processes)

Determinism and resumption:
  * Position `i` of the index stream is position `i mod N` of epoch `i // N`,
    each epoch a new permutation drawn from (seed, epoch), so batches run
    across epoch boundaries as one stream and every example is seen once per N
    positions.
  * The stream is cut into sub-batches of B / P indices and process p takes
    sub-batches p, p + P, ...: its rows of step s are positions
    [s * B + p * B / P, s * B + (p + 1) * B / P), the same global batch whatever
    P is.
  * Augmentation and mixup/cutmix draw from (seed, step) through grain's
    `random_map`. The augmentation draws cover the whole global batch and each
    process keeps its rows, so a row's crop, flip and RandAugment ops do not
    depend on P (mixup/cutmix mix within each process's local batch).
    Everything is random access, so a batch depends only on (seed, step) and
    `train_batches(start_step=s)` resumes exactly.
  * Worker processes and threads only decide where a batch is computed, never
    what it is: the batches are the same for any `num_workers`/`num_threads`.
  * Reading and augmenting a whole batch in one call (one fancy-index read of
    a cached split, one vectorised crop/flip and RandAugment) keeps grain's
    per-element cost to the index stream.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags
from ml_collections import config_dict

from srigl_jax.data import augment as aug
from srigl_jax.data import idx as idx_lib
from srigl_jax.data import synthetic as synthetic_lib
from srigl_jax.data import tfds_source
from srigl_jax.data.errors import DataFormatError

# Distinct stream tags so the shuffle, augmentation and mixup draws of one
# seed never share a random stream.
_SHUFFLE_TAG = 1
_AUGMENT_TAG = 2
_MIX_TAG = 3
_INCEPTION_ATTEMPTS = 10


@dataclasses.dataclass(frozen=True)
class _DatasetSpec:
  kind: str  # 'idx', 'tfds' or 'synthetic'.
  num_classes: int
  image_shape: tuple[int, int, int] | None  # None: variable (resized to image_size).
  mean: tuple[float, ...]
  std: tuple[float, ...]
  train_split: str
  eval_split: str
  augments: tuple[str, ...]  # Valid values of `augment`, the first is the default.
  resize: bool = False  # Variable-size images, cropped and resized to image_size.


_SPECS = {
    "fashion_mnist": _DatasetSpec(
        "idx", 10, (28, 28, 1), (0.2860,), (0.3530,), "train", "test", ("none", "crop", "crop_flip")
    ),
    "mnist": _DatasetSpec(
        "idx", 10, (28, 28, 1), (0.1307,), (0.3081,), "train", "test", ("none", "crop")
    ),
    "cifar10": _DatasetSpec(
        "tfds",
        10,
        (32, 32, 3),
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        "train",
        "test",
        ("crop_flip", "crop", "none"),
    ),
    "imagenet2012": _DatasetSpec(
        "tfds",
        1000,
        None,
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
        "train",
        "validation",
        ("inception_crop_flip", "none"),
        resize=True,
    ),
    "synthetic": _DatasetSpec(
        "synthetic", 10, None, (0.5,), (0.25,), "train", "test", ("none", "crop", "crop_flip")
    ),
}
DATASET_NAMES = tuple(_SPECS)


def default_input_config(name: str) -> ml_collections.ConfigDict:
  """The input config of `name` with every field filled.

  Fields:
    name: one of `DATASET_NAMES`.
    data_dir: where the data lives; None = the dataset's default
      (/usr/share/datasets/fashion-mnist, /usr/share/datasets/mnist, or for
      TFDS datasets $TFDS_DATA_DIR, else ~/tensorflow_datasets).
    image_size: ImageNet's output side (224); None elsewhere (native size).
    augment: 'none', 'crop' (pad + random crop), 'crop_flip' (+ horizontal
      flip), 'inception_crop_flip' (ImageNet random-resized crop + flip;
      'none' on ImageNet is the eval center crop).
    crop_padding: zero padding of 'crop' / 'crop_flip' (4 pixels).
    randaugment: None, or (num_layers, magnitude) with magnitude on 0..10.
    mixup_alpha, cutmix_alpha: Beta(alpha, alpha) mixing; 0 disables. With
      both > 0 each step uses one of the two with equal probability.
    num_train_examples, num_eval_examples: None = the whole split; N = the
      first N examples. For 'synthetic', the generated split sizes.
    cache: hold the decoded split in memory; None = automatic (yes unless
      ImageNet).
    num_workers: grain worker processes preparing batches (0 = in this
      process). Worth it for decode-heavy data (ImageNet, RandAugment); at most
      the CPUs this process may use.
    num_threads: threads preparing batches in each process (JPEG decoding
      and resizing release the GIL); 0 = in the consuming thread.
    prefetch: batches buffered ahead of the consumer per process (0 = none,
      which also turns the threads off).
    image_shape, num_classes, synthetic_seed: 'synthetic' only.

  Args:
    name: the dataset.

  Returns:
    A `ml_collections.ConfigDict`.

  Raises:
    ValueError: unknown dataset name.
  """
  spec = _spec(name)
  c = ml_collections.ConfigDict()
  c.name = name
  c.data_dir = config_dict.placeholder(str)
  c.image_size = 224 if name == "imagenet2012" else config_dict.placeholder(int)
  c.augment = spec.augments[0]
  c.crop_padding = 4
  c.randaugment = config_dict.placeholder(tuple)
  c.mixup_alpha = 0.0
  c.cutmix_alpha = 0.0
  c.num_train_examples = 4096 if name == "synthetic" else config_dict.placeholder(int)
  c.num_eval_examples = 1024 if name == "synthetic" else config_dict.placeholder(int)
  c.cache = config_dict.placeholder(bool)
  c.num_workers = 0
  c.num_threads = 8 if name == "imagenet2012" else 1
  c.prefetch = 2
  if name == "synthetic":
    c.image_shape = (32, 32, 3)
    c.num_classes = 10
    c.synthetic_seed = 0
  return c


def _spec(name: Any) -> _DatasetSpec:
  if name not in _SPECS:
    raise ValueError(f"Unknown dataset name {name!r}; valid names: {', '.join(DATASET_NAMES)}")
  return _SPECS[name]


def _get(config: Any, field: str, default: Any) -> Any:
  if isinstance(config, dict) or hasattr(config, "keys"):
    try:
      return config[field] if field in config else default
    except TypeError:
      pass
  return getattr(config, field, default)


def resolve_input_config(config: Any) -> ml_collections.ConfigDict:
  """Fills missing fields from `default_input_config` and validates the result.

  Args:
    config: a ConfigDict, dict or any object with the fields as attributes.

  Returns:
    A complete, validated ConfigDict.

  Raises:
    ValueError: unknown dataset name, unknown field, or an invalid value; the
      message names the field and the valid values.
  """
  name = _get(config, "name", None)
  spec = _spec(name)
  full = default_input_config(name)
  if isinstance(config, dict) or hasattr(config, "keys"):
    unknown = sorted(set(config.keys()) - set(full.keys()))
    if unknown:
      raise ValueError(
          f"Unknown input config field(s) {unknown} for {name!r}; valid fields: "
          f"{sorted(full.keys())}"
      )
  values = {field: _get(config, field, full[field]) for field in full.keys()}
  out = ml_collections.ConfigDict(values)

  def fail(msg):
    raise ValueError(f"input config {name!r}: {msg}")

  if out.augment not in spec.augments:
    fail(f"augment={out.augment!r} is not one of {list(spec.augments)}")
  if not isinstance(out.crop_padding, int) or out.crop_padding < 0:
    fail(f"crop_padding must be an int >= 0, got {out.crop_padding!r}")
  if out.randaugment is not None:
    ra = out.randaugment
    if (
        not isinstance(ra, (tuple, list))
        or len(ra) != 2
        or not isinstance(ra[0], (int, np.integer))
        or ra[0] < 0
        or not isinstance(ra[1], (int, float, np.number))
        or ra[1] < 0
    ):
      fail(f"randaugment must be None or (num_layers >= 0, magnitude >= 0), got {ra!r}")
  for field in ("mixup_alpha", "cutmix_alpha"):
    if not isinstance(out[field], (int, float)) or out[field] < 0:
      fail(f"{field} must be a number >= 0 (0 disables), got {out[field]!r}")
  for field in ("num_train_examples", "num_eval_examples"):
    v = out[field]
    if v is not None and (not isinstance(v, (int, np.integer)) or v <= 0):
      fail(f"{field} must be None (all) or an int > 0, got {v!r}")
  if out.data_dir is not None and not isinstance(out.data_dir, str):
    fail(f"data_dir must be None or a path string, got {out.data_dir!r}")
  if name == "imagenet2012":
    if not isinstance(out.image_size, int) or out.image_size <= 0:
      fail(f"image_size must be an int > 0, got {out.image_size!r}")
  elif out.image_size is not None:
    native = tuple(out.image_shape) if name == "synthetic" else spec.image_shape
    if out.image_size != native[0] or native[0] != native[1]:
      fail(
          f"image_size={out.image_size} but this dataset is {native[:2]}; "
          "image_size only applies to imagenet2012 (leave it None)"
      )
  cpus = available_cpus()
  if not isinstance(out.num_workers, int) or not 0 <= out.num_workers <= cpus:
    fail(
        f"num_workers={out.num_workers!r} but this machine lets the process use {cpus} "
        f"CPU(s); set --config.input.num_workers to an int in [0, {cpus}] "
        "(0 prepares batches in the training process)"
    )
  for field in ("num_threads", "prefetch"):
    if not isinstance(out[field], int) or out[field] < 0:
      fail(f"{field} must be an int >= 0, got {out[field]!r}")
  if name == "synthetic":
    shape = out.image_shape
    if len(shape) != 3 or any(not isinstance(d, int) or d <= 0 for d in shape):
      fail(f"image_shape must be (H, W, C) of positive ints, got {shape!r}")
    if shape[2] not in (1, 3):
      fail(f"image_shape channels must be 1 or 3, got {shape[2]}")
    if not isinstance(out.num_classes, int) or out.num_classes < 2:
      fail(f"num_classes must be an int >= 2, got {out.num_classes!r}")
    if out.num_train_examples is None or out.num_eval_examples is None:
      fail("synthetic needs num_train_examples and num_eval_examples")
  return out


def available_cpus() -> int:
  """The CPUs this process may run on (its affinity mask, not the machine's count)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


def input_geometry(config: Any) -> tuple[tuple[int, int, int], int]:
  """The (H, W, C) of a dataset's batches and its number of classes.

  Reads no data: it comes from the config and the dataset's spec.

  Args:
    config: an input config (missing fields take their defaults).

  Returns:
    (image_shape, num_classes).

  Raises:
    ValueError: see `resolve_input_config`.
  """
  config = resolve_input_config(config)
  spec = _SPECS[config.name]
  if config.name == "synthetic":
    return tuple(config.image_shape), int(config.num_classes)
  if spec.resize:
    return (config.image_size, config.image_size, 3), spec.num_classes
  return tuple(spec.image_shape), spec.num_classes


# ------------------------------------------------------------------- sources


class ArraySplit:
  """A split held in memory: uint8 (N, H, W, C) images and int32 labels."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images = images
    self.labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Examples by index: uint8 (len, H, W, C) images and int32 labels (one gather each)."""
    return self.images[indices], self.labels[indices]


def _take_first(images, labels, n, what, name):
  if n is None:
    return images, labels
  if n > len(labels):
    raise ValueError(f"{name}: {what}={n} but the split has only {len(labels)} examples")
  return images[:n], labels[:n]


def _open_split(config: ml_collections.ConfigDict, split: str, num_examples: int | None):
  """One split as a reader: `len()` and `read(indices) -> (images, labels)`."""
  name = config.name
  spec = _SPECS[name]
  what = "num_train_examples" if split == spec.train_split else "num_eval_examples"
  if spec.kind == "synthetic":
    images, labels = synthetic_lib.make_synthetic(
        "train" if split == spec.train_split else "test",
        num_examples,
        tuple(config.image_shape),
        config.num_classes,
        config.synthetic_seed,
    )
    return ArraySplit(images, labels)
  if spec.kind == "idx":
    data_dir = config.data_dir or idx_lib.DEFAULT_DIRS[name]
    images, labels = idx_lib.load_idx_split(name, data_dir, split, spec.num_classes)
    if images.shape[1:] != spec.image_shape:
      raise DataFormatError(
          f"{name}: images in {data_dir} are {images.shape[1:]}, expected {spec.image_shape}"
      )
    return ArraySplit(*_take_first(images, labels, num_examples, what, name))
  data_dir = config.data_dir or tfds_source.default_data_dir()
  # Checks every split before opening any, so a missing eval split is found
  # before minutes of caching the train split.
  tfds_source.find_prepared_version(name, data_dir, [spec.train_split, spec.eval_split])
  source = tfds_source.open_data_source(name, data_dir, split)
  if num_examples is not None and num_examples > len(source):
    raise ValueError(f"{name}: {what}={num_examples} but the split has only {len(source)}")
  reader = tfds_source.RandomAccessSplit(source, num_examples=num_examples)
  cache = config.cache if config.cache is not None else not spec.resize
  if cache:
    return ArraySplit(*reader.read_all())
  return reader


class ShuffledBatches(grain.MapDataset):
  """The endless stream of example indices, cut into batches: a grain `MapDataset`.

  Position `i` of the stream is `permutation(i // N)[i % N]`, a new
  permutation of the N examples every epoch, drawn from (seed, epoch); element
  j is positions [j * batch_size, (j + 1) * batch_size), so batches run across
  epoch boundaries. Random access, with the last two epochs' permutations
  cached.

  Hand-written rather than `MapDataset.range(N).shuffle(...).repeat(...)
  .batch(...)`: grain's shuffle calls its index permutation once per index,
  measured at 3.6 us per index at N = 50,000 and 30 us at N = 1,024, as much
  as reading and augmenting a CIFAR example; a numpy permutation per epoch
  costs about 10 ns per index.
  """

  def __init__(self, num_examples: int, batch_size: int, seed: int):
    super().__init__()
    self._n = num_examples
    self._batch_size = batch_size
    self._seed = seed
    # The last two (epoch, permutation) pairs, replaced as one tuple so that
    # threads reading batches at once never see it half updated.
    self._recent: tuple[tuple[int, np.ndarray], ...] = ()

  def __len__(self) -> int:
    return sys.maxsize

  def __str__(self) -> str:
    return f"ShuffledBatches(num_examples={self._n}, batch_size={self._batch_size})"

  def permutation(self, epoch: int) -> np.ndarray:
    """The order of the examples in `epoch`."""
    recent = self._recent
    for e, perm in recent:
      if e == epoch:
        return perm
    perm = np.random.default_rng([self._seed, _SHUFFLE_TAG, epoch]).permutation(self._n)
    self._recent = (*recent[-1:], (epoch, perm))
    return perm

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    start = int(index) * self._batch_size
    stop = start + self._batch_size
    first, last = start // self._n, (stop - 1) // self._n
    parts = [
        self.permutation(e)[max(start - e * self._n, 0) : min(stop - e * self._n, self._n)]
        for e in range(first, last + 1)
    ]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


# ---------------------------------------------------------------- transforms
# Classes rather than closures: grain pickles the pipeline into its worker
# processes.


def _stream_seed(seed: int, tag: int) -> int:
  """A 32-bit seed for one random stream of a run seed.

  Hashed rather than `seed + tag`, so that no two (run seed, tag) pairs share
  a stream (with a sum, run seed 1's tag 2 would be run seed 2's tag 1).
  """
  return int(np.random.SeedSequence([seed, tag]).generate_state(1)[0])


def _fixed_size(images, resize_to: int | None) -> np.ndarray:
  """A read batch as one uint8 (n, H, W, C) array.

  With `resize_to`, each (variable-size) image is center-cropped and resized
  to it: ImageNet's eval view, also its train view without augmentation.
  Without, the images (already of one size) are stacked as read.
  """
  if resize_to is not None:
    images = [aug.crop_resize(im, aug.center_crop_box(*im.shape[:2]), resize_to) for im in images]
  return np.stack(images) if isinstance(images, list) else images


@dataclasses.dataclass(frozen=True, eq=False)
class _TrainBatch(grain.transforms.RandomMap):
  """Reads and augments this process's rows of a global training batch.

  The element is the split indices of this process's rows; `rng` comes from
  (seed, step). Every draw covers the whole global batch and is then sliced
  to this process's rows, so a row's augmentation does not depend on how many
  processes share the batch.
  """

  split: Any  # `ArraySplit` or `tfds_source.RandomAccessSplit`.
  augment: str
  crop_padding: int
  randaugment: tuple[int, float] | None
  resize_to: int | None
  process_index: int
  process_count: int

  def random_map(self, indices, rng: np.random.Generator):
    local = len(indices)
    b = local * self.process_count
    rows = slice(self.process_index * local, (self.process_index + 1) * local)
    images, labels = self.split.read(indices)
    if self.augment == "inception_crop_flip":  # Variable-size images (ImageNet).
      uniforms = rng.random((b, _INCEPTION_ATTEMPTS, 4))[rows]
      flips = (rng.random(b) < 0.5)[rows]
      images = np.stack(
          [
              aug.crop_resize(im, aug.inception_crop_box(*im.shape[:2], u), self.resize_to, bool(f))
              for im, u, f in zip(images, uniforms, flips)
          ]
      )
    else:
      images = _fixed_size(images, self.resize_to)
      if self.augment in ("crop", "crop_flip"):
        offsets = rng.integers(0, 2 * self.crop_padding + 1, (b, 2))[rows]
        flips = (rng.random(b) < 0.5)[rows]
        if self.augment == "crop":
          flips[:] = False
        images = aug.pad_crop_flip(images, offsets, flips, self.crop_padding)
    if self.randaugment is not None and self.randaugment[0] > 0:
      layers, magnitude = self.randaugment
      ops = rng.integers(0, aug.NUM_RANDAUGMENT_OPS, (b, layers))[rows]
      signs = np.where(rng.random((b, layers)) < 0.5, -1.0, 1.0)[rows]
      images = aug.rand_augment(images, ops, signs, magnitude)
    return {"image": images, "label": labels}


@dataclasses.dataclass(frozen=True, eq=False)
class _EvalBatch(grain.transforms.Map):
  """This process's rows of an eval batch (element = batch index), zero-padded.

  Padding rows (past the end of the split) have zero images, label 0 and
  mask 0; ImageNet's images are center-cropped and resized.
  """

  split: Any
  batch_size: int
  local_batch_size: int
  process_index: int
  image_shape: tuple[int, int, int]
  resize: bool

  def map(self, index):
    lo = int(index) * self.batch_size + self.process_index * self.local_batch_size
    real = np.arange(lo, min(lo + self.local_batch_size, len(self.split)))
    images = np.zeros((self.local_batch_size, *self.image_shape), np.uint8)
    labels = np.zeros((self.local_batch_size,), np.int32)
    mask = np.zeros((self.local_batch_size,), np.float32)
    if len(real):
      raw, labels[: len(real)] = self.split.read(real)
      images[: len(real)] = _fixed_size(raw, self.image_shape[0] if self.resize else None)
      mask[: len(real)] = 1.0
    return {"image": images, "label": labels, "mask": mask}


@dataclasses.dataclass(frozen=True)
class _Normalize(grain.transforms.Map):
  """uint8 batch -> float32 `(x / 255 - mean) / std`; padded eval rows stay zero."""

  mean: tuple[float, ...]
  std: tuple[float, ...]

  def map(self, batch):
    images = aug.normalize(batch["image"], self.mean, self.std)
    if "mask" in batch:
      images *= batch["mask"][:, None, None, None]
    return {**batch, "image": images}


@dataclasses.dataclass(frozen=True)
class _Mix(grain.transforms.RandomMap):
  """Mixup or cutmix of a local batch, drawn from (seed, step); soft labels."""

  mixup_alpha: float
  cutmix_alpha: float
  num_classes: int

  def random_map(self, batch, rng: np.random.Generator):
    images = batch["image"]
    soft = aug.one_hot(batch["label"], self.num_classes)
    use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha <= 0 or rng.random() < 0.5)
    if use_cutmix:
      lam = rng.beta(self.cutmix_alpha, self.cutmix_alpha)
      box = aug.cutmix_box(*images.shape[1:3], lam, rng.random(2))
      images, soft = aug.cutmix(images, soft, box)
    else:
      lam = rng.beta(self.mixup_alpha, self.mixup_alpha)
      images, soft = aug.mixup(images, soft, lam)
    return {"image": images, "label": soft}


# ------------------------------------------------------------------- dataset


class Dataset:
  """Train and eval batches of one dataset, for one process of a data-parallel job.

  Attributes:
    name: dataset name.
    num_classes: number of classes.
    image_shape: (H, W, C) of the output images.
    num_train: training examples used.
    num_eval: eval examples used.
    global_batch_size: train batch summed over processes.
    local_batch_size: this process's rows of each train batch.
    eval_batch_size: global eval batch size.
    local_eval_batch_size: this process's rows of each eval batch.
    steps_per_epoch: num_train // global_batch_size, the unit of epoch-based
      schedules (the batch stream itself runs across epoch boundaries).
    num_eval_batches: ceil(num_eval / eval_batch_size).
    process_index, process_count: this process and the number of processes.
    config: the resolved input config.
    train_source, eval_source: the splits' readers (`len()` and
      `read(indices) -> (images, labels)`); cached splits are `ArraySplit`s.
    train_dataset: the grain `MapDataset` of this process's train batches;
      element s is the batch of step s.
    eval_dataset: the grain `MapDataset` of this process's eval batches.
  """

  def __init__(
      self,
      config: ml_collections.ConfigDict,
      *,
      seed: int,
      global_batch_size: int,
      eval_batch_size: int,
      process_index: int,
      process_count: int,
  ):
    spec = _SPECS[config.name]
    self.config = config
    self.name = config.name
    self._spec = spec
    self._seed = int(seed)
    self.process_index = process_index
    self.process_count = process_count
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // process_count
    self.eval_batch_size = eval_batch_size
    self.local_eval_batch_size = eval_batch_size // process_count
    self.image_shape, self.num_classes = input_geometry(config)
    channels = self.image_shape[2]
    mean = spec.mean * channels if len(spec.mean) == 1 else spec.mean
    std = spec.std * channels if len(spec.std) == 1 else spec.std
    normalize = _Normalize(tuple(mean), tuple(std))

    train = _open_split(config, spec.train_split, config.num_train_examples)
    evaluation = _open_split(config, spec.eval_split, config.num_eval_examples)
    self.train_source, self.eval_source = train, evaluation
    self.num_train = len(train)
    self.num_eval = len(evaluation)
    if self.num_train < global_batch_size:
      raise ValueError(
          f"{self.name}: global_batch_size={global_batch_size} exceeds the "
          f"{self.num_train} training examples"
      )
    self.steps_per_epoch = self.num_train // global_batch_size
    self.num_eval_batches = math.ceil(self.num_eval / eval_batch_size)

    randaugment = tuple(config.randaugment) if config.randaugment is not None else None
    read_augment = _TrainBatch(
        train,
        augment=config.augment,
        crop_padding=config.crop_padding,
        randaugment=randaugment,
        resize_to=self.image_shape[0] if spec.resize else None,
        process_index=process_index,
        process_count=process_count,
    )
    # After the process slice, element s is step s: the draws come from (seed, s).
    batches = (
        ShuffledBatches(self.num_train, self.local_batch_size, seed)[process_index::process_count]
        .random_map(read_augment, seed=_stream_seed(seed, _AUGMENT_TAG))
        .map(normalize)
    )
    if config.mixup_alpha > 0 or config.cutmix_alpha > 0:
      mix = _Mix(float(config.mixup_alpha), float(config.cutmix_alpha), self.num_classes)
      batches = batches.random_map(mix, seed=_stream_seed(seed, _MIX_TAG))
    self.train_dataset = batches

    read_eval = _EvalBatch(
        evaluation,
        batch_size=eval_batch_size,
        local_batch_size=self.local_eval_batch_size,
        process_index=process_index,
        image_shape=tuple(self.image_shape),
        resize=spec.resize,
    )
    self.eval_dataset = grain.MapDataset.range(self.num_eval_batches).map(read_eval).map(normalize)

  # -- public ----------------------------------------------------------

  def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches starting at `start_step`.

    Args:
      start_step: the step of the first batch; resuming at step s yields
        exactly what a run from step 0 yields from its s-th batch on.

    Returns:
      A grain iterator of dicts: 'image' float32 (local_batch, H, W, C),
      normalised per channel; 'label' int32 (local_batch,), or, when mixup
      or cutmix is on, float32 soft labels (local_batch, num_classes) that
      sum to 1. Worker processes stop with `close()` or when it is
      garbage-collected.
    """
    if start_step < 0:
      raise ValueError(f"start_step must be >= 0, got {start_step}")
    return self._iterate(self.train_dataset[start_step:])

  def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the eval split in a fixed order.

    The last batch is padded to eval_batch_size; each process gets its rows
    of every global batch, so every process yields `num_eval_batches`
    batches.

    Returns:
      An iterator of dicts: 'image' float32 (local_eval_batch, H, W, C),
      'label' int32 (local_eval_batch,), 'mask' float32 (local_eval_batch,)
      with 1 for real examples and 0 for padding (padding has zero images
      and label 0).
    """
    return self._iterate(self.eval_dataset)

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    """The local rows of the global training batch of `step` (see `train_batches`)."""
    return self.train_dataset[int(step)]

  def eval_batch(self, index: int) -> dict[str, np.ndarray]:
    """The local rows of eval batch `index` (see `eval_batches`)."""
    return self.eval_dataset[int(index)]

  # -- internals -------------------------------------------------------

  def _iterate(self, dataset: grain.MapDataset) -> Iterator[dict[str, np.ndarray]]:
    cfg = self.config
    threads = cfg.num_threads if cfg.prefetch > 0 else 0
    # Each thread needs a buffer slot of its own.
    buffer = max(cfg.prefetch, threads) if threads else 0
    stream = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)
    )
    if cfg.num_workers > 0:
      if not flags.FLAGS.is_parsed():
        # grain's worker processes read its absl flags; a program that did
        # not parse flags (a notebook, pytest) gets their defaults.
        flags.FLAGS.mark_as_parsed()
      options = grain.MultiprocessingOptions(
          num_workers=cfg.num_workers, per_worker_buffer_size=max(1, cfg.prefetch)
      )
      stream = stream.mp_prefetch(options)
    return iter(stream)


def create_dataset(
    input_config: Any,
    *,
    seed: int,
    global_batch_size: int,
    eval_batch_size: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Dataset:
  """Builds the input pipeline of one process.

  Args:
    input_config: a ConfigDict (or dict, or object with attributes) with at
      least `name`; missing fields take `default_input_config(name)` values.
    seed: the data seed; batch s depends only on (seed, s).
    global_batch_size: train batch size summed over all processes.
    eval_batch_size: global eval batch size (default: global_batch_size).
    process_index: this process (default: `jax.process_index()`).
    process_count: number of processes (default: `jax.process_count()`).

  Returns:
    The `Dataset`.

  Raises:
    ValueError: bad config or batch sizes.
    DatasetNotFoundError: the data is missing (the message says how to get it).
    DataFormatError: the data is truncated or of the wrong format.
  """
  config = resolve_input_config(input_config)
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if eval_batch_size is None:
    eval_batch_size = global_batch_size
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"bad process_index={process_index} / process_count={process_count}")
  for what, size in (
      ("global_batch_size", global_batch_size),
      ("eval_batch_size", eval_batch_size),
  ):
    if size <= 0 or size % process_count:
      raise ValueError(f"{what}={size} must be > 0 and divisible by process_count={process_count}")
  return Dataset(
      config,
      seed=seed,
      global_batch_size=global_batch_size,
      eval_batch_size=eval_batch_size,
      process_index=process_index,
      process_count=process_count,
  )
