"""Tests of srigl_jax.data: IDX/TFDS readers, determinism, resumption, sharding, augmentations."""

import concurrent.futures
import gzip
import itertools
import os
import sys

import numpy as np
import pytest
from fixtures import fake_tfds

from srigl_jax import data
from srigl_jax.data import augment as aug
from srigl_jax.data import idx as idx_lib
from srigl_jax.data import pipeline, tfds_source

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


# ------------------------------------------------------------------- helpers


def write_idx(path, array, compress=None):
  """Writes `array` as an IDX file (gzip when the name ends in .gz)."""
  codes = {
      np.uint8: 0x08,
      np.int8: 0x09,
      np.int16: 0x0B,
      np.int32: 0x0C,
      np.float32: 0x0D,
      np.float64: 0x0E,
  }
  code = codes[array.dtype.type]
  header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
  compress = str(path).endswith(".gz") if compress is None else compress
  with open(path, "wb") as f:
    f.write(gzip.compress(payload) if compress else payload)
  return payload


def make_fake_mnist(directory, n_train=96, n_test=10, gz=True, seed=0):
  """Writes the four Fashion-MNIST IDX files with random content; returns the arrays."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  arrays = {}
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    ext = ".gz" if gz else ""
    write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{ext}"), images)
    write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{ext}"), labels)
    arrays[prefix] = (images, labels)
  return arrays


def synthetic_config(**overrides):
  c = data.default_input_config("synthetic")
  c.image_shape = (8, 8, 3)
  c.num_train_examples = 64
  c.num_eval_examples = 10
  for k, v in overrides.items():
    c[k] = v
  return c


def make(config, seed=0, batch=16, eval_batch=None, index=0, count=1):
  return data.create_dataset(
      config,
      seed=seed,
      global_batch_size=batch,
      eval_batch_size=eval_batch,
      process_index=index,
      process_count=count,
  )


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


# ----------------------------------------------------------------------- IDX


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_parse_idx_roundtrip(tmp_path, dtype):
  array = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
  for name in ("a.idx", "a.idx.gz"):
    write_idx(tmp_path / name, array)
    out = idx_lib.read_idx(str(tmp_path / name))
    assert out.dtype == np.dtype(dtype) and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_dataset_from_data_dir(tmp_path, gz):
  arrays = make_fake_mnist(tmp_path, gz=gz)
  c = data.default_input_config("fashion_mnist")
  c.data_dir = str(tmp_path)
  c.prefetch = 0
  ds = make(c, batch=32, eval_batch=4)
  assert (ds.num_train, ds.num_eval, ds.steps_per_epoch) == (96, 10, 3)
  assert ds.image_shape == (28, 28, 1) and ds.num_classes == 10
  # Eval is the test split in file order, normalised: an increasing affine map
  # of the raw pixels (test_real_fashion_mnist checks the statistics).
  batch = next(iter(ds.eval_batches()))
  images, labels = arrays["t10k"]
  raw = images[:4, ..., None].astype(np.float64).ravel()
  got = np.asarray(batch["image"], np.float64).ravel()
  scale, shift = np.polyfit(raw, got, 1)
  assert scale > 0
  np.testing.assert_allclose(got, scale * raw + shift, atol=1e-5)
  np.testing.assert_array_equal(batch["label"], labels[:4])
  # An epoch of training without augmentation visits every example once.
  epoch = take(ds.train_batches(), ds.steps_per_epoch)
  seen = np.concatenate([b["label"] for b in epoch])
  np.testing.assert_array_equal(np.sort(seen), np.sort(arrays["train"][1]))


def test_num_examples_takes_first_n(tmp_path):
  arrays = make_fake_mnist(tmp_path)
  c = data.default_input_config("fashion_mnist")
  c.data_dir = str(tmp_path)
  c.num_train_examples = 40
  c.num_eval_examples = 3
  c.prefetch = 0
  ds = make(c, batch=8, eval_batch=3)
  assert (ds.num_train, ds.num_eval, ds.steps_per_epoch) == (40, 3, 5)
  labels = np.concatenate([b["label"] for b in take(ds.train_batches(), 5)])
  np.testing.assert_array_equal(np.sort(labels), np.sort(arrays["train"][1][:40]))
  c.num_train_examples = 1000
  with pytest.raises(ValueError, match="num_train_examples=1000"):
    make(c)


@pytest.mark.skipif(not os.path.isdir(FASHION_DIR), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
  c = data.default_input_config("fashion_mnist")  # Default data_dir.
  ds = make(c, batch=256, eval_batch=1000)
  assert (ds.num_train, ds.num_eval, ds.steps_per_epoch) == (60000, 10000, 234)
  # Fashion-MNIST is balanced: 6000 train and 1000 test images per class.
  np.testing.assert_array_equal(np.bincount(ds.train_source.labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(ds.eval_source.labels), [1000] * 10)
  batch = next(ds.train_batches())
  assert batch["image"].shape == (256, 28, 28, 1) and batch["label"].dtype == np.int32
  evals = list(ds.eval_batches())
  assert len(evals) == 10 and sum(b["mask"].sum() for b in evals) == 10000
  # The batches the model sees are normalised with the dataset's statistics:
  # about zero mean and unit variance over the test split.
  x = np.concatenate([b["image"][b["mask"] > 0] for b in evals])
  assert abs(x.mean()) < 0.05 and abs(x.std() - 1) < 0.05


# -------------------------------------------------------------------- errors


def test_missing_idx_file_error(tmp_path):
  c = data.default_input_config("fashion_mnist")
  c.data_dir = str(tmp_path / "nowhere")
  with pytest.raises(data.DatasetNotFoundError) as e:
    make(c)
  msg = str(e.value)
  assert str(tmp_path / "nowhere") in msg
  assert "apt-get install -y dataset-fashion-mnist" in msg and "data_dir" in msg


def test_truncated_idx_errors(tmp_path):
  payload = write_idx(tmp_path / "x", np.zeros((5, 28, 28), np.uint8))
  (tmp_path / "raw").write_bytes(payload[:-100])
  with pytest.raises(data.DataFormatError, match=r"raw.*truncated"):
    idx_lib.read_idx(str(tmp_path / "raw"))
  gz = gzip.compress(payload)
  (tmp_path / "cut.gz").write_bytes(gz[: len(gz) // 2])
  with pytest.raises(data.DataFormatError, match=r"cut\.gz.*truncated"):
    idx_lib.read_idx(str(tmp_path / "cut.gz"))
  # A truncated file inside a data_dir surfaces through create_dataset too.
  make_fake_mnist(tmp_path / "d", gz=False)
  path = tmp_path / "d" / "train-images-idx3-ubyte"
  path.write_bytes(path.read_bytes()[:1000])
  c = data.default_input_config("fashion_mnist")
  c.data_dir = str(tmp_path / "d")
  with pytest.raises(data.DataFormatError, match="train-images-idx3-ubyte"):
    make(c)


def test_bad_idx_magic_and_mismatch(tmp_path):
  (tmp_path / "bad").write_bytes(b"\x1f\x8b\x08\x03" + bytes(100))
  with pytest.raises(data.DataFormatError, match="bad IDX magic"):
    idx_lib.read_idx(str(tmp_path / "bad"))
  with pytest.raises(data.DataFormatError, match="too short"):
    idx_lib.parse_idx(b"\x00\x00")
  # Labels whose count differs from the images'.
  make_fake_mnist(tmp_path / "d")
  write_idx(tmp_path / "d" / "train-labels-idx1-ubyte.gz", np.zeros(7, np.uint8))
  c = data.default_input_config("fashion_mnist")
  c.data_dir = str(tmp_path / "d")
  with pytest.raises(data.DataFormatError, match="labels"):
    make(c)


def test_config_errors():
  with pytest.raises(ValueError, match="Unknown dataset name 'cifar100'.*fashion_mnist.*synthetic"):
    data.default_input_config("cifar100")
  with pytest.raises(ValueError, match="Unknown dataset name"):
    make({"name": "imagenet"})
  with pytest.raises(ValueError, match=r"Unknown input config field.*'mixup'"):
    make({"name": "synthetic", "mixup": 0.2})
  with pytest.raises(ValueError, match="augment='inception_crop_flip'"):
    make(synthetic_config(augment="inception_crop_flip"))
  with pytest.raises(ValueError, match="randaugment"):
    make(synthetic_config(randaugment=(2,)))
  with pytest.raises(ValueError, match="divisible by process_count=3"):
    make(synthetic_config(), batch=16, count=3)
  with pytest.raises(ValueError, match="exceeds"):
    make(synthetic_config(), batch=128)


def test_partial_config_object_gets_defaults():
  class Cfg:
    name = "synthetic"
    image_shape = (4, 4, 1)
    prefetch = 0

  ds = make(Cfg(), batch=8)
  assert ds.image_shape == (4, 4, 1) and ds.num_train == 4096
  assert next(ds.train_batches())["image"].shape == (8, 4, 4, 1)


def test_missing_tfds_dataset_fails_before_tfds(tmp_path, monkeypatch):
  # The check of the prepared files runs before tensorflow_datasets is
  # imported (seconds) or any split is opened: an import of it here fails
  # with ImportError, an open with AssertionError.
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)

  def no_open(*args):
    raise AssertionError(f"a split was opened: {args}")

  monkeypatch.setattr(tfds_source, "open_data_source", no_open)
  for name, hint in (("cifar10", "tfds build cifar10"), ("imagenet2012", "downloads/manual")):
    c = data.default_input_config(name)
    c.data_dir = str(tmp_path)
    with pytest.raises(data.DatasetNotFoundError) as e:
      make(c)
    assert hint in str(e.value) and str(tmp_path) in str(e.value)
    assert "--file_format=array_record" in str(e.value)
  # Prepared as TFRecord (the tfds build default): say so, rather than fail in tfds.
  version_dir = tmp_path / "cifar10" / "3.0.2"
  version_dir.mkdir(parents=True)
  (version_dir / "dataset_info.json").write_text("{}")
  (version_dir / "cifar10-train.tfrecord-00000-of-00001").write_bytes(b"")
  c = data.default_input_config("cifar10")
  c.data_dir = str(tmp_path)
  with pytest.raises(data.DataFormatError, match="TFRecord"):
    make(c)
  # One split prepared, the other missing.
  (version_dir / "cifar10-train.array_record-00000-of-00001").write_bytes(b"")
  with pytest.raises(data.DatasetNotFoundError, match="split 'test' missing"):
    make(c)


# ---------------------------------------------------------------------- TFDS


class FakeSource:
  """A random-access source like `tfds.data_source`'s, over a list of dicts."""

  def __init__(self, examples):
    self.examples = examples
    self.batched_reads = 0

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    return self.examples[i]

  def __getitems__(self, keys):
    self.batched_reads += 1
    return [self.examples[i] for i in keys]


