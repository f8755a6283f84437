"""Reliability: kill and resume, multi-process runs, bad input, numerical faults.

The end-to-end tests start the real entry point (`python -m srigl_jax.main`)
as subprocesses on a tiny run: an MLP 784-32-32-10 at 80% SRigL trained for
160 steps (400 with SRIGL_LONG_TESTS=1) of batch 32 on 512 Fashion-MNIST
images, 8 CPU devices, masks updated every 15 steps until 75% of training, a
checkpoint every 20 steps. One uninterrupted run is the reference of both the
killed run and the 2-process run. They need Debian's dataset-fashion-mnist.

The bad-input tests call `training.loop.train_and_evaluate` in this process and
check that the error comes before the trainer compiles any of its jitted
functions.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

# pylint: disable-next=g-import-not-at-top,wrong-import-position
from conftest import CONFIGS, FMNIST_DIR, HAVE_FMNIST, REPO, cli_flags, load_config, set_fields
from flax.training import train_state

import srigl_jax
from srigl_jax import config_lib, models
from srigl_jax import data as data_lib
from srigl_jax.training import checkpointing, checks, faults, loop, metric_writers

CONFIG_FILE = os.path.join(CONFIGS, 'fashion_mnist.py')
SEED = int(os.environ.get('SRIGL_RELIABILITY_SEED', str(random.randrange(10**6))))

LONG = os.environ.get('SRIGL_LONG_TESTS') == '1'
TINY = {
    'batch_size': 32,
    'num_train_steps': 400 if LONG else 160,
    'log_every': 1,  # One step per metrics record: records match across kills.
    'eval_every': 80,
    'checkpoint_every': 20,
    'keep_checkpoints': 3,
    'write_plots': False,
    'model.kwargs.hidden_sizes': (32, 32),
    'sparsity.sparsity': 0.8,
    'sparsity.update_every': 15,  # 7 updates before T_end = 120 (CI).
    'input.num_train_examples': 512,
    'input.num_eval_examples': 128,
    'input.prefetch': 0,
    'mesh.data': -1,
}
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST,
    reason='the command-line runs use Fashion-MNIST ' '(Debian package dataset-fashion-mnist)',
)


# ------------------------------------------------------------------ helpers


def launch(workdir, *, n_devices=8, extra=None, env=None, cache_dir=None):
  """Starts the entry point on the tiny run; returns the Popen."""
  e = dict(os.environ)
  e.update(
      {
          'XLA_FLAGS': f'--xla_force_host_platform_device_count={n_devices}',
          'JAX_PLATFORMS': 'cpu',
          'PYTHONPATH': REPO,
      }
  )
  if cache_dir:
    # Restarts reuse the executables of the first run: same bits, less time.
    e['JAX_COMPILATION_CACHE_DIR'] = cache_dir
    e['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  e.update(env or {})
  cmd = [
      sys.executable,
      '-m',
      'srigl_jax.main',
      f'--config={CONFIG_FILE}',
      f'--workdir={workdir}',
  ] + cli_flags({**TINY, **(extra or {})})
  log = open(
      os.path.join(os.path.dirname(workdir), os.path.basename(workdir) + f'.{time.time_ns()}.log'),
      'w',
      encoding='utf-8',
  )
  proc = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=log, stderr=subprocess.STDOUT, text=True)
  proc.log_path = log.name
  return proc


def finish(proc, timeout=300):
  rc = proc.wait(timeout=timeout)
  with open(proc.log_path, encoding='utf-8') as f:
    out = f.read()
  assert rc == 0, f'exit {rc}:\n{out[-4000:]}'
  return out


def ckpt_entries(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return os.listdir(d) if os.path.isdir(d) else []


def finished_steps(workdir):
  return sorted(int(n) for n in ckpt_entries(workdir) if n.isdigit())


def restore(workdir, step=None):
  """The content of a checkpoint as nested dicts of single-device arrays."""
  step = step or finished_steps(workdir)[-1]
  path = os.path.join(workdir, 'checkpoints', str(step), 'default')
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  # Saved on 8 devices, read here on one.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  return checkpointer.restore(path, target)


def leaves(tree):
  """keystr -> numpy value; PRNG keys as their raw bits."""

  def raw(v):
    if jnp.issubdtype(v.dtype, jax.dtypes.prng_key):
      v = jax.random.key_data(v)
    return np.asarray(v)

  return {jax.tree_util.keystr(kp): raw(v) for kp, v in jax.tree_util.tree_leaves_with_path(tree)}


def comparable_records(workdir):
  recs = metric_writers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  return [{k: v for k, v in r.items() if k != 'steps_per_sec'} for r in recs]


def mask_leaves(tree):
  return {k: v for k, v in leaves(tree).items() if 'masks' in k}


def assert_same_run(workdir, reference):
  """The final checkpoints, metrics and summaries of two runs are identical."""
  ref, got = restore(reference), restore(workdir)
  assert leaves(ref).keys() == leaves(got).keys()
  for k, v in leaves(ref).items():
    np.testing.assert_array_equal(leaves(got)[k], v, err_msg=k)
  assert comparable_records(workdir) == comparable_records(reference)
  with open(os.path.join(reference, 'summary.json')) as f:
    want = json.load(f)
  with open(os.path.join(workdir, 'summary.json')) as f:
    have = json.load(f)
  assert have['eval_accuracy'] == want['eval_accuracy']


@pytest.fixture(scope='module', autouse=True)
def cache_dir(compilation_cache):
  """The compilation cache, here and (given to `launch`) in the subprocesses."""
  return compilation_cache


@pytest.fixture(scope='module')
def reference(tmp_path_factory, cache_dir):
  """The uninterrupted 1-process 8-device run."""
  workdir = str(tmp_path_factory.mktemp('ref') / 'run')
  finish(launch(workdir, cache_dir=cache_dir))
  return workdir


# ------------------------------------------------------- kill and resume


def _kill(proc):
  alive = proc.poll() is None
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return alive


@needs_fmnist
def test_sigkill_anywhere_then_resume_is_bitwise_identical(reference, tmp_path, cache_dir):
  rng = random.Random(SEED)
  workdir = str(tmp_path / 'run')
  kills = []

  # 1. At a random moment after the first checkpoint.
  proc = launch(workdir, cache_dir=cache_dir)
  while not finished_steps(workdir):
    assert proc.poll() is None, 'the run ended before its first checkpoint'
    time.sleep(0.005)
  time.sleep(rng.uniform(0.0, 0.5))
  assert _kill(proc), f'run finished before the kill (seed {SEED})'
  kills.append(('random', finished_steps(workdir)[-1]))

  # 2. In the middle of a checkpoint write: orbax writes into a temporary
  # directory and renames it when complete; kill while it exists.
  proc = launch(workdir, cache_dir=cache_dir)
  half_written = None
  while half_written is None:
    assert proc.poll() is None, f'no checkpoint write was caught in flight (seed {SEED})'
    tmp = [n for n in ckpt_entries(workdir) if 'tmp' in n]
    if tmp:
      _kill(proc)
      still = [n for n in ckpt_entries(workdir) if 'tmp' in n]
      if still:
        half_written = still[0]
      else:  # The rename won the race; try the next checkpoint.
        proc = launch(workdir, cache_dir=cache_dir)
    else:
      time.sleep(0.001)
  half_step = int(half_written.split('.')[0])
  kills.append(('mid-write', half_step))
  assert half_step not in finished_steps(workdir)
  resumed_from = finished_steps(workdir)[-1]
  assert resumed_from < half_step

  # 3. Resume to the end: the half-written step must not be picked up.
  out = finish(launch(workdir, cache_dir=cache_dir))
  assert 'Resumed from' in out and f'at step {resumed_from}' in out, out[-3000:]
  print(f'kills (seed {SEED}): {kills}')

  assert_same_run(workdir, reference)


def _preempted_step(out):
  """The step a run saved at when it stopped on SIGTERM (from its log)."""
  found = re.findall(r'Preempted \(SIGTERM\) after step (\d+), checkpoint ' r'saved', out)
  assert len(found) == 1, out[-3000:]
  return int(found[0])


def _wait_for_first_checkpoint(procs, workdir):
  while not finished_steps(workdir):
    assert all(p.poll() is None for p in procs), 'the run ended before its first checkpoint'
    time.sleep(0.005)


@needs_fmnist
def test_sigterm_saves_the_step_exits_0_and_resumes_bitwise_identical(
    reference, tmp_path, cache_dir
):
  rng = random.Random(SEED)
  workdir = str(tmp_path / 'run')
  proc = launch(workdir, cache_dir=cache_dir)
  _wait_for_first_checkpoint([proc], workdir)
  time.sleep(rng.uniform(0.0, 0.3))
  assert proc.poll() is None, f'run finished before the SIGTERM (seed {SEED})'
  proc.send_signal(signal.SIGTERM)
  saved = _preempted_step(finish(proc))  # Exit status 0.
  assert saved < TINY['num_train_steps']
  assert finished_steps(workdir)[-1] == saved
  # The metrics of every finished step reached the disk.
  assert comparable_records(workdir)[-1]['step'] == saved
  print(f'SIGTERM (seed {SEED}): saved at step {saved}')

  out = finish(launch(workdir, cache_dir=cache_dir))
  assert f'at step {saved}' in out, out[-3000:]
  assert_same_run(workdir, reference)


# ---------------------------------------------------------- multi-process


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def launch_two(workdir, cache_dir=None):
  """Starts the tiny run as 2 processes of 4 CPU devices; returns the Popens."""
  port = _free_port()
  return [
      launch(
          workdir,
          n_devices=4,
          cache_dir=cache_dir,
          env={
              'JAX_COORDINATOR_ADDRESS': f'localhost:{port}',
              'JAX_NUM_PROCESSES': '2',
              'JAX_PROCESS_ID': str(i),
          },
      )
      for i in range(2)
  ]


@pytest.fixture(scope='module')
def two_process_reference(tmp_path_factory, cache_dir):
  """The uninterrupted run of 2 processes x 4 devices; (workdir, logs)."""
  workdir = str(tmp_path_factory.mktemp('ref2') / 'run')
  outs = [finish(p, timeout=400) for p in launch_two(workdir, cache_dir)]
  return workdir, outs


@needs_fmnist
def test_two_processes_of_four_devices_match_one_process_of_eight(reference, two_process_reference):
  workdir, outs = two_process_reference
  assert 'JAX process 0 of 2, 4 local / 8 global devices' in outs[0]
  assert 'JAX process 1 of 2, 4 local / 8 global devices' in outs[1]

  ref, got = restore(reference), restore(workdir)
  assert int(got['step']) == TINY['num_train_steps']
  masks_ref, masks_got = mask_leaves(ref), mask_leaves(got)
  assert masks_ref and masks_ref.keys() == masks_got.keys()
  for k, v in masks_ref.items():
    np.testing.assert_array_equal(masks_got[k], v, err_msg=k)
  one, two = comparable_records(reference), comparable_records(workdir)
  assert [r['step'] for r in one] == [r['step'] for r in two]
  updates = [r['step'] for r in one if 'global_sparsity' in r]
  assert len(updates) >= 8  # Initial masks, >= 7 updates, evals.
  for a, b in zip(one, two):
    assert a.keys() == b.keys()
    for key in a:
      if '/' in key or key in ('step', 'global_sparsity', 'eval_accuracy'):
        assert a[key] == b[key], (a['step'], key)  # Mask statistics: exact.
      else:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-5, err_msg=f'step {a["step"]} {key}')


@needs_fmnist
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(
    two_process_reference, tmp_path, cache_dir
):
  # SIGTERM reaches process 1 only: JAX's preemption sync service must tell
  # process 0, and both must save the same step (a home-made flag would
  # leave process 0 waiting in a collective, or save two different steps).
  rng = random.Random(SEED)
  workdir = str(tmp_path / 'run')
  procs = launch_two(workdir, cache_dir)
  _wait_for_first_checkpoint(procs, workdir)
  time.sleep(rng.uniform(0.0, 0.3))
  assert procs[1].poll() is None, f'run finished before SIGTERM (seed {SEED})'
  procs[1].send_signal(signal.SIGTERM)
  saved = [_preempted_step(finish(p, timeout=400)) for p in procs]
  assert saved[0] == saved[1] < TINY['num_train_steps'], saved
  assert finished_steps(workdir)[-1] == saved[0]
  assert comparable_records(workdir)[-1]['step'] == saved[0]
  print(f'SIGTERM to 1 of 2 processes (seed {SEED}): saved at {saved[0]}')

  outs = [finish(p, timeout=400) for p in launch_two(workdir, cache_dir)]
  assert f'at step {saved[0]}' in outs[0], outs[0][-3000:]
  assert_same_run(workdir, two_process_reference[0])


# ---------------------------------------------------------------- bad input


def small_config(**extra):
  """The tiny run on generated data, one device (a locked ConfigDict)."""
  config = load_config('fashion_mnist')
  config.input = data_lib.default_input_config('synthetic')
  config.input.image_shape = (28, 28, 1)
  return set_fields(config, {**TINY, 'mesh.data': 1, 'input.name': 'synthetic', **extra})


class _CompileLog(logging.Handler):

  def __init__(self):
    super().__init__(logging.WARNING)
    self.compiled = []

  def emit(self, record):
    msg = record.getMessage()
    if msg.startswith('Compiling '):
      self.compiled.append(msg.split()[1])


@pytest.fixture
def compile_log():
  """Names of the XLA modules compiled while the test runs."""
  handler = _CompileLog()
  logger = logging.getLogger('jax._src.interpreters.pxla')
  logger.addHandler(handler)
  old = jax.config.jax_log_compiles
  jax.config.update('jax_log_compiles', True)
  yield handler.compiled
  jax.config.update('jax_log_compiles', old)
  logger.removeHandler(handler)


def _trainer_compiled(names):
  return [
      n
      for n in names
      if any(f in n for f in ('init', 'train_step', 'eval_step', 'sparsity_metrics'))
  ]


BAD_CONFIGS = {
    # name: (overrides, error type, message regex)
    'sparsity_1': ({'sparsity.sparsity': 1.0}, ValueError, r'outside \[0, 1\)'),
    'sparsity_negative': ({'sparsity.sparsity': -0.1}, ValueError, r'outside \[0, 1\)'),
    'gamma_sal_negative': ({'sparsity.gamma_sal': -0.5}, ValueError, r'gamma_sal.*(>= 0|negative)'),
    'delta_0': ({'sparsity.update_every': 0}, ValueError, r'update_every'),
    'stop_step_0': ({'sparsity.stop_step': 0}, ValueError, r'stop_step'),
    'stop_step_negative': ({'sparsity.stop_step': -5}, ValueError, r'stop_step'),
    'fan_in_0': (
        {'sparsity.sparsity': 0.9995},
        ValueError,
        r"Layer 'dense_\d/kernel'.*largest sparsity this layer can " r'take is 0\.9',
    ),
    'batch_not_divisible': (
        {'batch_size': 30, 'optim.grad_accum_steps': 4},
        ValueError,
        r'batch_size.*divisible',
    ),
}


@pytest.mark.parametrize('name', sorted(BAD_CONFIGS))
def test_bad_config_fails_before_compiling(name, tmp_path, compile_log):
  overrides, error, regex = BAD_CONFIGS[name]
  with pytest.raises(error, match=regex) as info:
    loop.train_and_evaluate(small_config(**overrides), str(tmp_path))
  print(f'{name}: {info.value}')
  assert not _trainer_compiled(compile_log), compile_log
  assert not finished_steps(str(tmp_path))


@needs_fmnist
@pytest.mark.parametrize('damage', ['missing', 'truncated'])
def test_missing_or_truncated_dataset_fails_before_compiling(damage, tmp_path, compile_log):
  data_dir = tmp_path / 'data'
  data_dir.mkdir()
  for name in os.listdir(FMNIST_DIR):
    if name.startswith('train-labels') or name.startswith('t10k'):
      os.symlink(os.path.join(FMNIST_DIR, name), data_dir / name)
  if damage == 'truncated':
    with open(os.path.join(FMNIST_DIR, 'train-images-idx3-ubyte.gz'), 'rb') as f:
      (data_dir / 'train-images-idx3-ubyte.gz').write_bytes(f.read(100_000))
  config = small_config()
  config.input = data_lib.default_input_config('fashion_mnist')
  config.input.data_dir = str(data_dir)
  config.input.num_train_examples = 512
  error = data_lib.DatasetNotFoundError if damage == 'missing' else data_lib.DataFormatError
  with pytest.raises(error, match='train-images') as info:
    loop.train_and_evaluate(config, str(tmp_path / 'run'))
  print(f'{damage}: {info.value}')
  assert not _trainer_compiled(compile_log), compile_log


def test_unknown_key_and_wrong_type_are_named():
  config = small_config()
  # The schema is a locked ConfigDict: ml_collections refuses a typo at once,
  # with its suggestion, and a value of the wrong type.
  with pytest.raises(AttributeError, match=r'Did you mean "gamma_sal" instead of "gama_sal"'):
    config.sparsity.gama_sal = 0.5
  with pytest.raises(TypeError):
    config.sparsity.sparsity = 'high'
  # A config file that builds its own groups is checked against the schema.
  config.sparsity = ml_collections.ConfigDict({**config.sparsity.to_dict(), 'gama_sal': 0.5})
  with pytest.raises(
      config_lib.ConfigError,
      match=r"Unknown config key 'sparsity.gama_sal'.*" r'Did you mean "gamma_sal"',
  ) as info:
    checks.check_config(config, n_devices=1)
  assert info.value.field == 'sparsity.gama_sal'
  config = small_config()
  config.optim = ml_collections.ConfigDict({**config.optim.to_dict(), 'learning_rate': '0.1'})
  with pytest.raises(
      config_lib.ConfigError,
      match=r"'optim.learning_rate' has the wrong type.*0.1 is "
      r"of original type <class 'str'>.*--config.optim",
  ) as info:
    checks.check_config(config, n_devices=1)
  assert info.value.field == 'optim.learning_rate'


# The config field each bad config's error names (`ConfigError.field`).
BAD_FIELDS = {
    'sparsity_1': 'sparsity.sparsity',
    'sparsity_negative': 'sparsity.sparsity',
    'gamma_sal_negative': 'sparsity.gamma_sal',
    'delta_0': 'sparsity.update_every',
    'stop_step_0': 'sparsity.stop_step',
    'stop_step_negative': 'sparsity.stop_step',
    'fan_in_0': 'sparsity.sparsity',
    'batch_not_divisible': 'batch_size',
}


@pytest.mark.parametrize('name', sorted(BAD_CONFIGS))
def test_preflight_names_the_field_and_the_fix_before_reading_data(name, tmp_path):
  # The data directory is empty: any read of it would fail with
  # DatasetNotFoundError, so the config's error must come first.
  overrides, _, _ = BAD_CONFIGS[name]
  config = small_config(**overrides)
  config.input = data_lib.default_input_config('fashion_mnist')
  config.input.data_dir = str(tmp_path / 'no_data')
  with pytest.raises(config_lib.ConfigError, match='Fix|[Ll]ower the sparsity') as info:
    loop.preflight(config, str(tmp_path / 'run'))
  assert info.value.field == BAD_FIELDS[name]


def test_paper_config_switched_to_synthetic_data_passes_preflight(tmp_path):
  # The speed command in configs/cifar10_resnet18.py: the CIFAR input group has
  # no image_shape/num_classes, which the synthetic dataset fills by default.
  config = load_config('cifar10_resnet18')
  config.input.name = 'synthetic'
  config.input.num_train_examples = 512
  config.input.num_eval_examples = 128
  config.eval_batch_size = 128
  assert data_lib.input_geometry(config.input) == ((32, 32, 3), 10)
  trainer = loop.preflight(config, str(tmp_path))
  assert trainer.run.abstract_state.params['head']['kernel'].shape == (512, 10)


def test_max_global_sparsity_is_the_limit(tmp_path):
  # The trainer's own eval_shape init accepts the limit and refuses just above.
  config = small_config()
  params = loop.preflight(config, str(tmp_path / 'a')).run.abstract_state.params
  best = checks.max_global_sparsity(params, config)
  loop.preflight(small_config(**{'sparsity.sparsity': best}), str(tmp_path / 'b'))
  with pytest.raises(config_lib.ConfigError, match=f'{best:.4f}'):
    loop.preflight(
        small_config(**{'sparsity.sparsity': min(best + 2e-3, 0.9999)}), str(tmp_path / 'c')
    )


def save_checkpoint(workdir, config, step=25):
  """What a run of `config` leaves: a complete checkpoint with its metadata."""
  with checkpointing.Checkpointer(workdir, config) as ckpt:
    ckpt.save(step, {'w': jnp.zeros(3)})


def test_workdir_of_another_model_or_sparsity_is_refused(tmp_path):
  workdir = str(tmp_path)
  checkpointing.check_workdir(workdir, small_config())  # Fresh: nothing to compare.
  save_checkpoint(workdir, small_config())
  # The checkpoint's own metadata decides, not the readable copy.
  os.remove(os.path.join(workdir, checkpointing.FINGERPRINT_FILE))
  checkpointing.check_workdir(workdir, small_config(**{'num_train_steps': 400}))
  with pytest.raises(
      checkpointing.WorkdirMismatchError, match=r'sparsity.sparsity: checkpoint 0.8 vs config 0.9'
  ):
    checkpointing.check_workdir(workdir, small_config(**{'sparsity.sparsity': 0.9}))
  with pytest.raises(checkpointing.WorkdirMismatchError, match=r'model.kwargs'):
    checkpointing.check_workdir(workdir, small_config(**{'model.kwargs.hidden_sizes': (64, 64)}))
  # A resumed run would read other batches: refused too.
  with pytest.raises(
      checkpointing.WorkdirMismatchError, match=r"input.augment: checkpoint 'none' vs config 'crop'"
  ):
    checkpointing.check_workdir(workdir, small_config(**{'input.augment': 'crop'}))
  with pytest.raises(
      checkpointing.WorkdirMismatchError, match=r'batch_size: checkpoint 32 vs config 64'
  ):
    checkpointing.check_workdir(workdir, small_config(batch_size=64))
  # Where the data lives and how many workers read it do not change the batches.
  checkpointing.check_workdir(
      workdir, small_config(**{'input.num_workers': 1, 'input.num_threads': 2, 'input.prefetch': 4})
  )


@pytest.mark.parametrize('order', [None, 'grain-shuffle-repeat-batch/1'])
def test_checkpoint_of_an_earlier_data_order_is_refused(tmp_path, order):
  # Checkpoints of the hand-written pipeline carry no data order, those of
  # the first grain pipeline its per-example order: their runs continued on
  # other batches, so resuming one now is refused.
  workdir = str(tmp_path)
  old = checkpointing.fingerprint(small_config())
  old['data_order'] = order
  if order is None:
    del old['data_order']
    for k in [k for k in old if k.startswith('input.') and k not in ('input.name',)]:
      del old[k]
  with ocp.CheckpointManager(
      os.path.join(workdir, 'checkpoints'),
      options=ocp.CheckpointManagerOptions(),
  ) as manager:
    manager.save(25, args=ocp.args.StandardSave({'w': jnp.zeros(3)}), custom_metadata=old)
  with pytest.raises(
      checkpointing.WorkdirMismatchError, match=rf'data_order: checkpoint {order!r} vs config'
  ):
    checkpointing.check_workdir(workdir, small_config())


def test_checkpoint_without_metadata_is_checked_against_fingerprint_json(tmp_path):
  # The layout of older versions: fingerprint.json and plain checkpoints.
  workdir = str(tmp_path)
  checkpointing.check_workdir(workdir, small_config())  # Writes fingerprint.json.
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    manager.save(25, args=ocp.args.StandardSave({'w': jnp.zeros(3)}))
  checkpointing.check_workdir(workdir, small_config())
  with pytest.raises(checkpointing.WorkdirMismatchError, match='sparsity.sparsity'):
    checkpointing.check_workdir(workdir, small_config(**{'sparsity.sparsity': 0.9}))


def test_trainer_refuses_a_workdir_of_another_sparsity(tmp_path, compile_log):
  workdir = str(tmp_path)
  save_checkpoint(workdir, small_config())  # A run at sparsity 0.8.
  with pytest.raises(checkpointing.WorkdirMismatchError, match='sparsity.sparsity'):
    loop.train_and_evaluate(small_config(num_train_steps=4, **{'sparsity.sparsity': 0.9}), workdir)
  assert not _trainer_compiled(compile_log)


def test_trainer_refuses_an_unknown_key(tmp_path, compile_log):
  config = small_config()
  config.sparsity = ml_collections.ConfigDict({**config.sparsity.to_dict(), 'gama_sal': 0.5})
  with pytest.raises(config_lib.ConfigError, match='gama_sal'):
    loop.train_and_evaluate(config, str(tmp_path))
  assert not _trainer_compiled(compile_log)


# --------------------------------------------------------- numerical faults


@functools.cache
def _tiny_problem():
  """An MLP on the sparse optimizer with the faults hooks in its step.

  `step(state, x, y, skip)`: skip (a traced bool, so both tests share one
  compile) turns on skip-bad-steps.
  """
  model = models.get_model('mlp', 10, hidden_sizes=(16, 16))
  tx = srigl_jax.sparse_optimizer(
      optax.sgd(0.1, momentum=0.9),
      method='srigl',
      sparsity=0.5,
      key=jax.random.key(1),
      stop_step=100,
      update_every=2,
  )

  @jax.jit
  def init():  # One compile instead of one per eager op.
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))['params']
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  state = init()

  @jax.jit
  def step(state, x, y, skip):
    def loss_fn(p):
      logits = model.apply({'params': p}, x, train=True)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    flags = faults.finite_flags(grads)
    new = state.apply_gradients(grads=grads)
    new = faults.keep_if_finite(faults.step_ok(loss, flags) | ~skip, new, state)
    return new, {'loss': loss, faults.GRAD_FINITE: flags}

  return state, step


def _batch(step, bad_steps):
  rng = np.random.default_rng(step)
  x = rng.normal(size=(8, 8, 8, 1)).astype(np.float32)
  if step in bad_steps:
    x[3, 2, 2, 0] = np.inf  # One pixel: the first layer's gradient goes bad.
  return x, rng.integers(0, 10, 8).astype(np.int32)


def test_non_finite_gradient_names_step_and_layer():
  state, tiny_step = _tiny_problem()
  step = lambda *a: tiny_step(*a, False)
  monitor = faults.FaultMonitor(faults.leaf_paths(state.params))
  with pytest.raises(
      faults.NonFiniteError,
      match=r'at step 3.*first non-finite gradient in layer '
      r"'dense_0/(bias|kernel)'.*latest checkpoint \(step 2\)",
  ) as info:
    for i in range(1, 6):
      state, metrics = step(state, *_batch(i, bad_steps={3}))
      monitor.check([i], [jax.device_get(metrics)], last_checkpoint=i - 1)
  assert info.value.step == 3 and info.value.layer.startswith('dense_0/')


def test_skip_bad_steps_keeps_the_state_and_the_schedule():
  state, tiny_step = _tiny_problem()
  step = lambda *a: tiny_step(*a, True)
  monitor = faults.FaultMonitor(
      faults.leaf_paths(state.params), skip_bad_steps=True, max_consecutive_skips=2
  )
  applied = []
  for i in range(1, 7):
    before = jax.device_get(state)
    state, metrics = step(state, *_batch(i, bad_steps={2, 4}))
    applied += monitor.check([i], [jax.device_get(metrics)], None)
    if i in (2, 4):  # Mask update due at 2 and 4: skipped with the step.
      jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before.params)
      jax.tree.map(
          np.testing.assert_array_equal,
          jax.device_get(srigl_jax.get_masks(state)),
          srigl_jax.get_masks(before),
      )
  assert applied == [True, False, True, False, True, True]
  assert monitor.skipped_steps == 2
  assert int(state.step) == 6 and int(state.opt_state.count) == 6
  for leaf in jax.tree.leaves(state.params):
    assert np.all(np.isfinite(np.asarray(leaf)))
  # Too many in a row: stops anyway.
  with pytest.raises(faults.NonFiniteError, match='3 skipped|after 2 skipped'):
    for i in range(7, 11):
      state, metrics = step(state, *_batch(i, bad_steps={7, 8, 9}))
      monitor.check([i], [jax.device_get(metrics)], None)


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  # The learning rate jumps x1e30 at step 16 (epoch 1 of 16 steps): the loss
  # becomes non-finite a step or two later.
  workdir = str(tmp_path)
  blowup = {
      'num_train_steps': 30,
      'checkpoint_every': 10,
      'eval_every': 0,
      'optim.schedule': 'multistep',
      'optim.boundaries_epochs': (1.0,),
      'optim.decay_factor': 1e30,
  }
  with pytest.raises(FloatingPointError, match=r'at step (1[7-9]|2\d)') as info:
    loop.train_and_evaluate(small_config(**blowup), workdir)
  print(f'diverged: {info.value}')
  assert finished_steps(workdir) == [10]
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    assert manager.metadata(10).custom_metadata == checkpointing.fingerprint(small_config(**blowup))
  # The kept checkpoint is whole and finite: rerunning with a sane schedule
  # resumes from it (resuming itself is the kill test's subject).
  kept = leaves(restore(workdir, 10))
  assert all(np.all(np.isfinite(v)) for k, v in kept.items() if np.issubdtype(v.dtype, np.floating))


def test_a_torn_metrics_line_from_a_kill_is_dropped_on_resume(tmp_path):
  # A SIGKILL while buffered writes reach the disk leaves half a line.
  path = str(tmp_path / 'metrics.jsonl')
  with open(path, 'w', encoding='utf-8') as f:
    f.write(
        '{"step": 1, "train_loss": 2.3}\n{"step": 2, "train_loss": 2.2}\n' '{"step": 3, "train_lo'
    )
  metric_writers.truncate_jsonl(path, 2)
  writer = metric_writers.JsonlWriter(path)
  writer.write_scalars(3, {'train_loss': 2.1})
  writer.close()
  assert metric_writers.read_jsonl(path) == [
      {'step': 1, 'train_loss': 2.3},
      {'step': 2, 'train_loss': 2.2},
      {'step': 3, 'train_loss': 2.1},
  ]


def test_trainer_names_the_step_and_layer_of_a_nan(tmp_path, nan_batches):
  nan_batches({7})
  config = small_config(num_train_steps=20, checkpoint_every=5, eval_every=0)
  with pytest.raises(
      faults.NonFiniteError,
      match=r'at step 7; first non-finite gradient in layer '
      r"'dense_0/(kernel|bias)' and \d more; stopping: the latest "
      r'checkpoint \(step 5\)',
  ) as info:
    loop.train_and_evaluate(config, str(tmp_path))
  print(f'nan batch: {info.value}')
  assert finished_steps(str(tmp_path)) == [5]


def test_trainer_skip_bad_steps_finishes_the_run(tmp_path, nan_batches):
  nan_batches({7, 12})
  config = small_config(num_train_steps=20, checkpoint_every=10, eval_every=0, skip_bad_steps=True)
  state = loop.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 20
  for leaf in jax.tree.leaves(state.params):
    assert np.all(np.isfinite(np.asarray(leaf)))
  recs = metric_writers.read_jsonl(str(tmp_path / 'metrics.jsonl'))
  assert [r['skipped_steps'] for r in recs if r['step'] in (6, 7, 12, 20)] == [0, 1, 2, 2]
