"""Fixtures shared by the trainer tests."""

import numpy as np
import pytest

from srigl_jax import train


@pytest.fixture
def nan_batches(monkeypatch):
  """Call with a set of 1-based steps: their training batches become all NaN."""

  def install(bad_steps):
    create = train.data_lib.create_dataset

    def create_with_bad_batches(*args, **kwargs):
      dataset = create(*args, **kwargs)
      good = dataset.train_batch

      def train_batch(step):
        batch = good(step)
        if step + 1 in bad_steps:
          batch['image'] = np.full_like(batch['image'], np.nan)
        return batch

      dataset.train_batch = train_batch
      return dataset

    monkeypatch.setattr(train.data_lib, 'create_dataset', create_with_bad_batches)

  return install
