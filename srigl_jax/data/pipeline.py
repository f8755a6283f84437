"""The input pipeline: config -> `Dataset` yielding numpy batches per process.

Determinism and resumption: the global batch at train step `s` is
`perm_e[k * B:(k + 1) * B]` with `e, k = divmod(s, steps_per_epoch)` and
`perm_e` a permutation drawn from (seed, e); its augmentation parameters are
drawn for all B positions from (seed, s). So a batch depends only on
(seed, s), `train_batches(start_step=s)` resumes exactly, and process p of P
receives rows [p * B / P, (p + 1) * B / P) of the same global batch whatever P
is (except for mixup/cutmix, which mix within each process's local batch).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import ml_collections
import numpy as np
from ml_collections import config_dict

from srigl_jax.data import augment as aug
from srigl_jax.data import idx as idx_lib
from srigl_jax.data import synthetic as synthetic_lib
from srigl_jax.data import tfds_source
from srigl_jax.data.errors import DataFormatError

# Distinct stream tags so the permutation and augmentation draws of one seed
# never share a random stream.
_PERM_TAG = 1
_AUG_TAG = 2
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
    num_workers: threads decoding/resizing variable-size images (ImageNet).
    prefetch: batches prepared ahead in a background thread (0 = none).
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
  c.num_workers = 8
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
  if not isinstance(out.num_workers, int) or out.num_workers < 1:
    fail(f"num_workers must be an int >= 1, got {out.num_workers!r}")
  if not isinstance(out.prefetch, int) or out.prefetch < 0:
    fail(f"prefetch must be an int >= 0, got {out.prefetch!r}")
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


class _ArraySplit:
  """An in-memory split: uint8 (N, H, W, C) images and int32 labels."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images = images
    self.labels = labels

  def __len__(self) -> int:
    return len(self.labels)

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return self.images[indices], self.labels[indices]


def _take_first(images, labels, n, what, name):
  if n is None:
    return images, labels
  if n > len(labels):
    raise ValueError(f"{name}: {what}={n} but the split has only {len(labels)} examples")
  return images[:n], labels[:n]


def _open_split(config: ml_collections.ConfigDict, split: str, num_examples: int | None):
  """Returns a reader with `__len__` and `read(indices)` for one split."""
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
    return _ArraySplit(images, labels)
  if spec.kind == "idx":
    data_dir = config.data_dir or idx_lib.DEFAULT_DIRS[name]
    images, labels = idx_lib.load_idx_split(name, data_dir, split, spec.num_classes)
    if images.shape[1:] != spec.image_shape:
      raise DataFormatError(
          f"{name}: images in {data_dir} are {images.shape[1:]}, expected {spec.image_shape}"
      )
    return _ArraySplit(*_take_first(images, labels, num_examples, what, name))
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
    return _ArraySplit(*reader.read_all())
  return reader


# ------------------------------------------------------------------ prefetch


class _Prefetch:
  """Runs an iterator in a daemon thread, `size` items ahead of the consumer.

  The thread holds only the queue and the stop event, not this object, so
  dropping the iterator lets `__del__` stop the thread.
  """

  _END = object()

  def __init__(self, iterator: Iterator[Any], size: int):
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._done = False
    thread = threading.Thread(
        target=_prefetch_worker, args=(iterator, self._queue, self._stop, self._END), daemon=True
    )
    thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    if self._done:
      raise StopIteration
    item, error = self._queue.get()
    if error is not None:
      self._done = True
      raise error
    if item is self._END:
      self._done = True
      raise StopIteration
    return item

  def close(self):
    """Stops the background thread."""
    self._stop.set()

  def __del__(self):
    self._stop.set()


