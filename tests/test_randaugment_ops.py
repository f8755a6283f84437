"""Each RandAugment op at magnitude 9 does what its name says.

test_data.py checks the ops' shapes and dtypes (and that magnitude 0 is the
identity), which an op returning its input unchanged would also pass. Here
every op runs through `rand_augment` at magnitude 9 (level 0.9, the ViT
config's (2, 9)) on a small image and is compared with a reference written in
the test: pixel loops for the geometric ops (nearest neighbour about the
image center, fill 128), the blend formulas of PIL's ImageEnhance for the
colour ops, PIL itself for Equalize, and worked-out values for Solarize and
Posterize. Only Identity may return its input.
"""

import math

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest

from srigl_jax.data import augment as aug

MAGNITUDE = 9
LEVEL = MAGNITUDE / 10
H, W = 9, 10  # odd height: the center row lies on a pixel row
FILL = 128


def _image(channels=3, seed=0, shape=(H, W)):
  # Values in [30, 220]: not full range (AutoContrast stretches it), no pixel
  # at 0 or 255.
  rng = np.random.default_rng(seed)
  return rng.integers(30, 221, (1, *shape, channels), dtype=np.uint8)


def _skewed_image(channels, seed):
  # Equalize leaves images under ~256 pixels alone (PIL's step is 0 there):
  # 24x24 pixels, most of them dark, so equalizing spreads them out.
  rng = np.random.default_rng(seed)
  x = 30 + 190 * rng.random((1, 24, 24, channels)) ** 3
  return x.astype(np.uint8)


def _apply(name, images, sign):
  k = list(aug.RANDAUGMENT_OPS).index(name)
  n = images.shape[0]
  return aug.rand_augment(images, np.full((n, 1), k), np.full((n, 1), float(sign)), MAGNITUDE)


def _warp_reference(image, source_of):
  """Nearest-neighbour warp: output (x, y), relative to the center, reads the
  input at source_of(x, y) (also relative to the center); outside: FILL."""
  _, h, w, _ = image.shape
  cy, cx = (h - 1) / 2, (w - 1) / 2
  out = np.full_like(image, FILL)
  for i in range(h):
    for j in range(w):
      sx, sy = source_of(j - cx, i - cy)
      si, sj = int(np.rint(sy + cy)), int(np.rint(sx + cx))
      if 0 <= si < h and 0 <= sj < w:
        out[0, i, j] = image[0, si, sj]
  return out


@pytest.mark.parametrize('sign', [1, -1])
def test_geometric_ops(sign):
  image = _image()
  theta = math.radians(30 * LEVEL) * sign  # 27 degrees
  c, s = math.cos(theta), math.sin(theta)
  shear = 0.3 * LEVEL * sign
  cases = {
      'Rotate': lambda x, y: (c * x + s * y, -s * x + c * y),
      'ShearX': lambda x, y: (x + shear * y, y),
      'ShearY': lambda x, y: (x, shear * x + y),
  }
  for name, source_of in cases.items():
    np.testing.assert_array_equal(
        _apply(name, image, sign), _warp_reference(image, source_of), err_msg=name
    )
  # Translation by 0.45 * 0.9 * size: 4.05 px of 10 columns, 3.645 of 9 rows,
  # so output column j reads input column j + 4 (sign +1) and row i reads row
  # i + 4 (3.645 rounds to 4 from integer positions); the rest is FILL.
  out = _apply('TranslateX', image, sign)
  if sign > 0:
    np.testing.assert_array_equal(out[:, :, :6], image[:, :, 4:])
    assert (out[:, :, 6:] == FILL).all()
  else:
    np.testing.assert_array_equal(out[:, :, 4:], image[:, :, :6])
    assert (out[:, :, :4] == FILL).all()
  out = _apply('TranslateY', image, sign)
  if sign > 0:
    np.testing.assert_array_equal(out[:, :5], image[:, 4:])
    assert (out[:, 5:] == FILL).all()
  else:
    np.testing.assert_array_equal(out[:, 4:], image[:, :5])
    assert (out[:, :4] == FILL).all()


