"""Image augmentations in numpy, vectorised over the batch where the shapes allow.

Every random choice is passed in as an argument (offsets, flips, uniforms, op
indices) so the caller decides where randomness comes from; the pipeline
draws them for a whole global batch from (seed, step) and keeps each
process's rows, which makes a row's data independent of the process count.
Images are uint8 (B, H, W, C) until `normalize`.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

# ---------------------------------------------------------------- crop / flip


def pad_crop_flip(
    images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, padding: int
) -> np.ndarray:
  """Zero-pads by `padding`, crops back to (H, W) and flips horizontally.

  Args:
    images: uint8 (B, H, W, C).
    offsets: int (B, 2), the (row, column) of each crop's top-left corner in
      the padded image, each in [0, 2 * padding].
    flips: bool (B,), True flips that image left-right (after the crop).
    padding: pixels of zero padding on each side.

  Returns:
    uint8 (B, H, W, C).
  """
  _, h, w, _ = images.shape
  out = np.zeros_like(images)
  # One slice copy per image: the part of the image that stays inside the
  # crop window, written where the window puts it (the rest stays zero
  # padding). Three times faster than one fancy-index gather of the padded
  # batch at CIFAR's 128 x 32 x 32 x 3.
  for i, (top, left) in enumerate(np.asarray(offsets, np.int64) - padding):
    r0, r1 = max(top, 0), min(h + top, h)  # Source rows kept.
    c0, c1 = max(left, 0), min(w + left, w)  # Source columns kept.
    if r0 >= r1 or c0 >= c1:
      continue
    rows = slice(r0 - top, r1 - top)
    if flips[i]:
      out[i, rows, w - (c1 - left) : w - (c0 - left)] = images[i, r0:r1, c0:c1][:, ::-1]
    else:
      out[i, rows, c0 - left : c1 - left] = images[i, r0:r1, c0:c1]
  return out


def inception_crop_box(
    height: int,
    width: int,
    uniforms: np.ndarray,
    area_range: tuple[float, float] = (0.08, 1.0),
    ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
  """Samples the crop of Inception's random-resized-crop.

  Tries `len(uniforms)` (area, aspect ratio, position) samples and keeps the
  first that fits in the image; falls back to the largest centered crop with
  an aspect ratio inside `ratio_range`.

  Args:
    height: image height.
    width: image width.
    uniforms: float (attempts, 4) in [0, 1): area, log-ratio, top, left.
    area_range: crop area as a fraction of the image area.
    ratio_range: crop width / height.

  Returns:
    (top, left, crop_height, crop_width).
  """
  area = height * width
  log_lo, log_hi = math.log(ratio_range[0]), math.log(ratio_range[1])
  for u_area, u_ratio, u_top, u_left in uniforms:
    target = area * (area_range[0] + u_area * (area_range[1] - area_range[0]))
    ratio = math.exp(log_lo + u_ratio * (log_hi - log_lo))
    w = int(round(math.sqrt(target * ratio)))
    h = int(round(math.sqrt(target / ratio)))
    if 0 < w <= width and 0 < h <= height:
      top = int(u_top * (height - h + 1))
      left = int(u_left * (width - w + 1))
      return top, left, h, w
  ratio = width / height
  if ratio < ratio_range[0]:
    w, h = width, int(round(width / ratio_range[0]))
  elif ratio > ratio_range[1]:
    h, w = height, int(round(height * ratio_range[1]))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def center_crop_box(
    height: int, width: int, crop_fraction: float = 0.875
) -> tuple[int, int, int, int]:
  """The square center crop of side `crop_fraction * min(height, width)`.

  Resizing this box to S x S equals the usual "resize the short side to
  S / crop_fraction, then center-crop S".

  Returns:
    (top, left, crop_height, crop_width).
  """
  side = max(1, int(round(crop_fraction * min(height, width))))
  return (height - side) // 2, (width - side) // 2, side, side


def crop_resize(
    image: np.ndarray, box: tuple[int, int, int, int], size: int, flip: bool = False
) -> np.ndarray:
  """Crops `box` out of one image and resizes it bilinearly to (size, size).

  Args:
    image: uint8 (H, W, C) with C in {1, 3}.
    box: (top, left, height, width).
    size: output side.
    flip: flip left-right after resizing.

  Returns:
    uint8 (size, size, C).
  """
  top, left, h, w = box
  channels = image.shape[-1]
  pil = Image.fromarray(image[..., 0] if channels == 1 else image)
  # `box` lets PIL filter from the original pixels, which is both faster and
  # better than cropping first and resizing the crop.
  pil = pil.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
  out = np.asarray(pil, dtype=np.uint8)
  if channels == 1:
    out = out[..., None]
  return out[:, ::-1] if flip else out


# ------------------------------------------------------------- normalisation


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
  """Maps uint8 (..., C) images to float32 `(x / 255 - mean) / std` per channel.

  A 256-entry table per channel, read with one `np.take` per channel: a
  quarter of the time of converting to float and scaling, with the same
  float32 values (the table holds exactly what that arithmetic gives).
  """
  channels = images.shape[-1]
  mean = np.broadcast_to(np.asarray(mean, np.float32), (channels,))
  std = np.broadcast_to(np.asarray(std, np.float32), (channels,))
  scale = 1.0 / (255.0 * std)
  table = np.arange(256, dtype=np.float32)[:, None] * scale - mean / std  # (256, C)
  out = np.empty(images.shape, np.float32)
  for c in range(channels):
    np.take(table[:, c], images[..., c], out=out[..., c], mode="clip")
  return out


# --------------------------------------------------------------- RandAugment

_GRAY = np.array([0.299, 0.587, 0.114], np.float32)


def _gray(x: np.ndarray) -> np.ndarray:
  """Float (n, H, W, 1) luminance of float images."""
  if x.shape[-1] == 1:
    return x
  return (x @ _GRAY)[..., None]


def _blend(degenerate: np.ndarray, x: np.ndarray, factor: np.ndarray) -> np.ndarray:
  """PIL ImageEnhance-style blend: factor 0 gives `degenerate`, 1 gives `x`."""
  f = factor.reshape(-1, 1, 1, 1).astype(np.float32)
  return degenerate + f * (x - degenerate)


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def affine_warp(images: np.ndarray, matrices: np.ndarray, fill: int = 128) -> np.ndarray:
  """Nearest-neighbour affine warp about the image center, batched.

  Args:
    images: uint8 (n, H, W, C).
    matrices: float (n, 2, 3); output pixel (x, y), taken relative to the
      center, reads the input at `M @ (x, y, 1)` (also relative to the center).
    fill: value of pixels that map outside the input.

  Returns:
    uint8 (n, H, W, C).
  """
  n, h, w, _ = images.shape
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  ys, xs = np.meshgrid(np.arange(h) - cy, np.arange(w) - cx, indexing="ij")
  m = matrices[:, :, None, None, :]
  src_x = m[:, 0, ..., 0] * xs + m[:, 0, ..., 1] * ys + m[:, 0, ..., 2] + cx
  src_y = m[:, 1, ..., 0] * xs + m[:, 1, ..., 1] * ys + m[:, 1, ..., 2] + cy
  ix = np.rint(src_x).astype(np.int64)
  iy = np.rint(src_y).astype(np.int64)
  inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
  out = images[np.arange(n)[:, None, None], np.clip(iy, 0, h - 1), np.clip(ix, 0, w - 1)]
  return np.where(inside[..., None], out, np.uint8(fill))


def _op_identity(x, signs, level):
  return x


def _op_auto_contrast(x, signs, level):
  lo = x.min(axis=(1, 2), keepdims=True).astype(np.float32)
  hi = x.max(axis=(1, 2), keepdims=True).astype(np.float32)
  flat = hi <= lo
  scale = np.where(flat, 1.0, 255.0 / np.where(flat, 1.0, hi - lo))
  out = (x - np.where(flat, 0.0, lo)) * scale
  return _to_uint8(out)


def _op_equalize(x, signs, level):
  # Histogram equalisation has no batched form worth the complexity; the
  # loop is over (image, channel), not pixels.
  out = np.empty_like(x)
  for i in range(x.shape[0]):
    for c in range(x.shape[-1]):
      ch = x[i, :, :, c]
      hist = np.bincount(ch.ravel(), minlength=256)
      nonzero = hist[hist > 0]
      step = (hist.sum() - nonzero[-1]) // 255 if len(nonzero) else 0
      if step == 0:
        out[i, :, :, c] = ch
        continue
      lut = (np.cumsum(hist) - hist + step // 2) // step
      out[i, :, :, c] = np.clip(lut, 0, 255).astype(np.uint8)[ch]
  return out


def _op_rotate(x, signs, level):
  theta = np.deg2rad(30.0 * level) * signs
  c, s = np.cos(theta), np.sin(theta)
  z = np.zeros_like(c)
  return affine_warp(x, np.stack([np.stack([c, s, z], -1), np.stack([-s, c, z], -1)], 1))


def _op_shear_x(x, signs, level):
  k = 0.3 * level * signs
  o, z = np.ones_like(k), np.zeros_like(k)
  return affine_warp(x, np.stack([np.stack([o, k, z], -1), np.stack([z, o, z], -1)], 1))


def _op_shear_y(x, signs, level):
  k = 0.3 * level * signs
  o, z = np.ones_like(k), np.zeros_like(k)
  return affine_warp(x, np.stack([np.stack([o, z, z], -1), np.stack([k, o, z], -1)], 1))


def _op_translate_x(x, signs, level):
  t = 0.45 * level * x.shape[2] * signs
  o, z = np.ones_like(t), np.zeros_like(t)
  return affine_warp(x, np.stack([np.stack([o, z, t], -1), np.stack([z, o, z], -1)], 1))


def _op_translate_y(x, signs, level):
  t = 0.45 * level * x.shape[1] * signs
  o, z = np.ones_like(t), np.zeros_like(t)
  return affine_warp(x, np.stack([np.stack([o, z, z], -1), np.stack([z, o, t], -1)], 1))


def _op_solarize(x, signs, level):
  threshold = 256 - min(level, 1.0) * 256
  return np.where(x >= threshold, 255 - x, x).astype(np.uint8)


def _op_posterize(x, signs, level):
  bits = int(np.clip(8 - round(4 * level), 1, 8))
  mask = np.uint8((0xFF << (8 - bits)) & 0xFF)
  return x & mask


def _enhance_factor(signs, level):
  return np.maximum(0.0, 1.0 + 0.9 * level * signs)


def _op_color(x, signs, level):
  xf = x.astype(np.float32)
  return _to_uint8(_blend(_gray(xf), xf, _enhance_factor(signs, level)))


def _op_contrast(x, signs, level):
  xf = x.astype(np.float32)
  mean = _gray(xf).mean(axis=(1, 2, 3), keepdims=True)
  return _to_uint8(_blend(mean, xf, _enhance_factor(signs, level)))


def _op_brightness(x, signs, level):
  xf = x.astype(np.float32)
  return _to_uint8(_blend(np.zeros_like(xf), xf, _enhance_factor(signs, level)))


def _op_sharpness(x, signs, level):
  xf = x.astype(np.float32)
  # PIL's SMOOTH kernel; the one-pixel border is left unsmoothed as in PIL.
  k = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13.0
  smooth = xf.copy()
  h, w = x.shape[1:3]
  if h > 2 and w > 2:
    acc = np.zeros_like(xf[:, 1:-1, 1:-1])
    for dy in range(3):
      for dx in range(3):
        acc += k[dy, dx] * xf[:, dy : h - 2 + dy, dx : w - 2 + dx]
    smooth[:, 1:-1, 1:-1] = acc
  return _to_uint8(_blend(smooth, xf, _enhance_factor(signs, level)))


# Name -> op(images uint8 (n, H, W, C), signs float (n,) of +-1, level float).
RANDAUGMENT_OPS = {
    "Identity": _op_identity,
    "AutoContrast": _op_auto_contrast,
    "Equalize": _op_equalize,
    "Rotate": _op_rotate,
    "Solarize": _op_solarize,
    "Color": _op_color,
    "Posterize": _op_posterize,
    "Contrast": _op_contrast,
    "Brightness": _op_brightness,
    "Sharpness": _op_sharpness,
    "ShearX": _op_shear_x,
    "ShearY": _op_shear_y,
    "TranslateX": _op_translate_x,
    "TranslateY": _op_translate_y,
}
_OP_LIST = tuple(RANDAUGMENT_OPS.values())
NUM_RANDAUGMENT_OPS = len(_OP_LIST)


def rand_augment(
    images: np.ndarray, op_indices: np.ndarray, signs: np.ndarray, magnitude: float
) -> np.ndarray:
  """RandAugment: each image gets `num_layers` ops applied in sequence.

  Magnitude uses the usual 0..10 scale (10 = the op's full strength, e.g. 30
  degrees of rotation); larger values extrapolate.

  Args:
    images: uint8 (B, H, W, C).
    op_indices: int (B, num_layers), indices into `RANDAUGMENT_OPS`.
    signs: float (B, num_layers) of +-1, the direction of signed ops.
    magnitude: strength on the 0..10 scale.

  Returns:
    uint8 (B, H, W, C).
  """
  level = float(magnitude) / 10.0
  out = images.copy()
  for layer in range(op_indices.shape[1]):
    for k, op in enumerate(_OP_LIST):
      sel = np.nonzero(op_indices[:, layer] == k)[0]
      if len(sel):
        out[sel] = op(out[sel], signs[sel, layer].astype(np.float32), level)
  return out


# ------------------------------------------------------------- mixup / cutmix


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """float32 (B, num_classes) one-hot rows."""
  return np.eye(num_classes, dtype=np.float32)[labels]


def mixup(images: np.ndarray, soft_labels: np.ndarray, lam: float):
  """Mixes each example with the batch reversed: `lam * x + (1 - lam) * x[::-1]`.

  Args:
    images: float32 (B, H, W, C).
    soft_labels: float32 (B, num_classes).
    lam: weight of the example itself.

  Returns:
    (images, soft_labels), mixed.
  """
  lam = np.float32(lam)
  return (
      lam * images + (1 - lam) * images[::-1],
      lam * soft_labels + (1 - lam) * soft_labels[::-1],
  )


def cutmix_box(height: int, width: int, lam: float, center: tuple[float, float]):
  """The CutMix box of area about `(1 - lam) * H * W` centered at `center`.

  Args:
    height: image height.
    width: image width.
    lam: the sampled mixing weight.
    center: (u_y, u_x) uniforms in [0, 1) placing the center.

  Returns:
    (top, bottom, left, right), clipped to the image.
  """
  cut = math.sqrt(1.0 - lam)
  ch, cw = int(height * cut), int(width * cut)
  cy, cx = int(center[0] * height), int(center[1] * width)
  top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, height)
  left, right = max(cx - cw // 2, 0), min(cx + cw // 2, width)
  return top, bottom, left, right


def cutmix(images: np.ndarray, soft_labels: np.ndarray, box):
  """Pastes `box` from the reversed batch; labels mix by the pasted area.

  Args:
    images: float32 (B, H, W, C).
    soft_labels: float32 (B, num_classes).
    box: (top, bottom, left, right) from `cutmix_box`.

  Returns:
    (images, soft_labels), mixed.
  """
  top, bottom, left, right = box
  h, w = images.shape[1:3]
  out = images.copy()
  out[:, top:bottom, left:right] = images[::-1, top:bottom, left:right]
  lam = np.float32(1.0 - (bottom - top) * (right - left) / (h * w))
  return out, lam * soft_labels + (1 - lam) * soft_labels[::-1]
