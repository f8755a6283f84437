"""Deterministic generated images with class-dependent patterns.

Each class is a sinusoidal grating with its own orientation, frequency and
colour; every example adds a random phase and pixel noise. A small model learns
it within a few hundred steps, so tests and smoke runs can train without
downloading anything.
"""

from __future__ import annotations

import numpy as np

_TEMPLATE_TAG = 0x5EED
_SPLIT_TAGS = {"train": 1, "test": 2}


def make_synthetic(
    split: str,
    num_examples: int,
    image_shape: tuple[int, int, int],
    num_classes: int,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
  """Generates one split of the synthetic dataset.

  The class patterns depend on `seed` only, so the train and test splits of a
  seed share them.

  Args:
    split: 'train' or 'test'.
    num_examples: number of examples.
    image_shape: (H, W, C).
    num_classes: number of classes.
    seed: the dataset's identity (the config's `synthetic_seed`).

  Returns:
    images uint8 (N, H, W, C) and labels int32 (N,).
  """
  h, w, c = image_shape
  t_rng = np.random.default_rng([seed, _TEMPLATE_TAG])
  angle = np.pi * (np.arange(num_classes) + t_rng.uniform(0, 0.5, num_classes)) / num_classes
  freq = t_rng.uniform(1.0, 3.0, num_classes) * 2 * np.pi / max(h, w)
  colour = t_rng.uniform(0.3, 1.0, (num_classes, c))

  rng = np.random.default_rng([seed, _SPLIT_TAGS[split]])
  labels = rng.integers(0, num_classes, num_examples).astype(np.int32)
  phase = rng.uniform(0, 2 * np.pi, num_examples).astype(np.float32)
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  images = np.empty((num_examples, h, w, c), np.uint8)
  # Chunks bound the float32 temporaries for large synthetic sets.
  for start in range(0, num_examples, 1024):
    sl = slice(start, min(start + 1024, num_examples))
    k = labels[sl]
    proj = np.cos(angle[k])[:, None, None] * xs + np.sin(angle[k])[:, None, None] * ys
    wave = np.sin(freq[k][:, None, None] * proj + phase[sl, None, None])
    x = 128 + 90 * wave[..., None] * colour[k][:, None, None, :]
    x = x + rng.normal(0, 25, x.shape)
    images[sl] = np.clip(np.rint(x), 0, 255).astype(np.uint8)
  return images, labels
