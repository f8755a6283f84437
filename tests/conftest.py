"""Fixtures and helpers shared by the tests (`from conftest import ...`)."""

import importlib.util
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import pytest

from srigl_jax import data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, 'configs')
FMNIST_DIR = '/usr/share/datasets/fashion-mnist'
HAVE_FMNIST = os.path.exists(os.path.join(FMNIST_DIR, 'train-labels-idx1-ubyte.gz'))

# With CI=true a skipped test is a failure, unless its reason says it needs a
# GPU or is one of the long variants behind SRIGL_LONG_TESTS (README, Tests).
CI = os.environ.get('CI', '').strip().lower() in ('1', 'true', 'yes')
ALLOWED_CI_SKIPS = ('needs a GPU', 'SRIGL_LONG_TESTS')
_ci_skips: list[str] = []


def pytest_sessionstart(session):
  """On CI, stops at once when the native kernels or the default data are missing."""
  del session
  if not CI:
    return
  from srigl_jax import condensed  # pylint: disable=g-import-not-at-top

  missing = []
  if not condensed.native_available():
    missing.append(
        f'the native kernel library is missing ({condensed.native_error()}); '
        'reinstall with a C++17 compiler and CMake (bash scripts/setup.sh)'
    )
  if not HAVE_FMNIST:
    missing.append(
        f"Fashion-MNIST is missing from {FMNIST_DIR}; install Debian's "
        'dataset-fashion-mnist (bash scripts/setup.sh does as root)'
    )
  if missing:
    pytest.exit('CI=true but ' + '; and '.join(missing) + '.', returncode=3)


def pytest_runtest_logreport(report):
  """Records, on CI, every skip that is neither a GPU-only nor a long test."""
  if CI and report.skipped and not hasattr(report, 'wasxfail'):
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not any(allowed in reason for allowed in ALLOWED_CI_SKIPS):
      _ci_skips.append(f'{report.nodeid}: {reason}')


def pytest_sessionfinish(session, exitstatus):
  """On CI, fails the run when a test skipped for a reason CI does not accept."""
  del exitstatus
  if _ci_skips:
    print('\nCI=true: these tests skipped, which CI does not accept:\n  ' + '\n  '.join(_ci_skips))
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of `configs/<name>.py`, as the entry point loads it."""
  spec = importlib.util.spec_from_file_location(
      f'_config_{name}', os.path.join(CONFIGS, f'{name}.py')
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def set_fields(
    config: ml_collections.ConfigDict, overrides: dict[str, Any]
) -> ml_collections.ConfigDict:
  """Sets dotted fields ('sparsity.sparsity': 0.8), as --config.* flags do."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def cli_flags(overrides: dict[str, Any]) -> list[str]:
  """The --config.* flags of the entry point that set `overrides`."""
  out = []
  for key, value in overrides.items():
    if isinstance(value, tuple):
      value = '(' + ','.join(str(v) for v in value) + ',)'
    out.append(f'--config.{key}={value}')
  return out


@pytest.fixture
def nan_batches(monkeypatch):
  """Call with a set of 1-based steps: their training batches become all NaN."""

  def install(bad_steps):
    create = data.create_dataset

    def create_with_bad_batches(*args, **kwargs):
      dataset = create(*args, **kwargs)
      good = dataset.train_batches

      def train_batches(start_step=0):
        for step, batch in enumerate(good(start_step), start_step):
          if step + 1 in bad_steps:
            batch = {**batch, 'image': np.full_like(batch['image'], np.nan)}
          yield batch

      dataset.train_batches = train_batches
      return dataset

    monkeypatch.setattr(data, 'create_dataset', create_with_bad_batches)

  return install


@pytest.fixture(scope='module')
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache for one test module; yields its folder.

  In-process trainer runs of one config then compile once, and subprocesses
  pointed at the folder (JAX_COMPILATION_CACHE_DIR) reuse it.
  """
  path = str(tmp_path_factory.mktemp('jax_cache'))
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs')
  old = {n: getattr(jax.config, n) for n in names}
  jax.config.update(names[0], path)
  jax.config.update(names[1], 0.0)
  yield path
  for n, v in old.items():
    jax.config.update(n, v)
