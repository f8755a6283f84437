"""Fixtures shared by the trainer tests."""

import jax
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


@pytest.fixture(scope='module')
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache for one test module; yields its folder.

  In-process trainer runs of one config then compile once, and subprocesses
  pointed at the folder (JAX_COMPILATION_CACHE_DIR) reuse it.
  """
  path = str(tmp_path_factory.mktemp('jax_cache'))
  names = ('jax_compilation_cache_dir',
           'jax_persistent_cache_min_compile_time_secs')
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update(names[0], path)
  jax.config.update(names[1], 0.0)
  yield path
  for n, v in old.items():
    jax.config.update(n, v)
