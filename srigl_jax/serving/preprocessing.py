"""The eval preprocessing an artefact records, replayed on raw images.

The manifest's 'preprocessing' record (written by `srigl_jax.export`) holds:
'dataset', 'raw_dtype' ('uint8'), 'resize' (the output side of the eval centre
crop, or None), 'mean' and 'std' (per channel, on the 0-1 scale) and
'output_shape' (H, W, C). `apply_preprocessing` turns raw images into the
network's input with the same augmentation maths as the training pipeline
(`srigl_jax.data.augment`), so a server feeds the model exactly what the eval
split fed it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from srigl_jax.data import augment as aug


def apply_preprocessing(spec: Mapping[str, Any], raw) -> np.ndarray:
  """Raw uint8 images -> the network's input, as the 'preprocessing' record says.

  Args:
    spec: the manifest's 'preprocessing' record.
    raw: uint8 images (N, H, W, C), or (N, H, W) for one-channel data; with
      'resize' set, a list of (H, W, C) images of any size (centre-cropped and
      resized as at eval time).

  Returns:
    float32 (N, *output_shape).

  Raises:
    ValueError: not uint8, or a shape that cannot be the raw images.
  """
  out_shape = tuple(spec['output_shape'])
  if spec.get('resize'):
    images = [np.asarray(im) for im in raw]
    for im in images:
      _check_raw_dtype(im)
    images = np.stack(
        [aug.crop_resize(im, aug.center_crop_box(*im.shape[:2]), spec['resize']) for im in images]
    )
  else:
    images = np.asarray(raw)
    _check_raw_dtype(images)
    if images.ndim == len(out_shape) and out_shape[-1] == 1:
      images = images[..., None]  # (N, H, W) grey images.
    if images.shape[1:] != out_shape:
      want = f'(N, {", ".join(map(str, out_shape))})'
      if out_shape[-1] == 1:
        want += f' or (N, {", ".join(map(str, out_shape[:-1]))})'
      raise ValueError(
          f'preprocess expects raw images of shape {want}, got '
          f'{images.shape}. For a single image add a batch axis (image[None]).'
      )
  return aug.normalize(images, spec['mean'], spec['std'])


def _check_raw_dtype(images: np.ndarray) -> None:
  if images.dtype != np.uint8:
    raise ValueError(
        f'preprocess expects raw uint8 images (0-255), got dtype '
        f'{images.dtype}. Already-normalised float input goes straight to '
        'model(x).'
    )