def test_random_access_split_adapter():
  rng = np.random.default_rng(0)
  examples = [
      {"image": rng.integers(0, 256, (5 + i, 6, 3), dtype=np.uint8), "label": i % 3}
      for i in range(7)
  ]
  source = FakeSource(examples)
  split = tfds_source.RandomAccessSplit(source, num_examples=6)
  assert len(split) == 6
  images, labels = split.read([4, 1])
  assert source.batched_reads == 1
  np.testing.assert_array_equal(images[0], examples[4]["image"])
  np.testing.assert_array_equal(labels, [1, 1])
  assert labels.dtype == np.int32
  with pytest.raises(IndexError):
    split.read([6])
  with pytest.raises(data.DataFormatError, match="differ in shape"):
    split.read_all()
  gray = tfds_source.RandomAccessSplit([{"image": np.ones((4, 4), np.uint8), "label": 2}] * 3)
  images, labels = gray.read_all(chunk=2)
  assert images.shape == (3, 4, 4, 1) and list(labels) == [2, 2, 2]


@pytest.fixture(scope="module")
def fake_tfds_dir(tmp_path_factory):
  """Prepares tiny fake cifar10 and imagenet2012 as array_record, offline and without TF."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  written = fake_tfds.prepare(
      data_dir,
      "cifar10",
      {"train": (20, lambda rng: (32, 32, 3)), "test": (7, lambda rng: (32, 32, 3))},
  )
  variable = lambda rng: (*rng.integers(20, 60, 2), 3)
  fake_tfds.prepare(
      data_dir, "imagenet2012", {"train": (12, variable), "validation": (5, variable)}, seed=1
  )
  return data_dir, written


def test_tfds_cifar10_through_data_source(fake_tfds_dir):
  data_dir, written = fake_tfds_dir
  source = tfds_source.open_data_source("cifar10", data_dir, "train")
  assert len(source) == 20
  split = tfds_source.RandomAccessSplit(source)
  images, labels = split.read(range(20))
  for i, image in enumerate(images):
    key = source[i]["id"]
    key = key.decode() if isinstance(key, bytes) else key
    np.testing.assert_array_equal(image, written[key])  # PNG is lossless.
  c = data.default_input_config("cifar10")
  c.data_dir = data_dir
  c.prefetch = 0
  ds = make(c, batch=8, eval_batch=4)
  assert (ds.num_train, ds.num_eval, ds.image_shape, ds.num_classes) == (20, 7, (32, 32, 3), 10)
  batch = next(ds.train_batches())
  assert batch["image"].shape == (8, 32, 32, 3) and batch["label"].shape == (8,)
  masks = [b["mask"].tolist() for b in ds.eval_batches()]
  assert masks == [[1, 1, 1, 1], [1, 1, 1, 0]]
  # Reading through tfds on every step, in threads, gives the same batches.
  c.cache = False
  c.num_threads = 2
  uncached = make(c, batch=8, eval_batch=4)
  assert_batches_equal(take(uncached.train_batches(), 3), take(ds.train_batches(), 3))
  assert_batches_equal(list(uncached.eval_batches()), list(ds.eval_batches()))


def test_tfds_imagenet_crop_resize(fake_tfds_dir):
  data_dir, _ = fake_tfds_dir
  c = data.default_input_config("imagenet2012")
  c.data_dir = data_dir
  c.image_size = 24
  c.randaugment = (2, 9)
  c.mixup_alpha = 0.2
  c.num_workers = 1  # The tfds source is pickled into a worker process.
  ds = make(c, batch=4, eval_batch=4, index=1, count=2)
  assert ds.image_shape == (24, 24, 3) and ds.num_classes == 1000
  a = take(ds.train_batches(), 3)
  b = take(ds.train_batches(start_step=1), 2)
  assert_batches_equal(a[1:], b)
  assert a[0]["image"].shape == (2, 24, 24, 3) and a[0]["label"].shape == (2, 1000)
  np.testing.assert_allclose(a[0]["label"].sum(-1), 1.0, rtol=1e-6)
  masks = [x["mask"].tolist() for x in ds.eval_batches()]
  assert masks == [[1, 1], [0, 0]]  # Process 1 holds rows 2-3 of each batch of 4 (5 real).


# ------------------------------------------------- determinism, resume, split


AUG_CONFIGS = {
    "crop_flip_ra": dict(augment="crop_flip", randaugment=(2, 9)),
    "mix": dict(augment="crop_flip", mixup_alpha=0.2, cutmix_alpha=1.0),
}


@pytest.mark.parametrize("name", sorted(AUG_CONFIGS))
def test_determinism_and_seed(name):
  config = synthetic_config(**AUG_CONFIGS[name])
  a = take(make(config, seed=3).train_batches(), 6)
  b = take(make(config, seed=3).train_batches(), 6)
  assert_batches_equal(a, b)
  c = take(make(config, seed=4).train_batches(), 6)
  assert all(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, c))


@pytest.mark.parametrize("name", sorted(AUG_CONFIGS))
def test_resume_from_step(name):
  config = synthetic_config(**AUG_CONFIGS[name])
  ds = make(config)  # 4 steps per epoch: 10 steps cross two epoch boundaries.
  full = take(ds.train_batches(), 10)
  for s in (1, 4, 7):
    assert_batches_equal(take(make(config).train_batches(start_step=s), 10 - s), full[s:])
  # Epochs reshuffle: the same positions of two epochs hold different examples.
  plain = make(synthetic_config(prefetch=0))
  e0, e1 = plain.train_batch(0), plain.train_batch(plain.steps_per_epoch)
  assert not np.array_equal(e0["image"], e1["image"])


def test_prefetch_does_not_change_batches():
  a = take(make(synthetic_config(randaugment=(1, 5), prefetch=0)).train_batches(), 5)
  b = take(make(synthetic_config(randaugment=(1, 5), prefetch=3)).train_batches(), 5)
  assert_batches_equal(a, b)


def test_process_split_matches_global_batch():
  config = synthetic_config(augment="crop_flip", randaugment=(2, 9))
  whole = take(make(config, batch=16, eval_batch=8).train_batches(), 5)
  parts = [
      take(make(config, batch=16, eval_batch=8, index=p, count=2).train_batches(), 5)
      for p in range(2)
  ]
  for s in range(5):
    for key in ("image", "label"):
      assert parts[0][s][key].shape[0] == 8
      np.testing.assert_array_equal(
          np.concatenate([parts[0][s][key], parts[1][s][key]]), whole[s][key]
      )
  whole_eval = list(make(config, batch=16, eval_batch=8).eval_batches())
  eval_parts = [
      list(make(config, batch=16, eval_batch=8, index=p, count=2).eval_batches()) for p in range(2)
  ]
  assert len(eval_parts[0]) == len(eval_parts[1]) == len(whole_eval) == 2
  for b in range(2):
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(
          np.concatenate([eval_parts[0][b][key], eval_parts[1][b][key]]), whole_eval[b][key]
      )


def test_eval_padding_and_mask():
  config = synthetic_config(augment="crop_flip", randaugment=(2, 9), mixup_alpha=0.5)
  ds = make(config, eval_batch=4)
  batches = list(ds.eval_batches())
  assert len(batches) == ds.num_eval_batches == 3
  np.testing.assert_array_equal(batches[-1]["mask"], [1, 1, 0, 0])
  assert all(b["mask"].dtype == np.float32 for b in batches)
  assert not batches[-1]["image"][2:].any() and not batches[-1]["label"][2:].any()
  # Fixed order, no augmentation, integer labels, even with mixup configured.
  images = np.concatenate([b["image"] for b in batches])[:10]
  labels = np.concatenate([b["label"] for b in batches])[:10]
  np.testing.assert_allclose(images, (ds.eval_source.images / 255.0 - 0.5) / 0.25, atol=1e-5)
  np.testing.assert_array_equal(labels, ds.eval_source.labels)
  assert labels.dtype == np.int32
  assert_batches_equal(batches, list(ds.eval_batches()))


def test_mix_soft_labels():
  ds = make(synthetic_config(mixup_alpha=0.4, cutmix_alpha=1.0))
  for batch in take(ds.train_batches(), 4):
    assert batch["label"].shape == (16, 10) and batch["label"].dtype == np.float32
    np.testing.assert_allclose(batch["label"].sum(-1), 1.0, rtol=1e-6)
    assert batch["image"].dtype == np.float32


def test_synthetic_is_learnable_by_templates():
  # A nearest-class-mean classifier on raw pixels should beat chance by far.
  ds = make(
      synthetic_config(num_train_examples=512, num_eval_examples=256, image_shape=(12, 12, 3))
  )
  x, y = ds.train_source.images.reshape(512, -1) / 255.0, ds.train_source.labels
  # Phases vary, so use the power spectrum, which is phase-invariant.
  feat = lambda im: np.abs(np.fft.fft2(im.reshape(-1, 12, 12, 3), axes=(1, 2))).reshape(len(im), -1)
  means = np.stack([feat(x[y == k]).mean(0) for k in range(10)])
  xe = ds.eval_source.images.reshape(256, -1) / 255.0
  pred = np.argmin(((feat(xe)[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert (pred == ds.eval_source.labels).mean() > 0.5


# ------------------------------------------------------------- augmentations


def test_pad_crop_flip_exact():
  image = np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1) + 1
  same = aug.pad_crop_flip(image, np.array([[2, 2]]), np.array([False]), padding=2)
  np.testing.assert_array_equal(same, image)
  shifted = aug.pad_crop_flip(image, np.array([[0, 1]]), np.array([False]), padding=2)
  expected = np.zeros((4, 4), np.uint8)
  expected[2:, 1:] = image[0, :2, :3, 0]
  np.testing.assert_array_equal(shifted[0, ..., 0], expected)
  flipped = aug.pad_crop_flip(image, np.array([[2, 2]]), np.array([True]), padding=2)
  np.testing.assert_array_equal(flipped, image[:, :, ::-1])
  batch = np.repeat(image, 2, axis=0)
  out = aug.pad_crop_flip(batch, np.array([[2, 2], [2, 2]]), np.array([False, True]), padding=2)
  np.testing.assert_array_equal(out[0], image[0])
  np.testing.assert_array_equal(out[1], image[0, :, ::-1])


def _pad_crop_flip_reference(images, offsets, flips, padding):
  """pad_crop_flip as one gather of the padded batch (plain numpy, obviously right)."""
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  rows = offsets[:, 0, None] + np.arange(h)[None]
  cols = offsets[:, 1, None] + np.where(flips[:, None], np.arange(w)[::-1], np.arange(w))
  return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


@pytest.mark.parametrize("padding", [0, 1, 4, 11])
def test_pad_crop_flip_matches_gather_reference(padding):
  rng = np.random.default_rng(padding)
  for shape in ((13, 32, 32, 3), (5, 7, 9, 1), (2, 3, 5, 2)):
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    offsets = rng.integers(0, 2 * padding + 1, (shape[0], 2))
    flips = rng.random(shape[0]) < 0.5
    np.testing.assert_array_equal(
        aug.pad_crop_flip(images, offsets, flips, padding),
        _pad_crop_flip_reference(images, offsets, flips, padding),
    )


def test_crop_boxes_and_resize():
  rng = np.random.default_rng(0)
  for _ in range(50):
    h, w = rng.integers(10, 200, 2)
    top, left, ch, cw = aug.inception_crop_box(h, w, rng.random((10, 4)))
    assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w and ch > 0 and cw > 0
  # All attempts rejected (area > image): fall back to a centered crop with a legal ratio.
  assert aug.inception_crop_box(100, 400, np.full((3, 4), 0.999), area_range=(2.0, 3.0)) == (
      0,
      133,
      100,
      133,
  )
  assert aug.center_crop_box(100, 60, 0.5) == (35, 15, 30, 30)
  image = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
  # Resizing a crop to its own size is the crop itself.
  np.testing.assert_array_equal(aug.crop_resize(image, (1, 2, 4, 4), 4), image[1:5, 2:6])
  np.testing.assert_array_equal(
      aug.crop_resize(image, (1, 2, 4, 4), 4, flip=True), image[1:5, 2:6][:, ::-1]
  )
  gray = rng.integers(0, 256, (9, 7, 1), dtype=np.uint8)
  assert aug.crop_resize(gray, (0, 0, 9, 7), 5).shape == (5, 5, 1)
  constant = np.full((30, 20, 3), 77, np.uint8)
  np.testing.assert_array_equal(aug.crop_resize(constant, (3, 2, 20, 11), 8), 77)


def test_normalize():
  x = np.array([[[[0, 255]]]], np.uint8).reshape(1, 1, 1, 2)
  out = aug.normalize(x, (0.5, 0.0), (0.5, 1.0))
  np.testing.assert_allclose(out, [[[[-1.0, 1.0]]]], atol=1e-6)
  assert out.dtype == np.float32
  # The lookup table gives exactly the float32 arithmetic, for 1 and 3 channels.
  rng = np.random.default_rng(0)
  for mean, std in (((0.2860,), (0.3530,)), ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))):
    x = rng.integers(0, 256, (3, 5, 4, len(mean)), dtype=np.uint8)
    m, s = np.float32(mean), np.float32(std)
    np.testing.assert_array_equal(
        aug.normalize(x, mean, std), x.astype(np.float32) * (1.0 / (255.0 * s)) - m / s
    )


def test_rand_augment_ops():
  rng = np.random.default_rng(0)
  for shape in ((6, 10, 10, 3), (6, 10, 10, 1)):
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    signs = np.where(rng.random((6, 1)) < 0.5, -1.0, 1.0)
    for k, name in enumerate(aug.RANDAUGMENT_OPS):
      out = aug.rand_augment(images, np.full((6, 1), k), signs, magnitude=9)
      assert out.shape == shape and out.dtype == np.uint8, name
      if name == "Identity":
        np.testing.assert_array_equal(out, images)
    out = aug.rand_augment(
        images, rng.integers(0, aug.NUM_RANDAUGMENT_OPS, (6, 3)), np.ones((6, 3)), magnitude=15
    )
    assert out.shape == shape
  # Magnitude 0 leaves the enhance ops as identity.
  for name in ("Color", "Contrast", "Brightness", "Sharpness", "Rotate", "ShearX", "TranslateY"):
    k = list(aug.RANDAUGMENT_OPS).index(name)
    out = aug.rand_augment(images, np.full((6, 1), k), np.ones((6, 1)), magnitude=0)
    np.testing.assert_array_equal(out, images, err_msg=name)


def test_affine_warp_translate_and_fill():
  image = np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1)
  identity = np.array([[[1.0, 0, 0], [0, 1.0, 0]]])
  np.testing.assert_array_equal(aug.affine_warp(image, identity), image)
  # Output (x, y) reads input (x + 1, y): content moves one pixel left.
  shift = np.array([[[1.0, 0, 1.0], [0, 1.0, 0]]])
  out = aug.affine_warp(image, shift, fill=200)
  np.testing.assert_array_equal(out[0, :, :3, 0], image[0, :, 1:, 0])
  np.testing.assert_array_equal(out[0, :, 3, 0], 200)


def test_mixup_and_cutmix():
  images = np.stack([np.zeros((4, 4, 1)), np.ones((4, 4, 1))]).astype(np.float32)
  labels = aug.one_hot(np.array([0, 1]), 3)
  mixed, soft = aug.mixup(images, labels, 0.75)
  np.testing.assert_allclose(mixed[0], 0.25)
  np.testing.assert_allclose(soft, [[0.75, 0.25, 0], [0.25, 0.75, 0]])
  box = aug.cutmix_box(4, 4, 0.75, (0.5, 0.5))
  assert box == (1, 3, 1, 3)
  cut, soft = aug.cutmix(images, labels, box)
  assert cut[0].sum() == 4 and cut[1].sum() == 12
  np.testing.assert_allclose(soft, [[0.75, 0.25, 0], [0.25, 0.75, 0]])


# ------------------------------------------------- grain: workers, epochs, errors


def test_workers_and_threads_do_not_change_batches():
  config = synthetic_config(augment="crop_flip", randaugment=(2, 9), mixup_alpha=0.4, prefetch=0)
  reference = take(make(config).train_batches(start_step=3), 4)
  threaded = synthetic_config(**{**config.to_dict(), "num_threads": 3, "prefetch": 2})
  assert_batches_equal(take(make(threaded).train_batches(start_step=3), 4), reference)
  # Worker processes (spawned, so the pipeline is pickled into them).
  workers = synthetic_config(**{**config.to_dict(), "num_workers": 1, "prefetch": 2})
  ds = make(workers)
  iterator = ds.train_batches(start_step=3)
  try:
    assert_batches_equal(take(iterator, 4), reference)
  finally:
    iterator.close()
  assert_batches_equal(list(ds.eval_batches()), list(make(config).eval_batches()))


def test_each_epoch_is_a_new_permutation_of_the_split():
  # 40 examples in batches of 16: batches run across epoch boundaries, and
  # stream positions [40e, 40e + 40) hold every example once.
  ds = make(synthetic_config(num_train_examples=40, prefetch=0), batch=16)
  source = ds.train_source.images.reshape(40, -1).astype(np.float32)
  stream = np.concatenate([ds.train_batch(s)["image"] for s in range(10)]).reshape(160, -1)
  # Undo the normalisation by matching each row to its nearest source image.
  rows = stream * 0.25 * 255 + 0.5 * 255
  ids = np.argmin(((rows[:, None] - source[None]) ** 2).sum(-1), axis=1)
  epochs = ids.reshape(4, 40)
  for e in range(4):
    assert sorted(epochs[e]) == list(range(40))
  assert len({tuple(e) for e in epochs}) == 4


def test_shuffled_batches_random_access_from_threads():
  # 10 examples in batches of 4; every access order and any number of threads
  # give the same batches, and epoch e is default_rng([seed, 1, e]).permutation.
  sequential = [pipeline.ShuffledBatches(10, 4, seed=3)[j] for j in range(25)]
  stream = np.concatenate(sequential)
  for e in range(10):
    np.testing.assert_array_equal(
        stream[10 * e : 10 * e + 10], np.random.default_rng([3, 1, e]).permutation(10)
    )
  shared = pipeline.ShuffledBatches(10, 4, seed=3)
  order = np.random.default_rng(0).permutation(np.tile(np.arange(25), 8))
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    got = list(pool.map(lambda j: (j, shared[int(j)]), order))
  for j, batch in got:
    np.testing.assert_array_equal(batch, sequential[j])


def test_worker_count_the_machine_cannot_honour_is_refused():
  cpus = data.available_cpus()
  with pytest.raises(ValueError, match=rf"num_workers={cpus + 1} but .* {cpus} CPU.*\[0, {cpus}\]"):
    make(synthetic_config(num_workers=cpus + 1))
  with pytest.raises(ValueError, match=r"num_workers=-1"):
    make(synthetic_config(num_workers=-1))
  with pytest.raises(ValueError, match=r"num_threads must be an int >= 0"):
    make(synthetic_config(num_threads=-2))