def test_rotate_moves_a_marked_pixel_by_27_degrees():
  # A single bright pixel 4 to the right of the center of a 9x9 image: after
  # the rotation it sits about 4 from the center at an angle of 27 degrees
  # (one way for sign +1, the other for -1), and no longer where it was.
  image = np.zeros((1, 9, 9, 1), np.uint8)
  image[0, 4, 8] = 255
  angles = []
  for sign in (1, -1):
    out = _apply('Rotate', image, sign)[0, :, :, 0]
    assert out[4, 8] != 255
    ys, xs = np.nonzero(out == 255)
    assert len(ys) >= 1
    for y, x in zip(ys, xs):
      assert math.hypot(x - 4, y - 4) == pytest.approx(4, abs=0.75)
    angles.append(np.mean([math.degrees(math.atan2(y - 4, x - 4)) for y, x in zip(ys, xs)]))
  assert sorted(angles) == pytest.approx([-27, 27], abs=8)


@pytest.mark.parametrize('sign', [1, -1])
@pytest.mark.parametrize('channels', [3, 1])
def test_enhance_ops(sign, channels):
  image = _image(channels, seed=channels)
  x = image.astype(np.float64)
  factor = 1 + 0.9 * LEVEL * sign  # 1.81 or 0.19
  gray = x if channels == 1 else (x @ [0.299, 0.587, 0.114])[..., None]
  smooth = x.copy()
  kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13  # PIL's SMOOTH
  for i in range(1, H - 1):
    for j in range(1, W - 1):
      smooth[0, i, j] = np.tensordot(
          kernel, x[0, i - 1 : i + 2, j - 1 : j + 2], axes=([0, 1], [0, 1])
      )
  degenerate = {
      'Brightness': np.zeros_like(x),  # blend towards black
      'Color': gray,  # towards the grey image
      'Contrast': np.full_like(x, gray.mean()),  # towards the mean grey level
      'Sharpness': smooth,  # towards the smoothed image
  }
  for name, deg in degenerate.items():
    want = np.clip(np.rint(deg + factor * (x - deg)), 0, 255)
    got = _apply(name, image, sign).astype(np.float64)
    # float32 vs float64 rounding may move a value at .5 by one level.
    np.testing.assert_allclose(got, want, atol=1, err_msg=name)
    if not (name == 'Color' and channels == 1):
      assert (got != x).mean() > 0.5, name
  if channels == 1:
    # A grey image has no colour to change.
    np.testing.assert_array_equal(_apply('Color', image, sign), image)


def test_solarize_posterize_autocontrast_equalize():
  # Solarize at level 0.9: threshold 256 - 0.9 * 256 = 25.6; pixels >= it are
  # inverted. Posterize: 8 - round(4 * 0.9) = 4 bits kept.
  x = np.array([0, 25, 26, 100, 200, 255], np.uint8).reshape(1, 1, 6, 1)
  np.testing.assert_array_equal(_apply('Solarize', x, 1).ravel(), [0, 25, 255 - 26, 155, 55, 0])
  np.testing.assert_array_equal(_apply('Posterize', x, 1).ravel(), [0, 16, 16, 96, 192, 240])
  # AutoContrast maps each channel's [min, max] to [0, 255] linearly.
  image = _image()
  lo = image.min(axis=(1, 2), keepdims=True).astype(np.float64)
  hi = image.max(axis=(1, 2), keepdims=True).astype(np.float64)
  want = np.rint((image - lo) * 255 / (hi - lo))
  got = _apply('AutoContrast', image, 1)
  np.testing.assert_allclose(got.astype(np.float64), want, atol=1)
  assert (got.min(axis=(1, 2)) == 0).all() and (got.max(axis=(1, 2)) == 255).all()
  # Equalize: PIL's ImageOps.equalize, channel by channel.
  for channels in (1, 3):
    image = _skewed_image(channels, seed=10 + channels)
    pil = PIL.Image.fromarray(image[0, :, :, 0] if channels == 1 else image[0])
    want = np.asarray(PIL.ImageOps.equalize(pil)).reshape(image.shape)
    got = _apply('Equalize', image, 1)
    np.testing.assert_array_equal(got, want)
    assert (got != image).any()


def test_only_identity_returns_its_input():
  image = _skewed_image(3, seed=5)
  for name in aug.RANDAUGMENT_OPS:
    for sign in (1, -1):
      unchanged = np.array_equal(_apply(name, image, sign), image)
      assert unchanged == (name == 'Identity'), (name, sign)