def _prefetch_worker(iterator, q, stop, end):
  def put(entry):
    while not stop.is_set():
      try:
        q.put(entry, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  try:
    for item in iterator:
      if not put((item, None)):
        return
    put((end, None))
  except BaseException as e:  # pylint: disable=broad-except
    put((None, e))


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
    steps_per_epoch: num_train // global_batch_size (the remainder of each
      epoch's permutation is dropped).
    num_eval_batches: ceil(num_eval / eval_batch_size).
    process_index, process_count: this process and the number of processes.
    config: the resolved input config.
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
    self._mean = spec.mean * channels if len(spec.mean) == 1 else spec.mean
    self._std = spec.std * channels if len(spec.std) == 1 else spec.std

    self._train = _open_split(config, spec.train_split, config.num_train_examples)
    self._eval = _open_split(config, spec.eval_split, config.num_eval_examples)
    self.num_train = len(self._train)
    self.num_eval = len(self._eval)
    if self.num_train < global_batch_size:
      raise ValueError(
          f"{self.name}: global_batch_size={global_batch_size} exceeds the "
          f"{self.num_train} training examples"
      )
    self.steps_per_epoch = self.num_train // global_batch_size
    self.num_eval_batches = math.ceil(self.num_eval / eval_batch_size)
    self._perm_cache: tuple[int, np.ndarray] | None = None
    # Created up front, not lazily, because prefetch threads of a train and
    # an eval iterator may need it at the same time.
    needs_pool = spec.resize or not isinstance(self._train, _ArraySplit)
    self._pool = (
        concurrent.futures.ThreadPoolExecutor(config.num_workers)
        if needs_pool and config.num_workers > 1
        else None
    )

  # -- public ----------------------------------------------------------

  def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless training batches starting at `start_step`.

    Args:
      start_step: the step of the first batch; resuming at step s yields
        exactly what a run from step 0 yields from its s-th batch on.

    Returns:
      An iterator of dicts: 'image' float32 (local_batch, H, W, C),
      normalised per channel; 'label' int32 (local_batch,), or, when mixup
      or cutmix is on, float32 soft labels (local_batch, num_classes) that
      sum to 1.
    """
    if start_step < 0:
      raise ValueError(f"start_step must be >= 0, got {start_step}")

    def generate():
      step = start_step
      while True:
        yield self.train_batch(step)
        step += 1

    return self._maybe_prefetch(generate())

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

    def generate():
      for b in range(self.num_eval_batches):
        yield self.eval_batch(b)

    return self._maybe_prefetch(generate())

  def train_batch(self, step: int) -> dict[str, np.ndarray]:
    """The local rows of the global training batch of `step` (see `train_batches`)."""
    b = self.global_batch_size
    epoch, k = divmod(int(step), self.steps_per_epoch)
    global_indices = self._permutation(epoch)[k * b : (k + 1) * b]
    lo = self.process_index * self.local_batch_size
    hi = lo + self.local_batch_size
    rng = np.random.default_rng([self._seed, _AUG_TAG, int(step)])
    images, labels = self._augment_train(rng, global_indices, lo, hi)
    images = aug.normalize(images, self._mean, self._std)
    images, labels = self._mix(rng, images, labels)
    return {"image": images, "label": labels}

  def eval_batch(self, index: int) -> dict[str, np.ndarray]:
    """The local rows of eval batch `index` (see `eval_batches`)."""
    e = self.eval_batch_size
    lo = index * e + self.process_index * self.local_eval_batch_size
    hi = lo + self.local_eval_batch_size
    real = np.arange(lo, min(hi, self.num_eval))
    n_real = len(real)
    images = np.zeros((self.local_eval_batch_size, *self.image_shape), np.float32)
    labels = np.zeros((self.local_eval_batch_size,), np.int32)
    mask = np.zeros((self.local_eval_batch_size,), np.float32)
    if n_real:
      raw, lab = self._read(self._eval, real)
      if self._spec.resize:
        size = self.image_shape[0]
        raw = self._map(
            lambda im: aug.crop_resize(im, aug.center_crop_box(*im.shape[:2]), size), raw
        )
      images[:n_real] = aug.normalize(np.asarray(raw), self._mean, self._std)
      labels[:n_real] = lab
      mask[:n_real] = 1.0
    return {"image": images, "label": labels, "mask": mask}

  # -- internals -------------------------------------------------------

  def _maybe_prefetch(self, iterator):
    if self.config.prefetch > 0:
      return _Prefetch(iterator, self.config.prefetch)
    return iterator

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._perm_cache is None or self._perm_cache[0] != epoch:
      rng = np.random.default_rng([self._seed, _PERM_TAG, epoch])
      self._perm_cache = (epoch, rng.permutation(self.num_train))
    return self._perm_cache[1]

  def _map(self, fn: Callable[..., np.ndarray], *iterables) -> np.ndarray:
    # PIL decodes and resizes with the GIL released, so threads scale.
    if self._pool is not None:
      return np.stack(list(self._pool.map(fn, *iterables)))
    return np.stack([fn(*args) for args in zip(*iterables)])

  def _read(self, split, indices):
    """Reads examples, in parallel chunks when the split decodes on read."""
    workers = self.config.num_workers
    if isinstance(split, _ArraySplit) or self._pool is None or len(indices) < 2 * workers:
      return split.read(indices)
    # Decoding (JPEG) dominates ImageNet reads; tfds decodes in `read`, so
    # the chunks are what spreads it over threads.
    chunks = np.array_split(np.asarray(indices), workers)
    parts = list(self._pool.map(split.read, chunks))
    return [im for p in parts for im in p[0]], np.concatenate([p[1] for p in parts])

  def _augment_train(self, rng, global_indices, lo, hi):
    """Reads and augments rows [lo, hi) of the global batch; uint8 images."""
    b = len(global_indices)
    cfg = self.config
    indices = global_indices[lo:hi]
    # Every draw covers the whole global batch, then gets sliced, so row i's
    # randomness does not depend on how many processes share the batch.
    if self._spec.resize:
      raw, labels = self._read(self._train, indices)
      size = self.image_shape[0]
      if cfg.augment == "inception_crop_flip":
        uniforms = rng.random((b, _INCEPTION_ATTEMPTS, 4))[lo:hi]
        flips = (rng.random(b) < 0.5)[lo:hi]
        images = self._map(
            lambda im, u, f: aug.crop_resize(
                im, aug.inception_crop_box(im.shape[0], im.shape[1], u), size, bool(f)
            ),
            raw,
            uniforms,
            flips,
        )
      else:
        images = self._map(
            lambda im: aug.crop_resize(im, aug.center_crop_box(*im.shape[:2]), size), raw
        )
    else:
      images, labels = self._read(self._train, indices)
      images = np.stack(images) if isinstance(images, list) else images
      if cfg.augment in ("crop", "crop_flip"):
        pad = cfg.crop_padding
        offsets = rng.integers(0, 2 * pad + 1, (b, 2))[lo:hi]
        flips = (rng.random(b) < 0.5)[lo:hi]
        if cfg.augment == "crop":
          flips = np.zeros_like(flips)
        images = aug.pad_crop_flip(images, offsets, flips, pad)
    if cfg.randaugment is not None and cfg.randaugment[0] > 0:
      layers, magnitude = cfg.randaugment
      ops = rng.integers(0, aug.NUM_RANDAUGMENT_OPS, (b, layers))[lo:hi]
      signs = np.where(rng.random((b, layers)) < 0.5, -1.0, 1.0)[lo:hi]
      if self._pool is not None and len(images) >= 2 * cfg.num_workers:
        # Rows are independent, so chunks over threads give the same
        # result; numpy releases the GIL on these large array ops.
        chunks = np.array_split(np.arange(len(images)), cfg.num_workers)
        images = np.concatenate(
            list(
                self._pool.map(
                    lambda r: aug.rand_augment(images[r], ops[r], signs[r], magnitude), chunks
                )
            )
        )
      else:
        images = aug.rand_augment(images, ops, signs, magnitude)
    return images, np.asarray(labels, np.int32)

  def _mix(self, rng, images, labels):
    mixup_alpha, cutmix_alpha = self.config.mixup_alpha, self.config.cutmix_alpha
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
      return images, labels
    soft = aug.one_hot(labels, self.num_classes)
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    if use_cutmix:
      lam = rng.beta(cutmix_alpha, cutmix_alpha)
      box = aug.cutmix_box(*images.shape[1:3], lam, rng.random(2))
      return aug.cutmix(images, soft, box)
    lam = rng.beta(mixup_alpha, mixup_alpha)
    return aug.mixup(images, soft, lam)


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
