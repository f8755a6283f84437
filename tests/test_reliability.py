"""Reliability: kill and resume, the workdir's lock and fingerprint, damaged files,
multi-process runs, bad input, numerical faults.

The end-to-end tests start the real entry point (`python -m srigl_jax.main`)
as subprocesses on a tiny run: an MLP 784-32-32-10 at 80% SRigL trained for
160 steps (400 with SRIGL_LONG_TESTS=1) of batch 32 on 512 Fashion-MNIST
images, 8 CPU devices, masks updated every 15 steps until 75% of training, a
checkpoint every 20 steps. One uninterrupted run is the reference of both the
killed run and the 2-process run. They need Debian's dataset-fashion-mnist.
A run to be signalled or killed is started through
`tests/fixtures/paused_main.py`, which pauses it at a fixed point (before a
given step, or inside a given checkpoint's write) and says so in a marker
file: the test waits for the marker, not for a guessed delay, so the outcome
does not depend on the machine's speed.

The bad-input tests call `training.loop.train_and_evaluate` in this process and
check that the error comes before the trainer compiles any of its jitted
functions.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import re
import shutil
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
from srigl_jax import config_lib, export, models
from srigl_jax import data as data_lib
from srigl_jax.training import checkpointing, checks, faults, loop, metric_writers

CONFIG_FILE = os.path.join(CONFIGS, 'fashion_mnist.py')
PAUSED_MAIN = os.path.join(REPO, 'tests', 'fixtures', 'paused_main.py')

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
# The fixed kill points (checkpoints every 20 steps, mask updates every 15).
SIGKILL_BEFORE_STEP = 47  # Between checkpoints 40 and 60, 2 steps after a mask update.
SIGKILL_IN_SAVE = 80  # During the write of checkpoint 80 (60 is complete by then).
SIGTERM_BEFORE_STEP = 53  # The run saves step 54 and stops.
SIGTERM_TWO_PROCESSES_BEFORE_STEP = 33
LOCK_HOLDER_BEFORE_STEP = 41  # Checkpoint 20 complete, 40 complete or being written.
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST,
    reason='the command-line runs use Fashion-MNIST ' '(Debian package dataset-fashion-mnist)',
)


# ------------------------------------------------------------------ helpers


def launch(
    workdir,
    *,
    n_devices=8,
    extra=None,
    env=None,
    cache_dir=None,
    pause_before_step=None,
    pause_in_save=None,
    marker=None,
):
  """Starts the entry point on the tiny run; returns the Popen.

  With `pause_before_step` or `pause_in_save` it runs through
  `tests/fixtures/paused_main.py`, which pauses there and writes the marker
  `proc.marker` (default: next to the log; see `wait_for_pause`,
  `resume_paused`).
  """
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
  stem = os.path.join(os.path.dirname(workdir), os.path.basename(workdir) + f'.{time.time_ns()}')
  entry = ['-m', 'srigl_jax.main']
  if pause_before_step is not None or pause_in_save is not None:
    entry = [PAUSED_MAIN]
    e['SRIGL_PAUSE_MARKER'] = marker or stem + '.pause'
    if pause_before_step is not None:
      e['SRIGL_PAUSE_BEFORE_STEP'] = str(pause_before_step)
    if pause_in_save is not None:
      e['SRIGL_PAUSE_IN_SAVE'] = str(pause_in_save)
  cmd = [sys.executable, *entry, f'--config={CONFIG_FILE}', f'--workdir={workdir}'] + cli_flags(
      {**TINY, **(extra or {})}
  )
  log = open(stem + '.log', 'w', encoding='utf-8')
  proc = subprocess.Popen(cmd, cwd=REPO, env=e, stdout=log, stderr=subprocess.STDOUT, text=True)
  proc.log_path = log.name
  proc.marker = e.get('SRIGL_PAUSE_MARKER')
  return proc


def log_of(proc):
  with open(proc.log_path, encoding='utf-8') as f:
    return f.read()


def wait_for(condition, procs, what, timeout=600):
  """Polls `condition()` until it holds; fails at once if a process exits.

  The timeout only ends a hung test; no outcome depends on it.
  """
  deadline = time.monotonic() + timeout
  while not condition():
    for p in procs:
      assert p.poll() is None, f'exit {p.returncode} before {what}:\n{log_of(p)[-3000:]}'
    assert time.monotonic() < deadline, f'no {what} after {timeout} s'
    time.sleep(0.01)


def wait_for_pause(procs):
  """Waits until every process of a paused run has written its marker."""
  procs = procs if isinstance(procs, list) else [procs]
  if len(procs) == 1:
    markers = [procs[0].marker]
  else:  # Process i of a multi-process job writes MARKER.i.
    markers = [f'{p.marker}.{i}' for i, p in enumerate(procs)]
  wait_for(lambda: all(os.path.exists(m) for m in markers), procs, 'the pause')


def resume_paused(procs):
  """Lets a run paused before a step go on."""
  procs = procs if isinstance(procs, list) else [procs]
  for marker in {p.marker for p in procs}:
    with open(marker + '.go', 'w', encoding='utf-8'):
      pass


def finish(proc, timeout=300):
  rc = proc.wait(timeout=timeout)
  out = log_of(proc)
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
  workdir = str(tmp_path / 'run')

  # 1. Mid-training, between two checkpoints, just after a mask update.
  proc = launch(workdir, cache_dir=cache_dir, pause_before_step=SIGKILL_BEFORE_STEP)
  wait_for_pause(proc)
  assert _kill(proc)
  first_kill = finished_steps(workdir)[-1]
  assert 20 <= first_kill <= 40

  # 2. In the middle of a checkpoint write: orbax writes into a temporary
  # directory and renames it when complete; the run is held inside the write
  # of step SIGKILL_IN_SAVE (orbax finishes one save before it starts the
  # next, so the previous checkpoint is complete).
  proc = launch(workdir, cache_dir=cache_dir, pause_in_save=SIGKILL_IN_SAVE)
  wait_for_pause(proc)
  half_written = [n for n in ckpt_entries(workdir) if n.startswith(f'{SIGKILL_IN_SAVE}.')]
  assert half_written and 'tmp' in half_written[0], ckpt_entries(workdir)
  assert _kill(proc)
  out = log_of(proc)
  # The killed first run left its lock record behind; the OS had freed the lock.
  assert 'Took over' in out and 'which ended without releasing it' in out, out[-3000:]
  assert half_written[0] in ckpt_entries(workdir)
  assert finished_steps(workdir)[-1] == SIGKILL_IN_SAVE - 20

  # 3. Resume to the end: the half-written step must not be picked up.
  out = finish(launch(workdir, cache_dir=cache_dir))
  assert f'at step {SIGKILL_IN_SAVE - 20}' in out and 'Resumed from' in out, out[-3000:]
  assert_same_run(workdir, reference)


def _preempted_step(out):
  """The step a run saved at when it stopped on SIGTERM (from its log)."""
  found = re.findall(r'Preempted \(SIGTERM\) after step (\d+), checkpoint ' r'saved', out)
  assert len(found) == 1, out[-3000:]
  return int(found[0])


@needs_fmnist
def test_sigterm_saves_the_step_exits_0_and_resumes_bitwise_identical(
    reference, tmp_path, cache_dir
):
  workdir = str(tmp_path / 'run')
  proc = launch(workdir, cache_dir=cache_dir, pause_before_step=SIGTERM_BEFORE_STEP)
  wait_for_pause(proc)
  proc.send_signal(signal.SIGTERM)  # Handled at once: the process waits in Python.
  resume_paused(proc)
  saved = _preempted_step(finish(proc))  # Exit status 0.
  assert saved == SIGTERM_BEFORE_STEP + 1  # The step it was on when signalled.
  assert finished_steps(workdir)[-1] == saved
  # The metrics of every finished step reached the disk.
  assert comparable_records(workdir)[-1]['step'] == saved

  out = finish(launch(workdir, cache_dir=cache_dir))
  assert f'at step {saved}' in out, out[-3000:]
  assert_same_run(workdir, reference)


# ---------------------------------------------------------- the lock


@needs_fmnist
def test_second_trainer_on_a_workdir_is_refused_while_export_reads_it(tmp_path, cache_dir):
  workdir = str(tmp_path / 'run')
  first = launch(workdir, cache_dir=cache_dir, pause_before_step=LOCK_HOLDER_BEFORE_STEP)
  wait_for_pause(first)
  with open(os.path.join(workdir, 'config.json')) as f:
    config_json = f.read()
  # Another learning rate: refused by the lock, before the config is looked at.
  second = launch(workdir, cache_dir=cache_dir, extra={'optim.learning_rate': 0.01})
  assert second.wait(timeout=300) != 0
  out = log_of(second)
  assert (
      f'WorkdirLockedError: workdir {workdir} is in use by another trainer: PID {first.pid} '
      f'on host {socket.gethostname()}, started '
  ) in out, out[-3000:]
  assert 'Fix: wait for that run to finish or stop it, or pass another --workdir' in out
  assert 'Model mlp' not in out  # Stopped before the run was built.
  with open(os.path.join(workdir, 'config.json')) as f:
    assert f.read() == config_json

  # Export only reads: allowed while the run trains.
  _, _, state, step = export.restore_run(workdir)
  assert step in (20, 40) and int(state.step) == step

  resume_paused(first)
  finish(first)
  # One trainer wrote the metrics: one record per step.
  assert [r['step'] for r in comparable_records(workdir)] == list(
      range(TINY['num_train_steps'] + 1)
  )
  with open(os.path.join(workdir, checkpointing.LOCK_FILE)) as f:
    assert f.read() == ''  # Released: nothing for the next run to take over.


_HOLD_LOCK = (
    'import sys\n'
    'from srigl_jax.training import checkpointing\n'
    'checkpointing.WorkdirLock(sys.argv[1]).acquire()\n'
    "print('locked', flush=True)\n"
    'sys.stdin.read()\n'
)


def test_locked_workdir_is_refused_before_building_and_a_killed_holder_frees_it(
    tmp_path, compile_log, caplog
):
  workdir = str(tmp_path)
  holder = subprocess.Popen(
      [sys.executable, '-c', _HOLD_LOCK, workdir],
      cwd=REPO,
      env={**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'},
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      text=True,
  )
  try:
    assert holder.stdout.readline() == 'locked\n'  # Waits until it holds the lock.
    with pytest.raises(
        checkpointing.WorkdirLockedError,
        match=rf'in use by another trainer: PID {holder.pid} on host '
        rf'{re.escape(socket.gethostname())}, started \d{{4}}-.*Fix: ',
    ) as info:
      loop.train_and_evaluate(small_config(), workdir)
    assert info.value.holder['pid'] == holder.pid
    assert not _trainer_compiled(compile_log), compile_log
    assert sorted(os.listdir(workdir)) == [checkpointing.LOCK_FILE]  # Nothing else written.
  finally:
    holder.kill()  # SIGKILL: no clean-up in the holder; the OS drops its lock.
    holder.wait()
  lock = checkpointing.WorkdirLock(workdir)
  with caplog.at_level(logging.WARNING):
    lock.acquire()
  lock.release()
  assert f'from PID {holder.pid} on host {socket.gethostname()}' in caplog.text
  assert 'ended without releasing it' in caplog.text


def test_filesystem_without_locks_trains_unguarded_with_a_warning(tmp_path, monkeypatch, caplog):
  def no_locks(fd, op):
    raise OSError(errno.ENOLCK, 'No locks available')

  monkeypatch.setattr(checkpointing.fcntl, 'flock', no_locks)
  lock = checkpointing.WorkdirLock(str(tmp_path))
  with caplog.at_level(logging.WARNING):
    lock.acquire()
  lock.release()
  assert 'nothing stops a second trainer on this workdir' in caplog.text


# ---------------------------------------------------------- multi-process


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def launch_two(workdir, cache_dir=None, pause_before_step=None):
  """Starts the tiny run as 2 processes of 4 CPU devices; returns the Popens.

  With `pause_before_step` both pause before that step (markers
  MARKER.0 and MARKER.1, one go file).
  """
  port = _free_port()
  marker = f'{workdir}.{time.time_ns()}.pause' if pause_before_step is not None else None
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
          pause_before_step=pause_before_step,
          marker=marker,
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
  workdir = str(tmp_path / 'run')
  procs = launch_two(workdir, cache_dir, pause_before_step=SIGTERM_TWO_PROCESSES_BEFORE_STEP)
  wait_for_pause(procs)
  procs[1].send_signal(signal.SIGTERM)
  resume_paused(procs)
  saved = [_preempted_step(finish(p, timeout=400)) for p in procs]
  # The service agrees on a step after the notice reaches it, a step or a few
  # after the pause.
  assert saved[0] == saved[1], saved
  assert SIGTERM_TWO_PROCESSES_BEFORE_STEP < saved[0] < TINY['num_train_steps'], saved
  assert finished_steps(workdir)[-1] == saved[0]
  assert comparable_records(workdir)[-1]['step'] == saved[0]

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


def test_every_schema_field_is_fingerprinted_or_may_change():
  # A field is in the fingerprint unless RESUMABLE_FIELDS lets it change, so
  # a field added to the schema is checked on resume by default.
  every = set()
  for name in data_lib.DATASET_NAMES:
    config = config_lib.base_config(name)
    fields = checkpointing.schema_fields(name)
    every |= set(fields)
    recorded = set(checkpointing.fingerprint(config)) - {'version', 'data_order'}
    assert recorded == set(fields) - set(checkpointing.RESUMABLE_FIELDS), name
  assert set(checkpointing.RESUMABLE_FIELDS) <= every  # No stale entry.
  # The groups that decide the trajectory are recorded whole.
  recorded = set(checkpointing.fingerprint(config_lib.base_config('synthetic')))
  for field in every:
    if field.split('.')[0] in ('optim', 'sparsity', 'model') or field in (
        'seed',
        'batch_size',
        'num_train_steps',
    ):
      assert field in recorded, field


# Changes a resume must refuse, one field at a time: what decides the
# trajectory (the model, the method and its schedule, the optimizer and its
# schedule, the data the steps read, the seed).
REFUSED_CHANGES = {
    'sparsity.method': 'rigl',
    'sparsity.sparsity': 0.9,
    'sparsity.distribution': 'uniform',
    'sparsity.update_every': 10,
    'sparsity.drop_fraction': 0.5,
    'sparsity.gamma_sal': 0.5,
    'sparsity.stop_fraction': 0.5,
    'sparsity.stop_step': 100,
    'sparsity.init': 'masked',
    'sparsity.group_size': 2,
    'sparsity.grad_accumulation': 2,
    'sparsity.dense_layers': ('dense_0',),
    'optim.name': 'adamw',
    'optim.learning_rate': 0.01,
    'optim.schedule': 'constant',
    'optim.momentum': 0.8,
    'optim.nesterov': True,
    'optim.b2': 0.99,
    'optim.eps': 1e-6,
    'optim.weight_decay': 0.0,
    'optim.decay_pattern': 'kernel',
    'optim.warmup_epochs': 1.0,
    'optim.label_smoothing': 0.1,
    'optim.grad_clip_norm': 1.0,
    'optim.grad_accum_steps': 2,
    'num_train_steps': 400,
    'seed': 1,
    'batch_size': 64,
    'model.name': 'cnn',
    'model.dtype': 'bfloat16',
    'model.kwargs.hidden_sizes': (64, 64),
    'input.augment': 'crop',
    'input.num_train_examples': 1024,
    'input.synthetic_seed': 3,
}


@pytest.mark.parametrize('field', sorted(REFUSED_CHANGES))
def test_resume_that_changes_the_run_is_refused(field, tmp_path):
  workdir = str(tmp_path)
  save_checkpoint(workdir, small_config())  # Its metadata holds the fingerprint.
  changed = small_config(**{field: REFUSED_CHANGES[field]})
  before, after = checkpointing.fingerprint(small_config()), checkpointing.fingerprint(changed)
  key = 'model.kwargs' if field.startswith('model.kwargs.') else field  # Recorded whole.
  with pytest.raises(
      checkpointing.WorkdirMismatchError,
      match=re.escape(f'{key}: checkpoint {before[key]!r} vs config {after[key]!r}')
      + '.*Use a new --workdir',
  ) as info:
    checkpointing.check_workdir(workdir, changed)
  moved = ['sparsity.stop_step'] if field in ('num_train_steps', 'sparsity.stop_fraction') else []
  assert sorted(info.value.fields) == sorted([key] + moved)  # T_end moves with those two.
  assert not os.path.exists(os.path.join(workdir, checkpointing.FINGERPRINT_FILE))


# Changes a resume accepts: every field of RESUMABLE_FIELDS.
ALLOWED_CHANGES = {
    'log_every': 3,
    'eval_every': 7,
    'checkpoint_every': 9,
    'keep_checkpoints': 5,
    'halt_after_step': 100,
    'write_plots': True,
    'export': False,
    'eval_batch_size': 16,
    'skip_bad_steps': True,
    'mesh.data': 2,
    'input.data_dir': '/elsewhere',
    'input.num_workers': 1,
    'input.num_threads': 2,
    'input.prefetch': 4,
    'input.cache': False,
    'input.num_eval_examples': 64,
}


def test_allowed_changes_are_the_resumable_fields():
  assert set(ALLOWED_CHANGES) == set(checkpointing.RESUMABLE_FIELDS)


@pytest.mark.parametrize('field', sorted(ALLOWED_CHANGES))
def test_resume_with_a_change_that_keeps_the_run_is_accepted(field, tmp_path):
  workdir = str(tmp_path)
  save_checkpoint(workdir, small_config())
  checkpointing.check_workdir(workdir, small_config(**{field: ALLOWED_CHANGES[field]}))


def test_fingerprint_json_decides_for_checkpoints_without_metadata(tmp_path):
  # The layout of older versions: fingerprint.json and plain checkpoints.
  workdir = str(tmp_path)
  checkpointing.check_workdir(workdir, small_config())  # Writes fingerprint.json.
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    manager.save(25, args=ocp.args.StandardSave({'w': jnp.zeros(3)}))
  checkpointing.check_workdir(workdir, small_config())
  with pytest.raises(checkpointing.WorkdirMismatchError, match='optim.learning_rate'):
    checkpointing.check_workdir(workdir, small_config(**{'optim.learning_rate': 0.01}))


# Fingerprint version 1 recorded these fields (and data_order, optim.momentum>0).
V1_FIELDS = (
    'model.name',
    'model.kwargs',
    'model.dtype',
    'input.name',
    'input.image_shape',
    'input.image_size',
    'input.num_classes',
    'input.augment',
    'input.crop_padding',
    'input.randaugment',
    'input.mixup_alpha',
    'input.cutmix_alpha',
    'input.num_train_examples',
    'input.synthetic_seed',
    'batch_size',
    'sparsity.method',
    'sparsity.sparsity',
    'sparsity.distribution',
    'sparsity.erk_power_scale',
    'sparsity.sparse_rule',
    'sparsity.dense_layers',
    'sparsity.no_ablation',
    'sparsity.grad_accumulation',
    'sparsity.group_size',
    'optim.name',
    'seed',
)


def save_v1_checkpoint(workdir, config, drop=()):
  """A checkpoint as version 1 wrote it, without the fields `drop`."""
  fp = checkpointing.fingerprint(config)
  old = {'version': 1, 'data_order': checkpointing.DATA_ORDER}
  old.update({k: fp.get(k) for k in V1_FIELDS if k not in drop})
  old['optim.momentum>0'] = bool(config.optim.momentum)
  for k in drop:
    old.pop(k, None)
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    manager.save(25, args=ocp.args.StandardSave({'w': jnp.zeros(3)}), custom_metadata=old)


def test_version_1_fingerprint_compares_what_it_records(tmp_path, caplog):
  workdir = str(tmp_path)
  save_v1_checkpoint(workdir, small_config())
  checkpointing.check_workdir(workdir, small_config(), write=False)
  with pytest.raises(
      checkpointing.WorkdirMismatchError, match=r'sparsity.sparsity: checkpoint 0.8 vs config 0.9'
  ):
    checkpointing.check_workdir(workdir, small_config(**{'sparsity.sparsity': 0.9}))
  with pytest.raises(
      checkpointing.WorkdirMismatchError, match=r'optim.momentum>0: checkpoint True vs config False'
  ):
    checkpointing.check_workdir(workdir, small_config(**{'optim.momentum': 0.0}))
  # What version 1 did not record cannot be checked: trusted, with a warning.
  with caplog.at_level(logging.WARNING):
    checkpointing.check_workdir(workdir, small_config(**{'optim.learning_rate': 0.01}))
  assert 'version-1 fingerprint, which does not record' in caplog.text
  assert 'optim.learning_rate' in caplog.text and 'num_train_steps' in caplog.text


def test_version_1_fingerprint_without_a_later_field_means_its_default(tmp_path):
  # Written before sparsity.group_size existed: that run was ungrouped.
  workdir = str(tmp_path)
  save_v1_checkpoint(workdir, small_config(), drop=('sparsity.group_size',))
  checkpointing.check_workdir(workdir, small_config())
  with pytest.raises(
      checkpointing.WorkdirMismatchError, match=r'sparsity.group_size: checkpoint 1 vs config 2'
  ):
    checkpointing.check_workdir(workdir, small_config(**{'sparsity.group_size': 2}))


def test_version_2_fingerprint_without_a_later_field_means_its_default(tmp_path):
  workdir = str(tmp_path)
  fp = checkpointing.fingerprint(small_config())
  del fp['sparsity.init']  # As if written before the field existed.
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    manager.save(25, args=ocp.args.StandardSave({'w': jnp.zeros(3)}), custom_metadata=fp)
  checkpointing.check_workdir(workdir, small_config())
  with pytest.raises(
      checkpointing.WorkdirMismatchError,
      match=r"sparsity.init: checkpoint 'sparse_he' vs config 'masked'",
  ):
    checkpointing.check_workdir(workdir, small_config(**{'sparsity.init': 'masked'}))


@pytest.mark.parametrize('order', [None, 'grain-shuffle-repeat-batch/1'])
def test_checkpoint_of_an_earlier_data_order_is_refused(tmp_path, order):
  # Checkpoints of the hand-written pipeline carry no data order, those of
  # the first grain pipeline its per-example order: their runs continued on
  # other batches, so resuming one now is refused.
  workdir = str(tmp_path)
  drop = ['data_order'] if order is None else []
  if order is None:  # Nor the input fields but the name.
    drop += [k for k in V1_FIELDS if k.startswith('input.') and k != 'input.name']
  save_v1_checkpoint(workdir, small_config(), drop=drop)
  if order is not None:
    with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
      old = dict(manager.metadata(25).custom_metadata)
      old['data_order'] = order
      manager.save(26, args=ocp.args.StandardSave({'w': jnp.zeros(3)}), custom_metadata=old)
  with pytest.raises(
      checkpointing.WorkdirMismatchError, match=rf'data_order: checkpoint {order!r} vs config'
  ):
    checkpointing.check_workdir(workdir, small_config())


@pytest.mark.parametrize('field', ['sparsity.method', 'optim.name', 'optim.learning_rate'])
def test_trainer_refuses_a_changed_run_before_compiling_and_keeps_config_json(
    field, tmp_path, compile_log
):
  workdir = str(tmp_path)
  save_checkpoint(workdir, small_config())
  config_json = os.path.join(workdir, 'config.json')
  with open(config_json, 'w') as f:
    f.write('{"as": "the first run wrote it"}')
  changed = small_config(num_train_steps=160, **{field: REFUSED_CHANGES[field]})
  with pytest.raises(checkpointing.WorkdirMismatchError, match=re.escape(field)):
    loop.train_and_evaluate(changed, workdir)
  assert not _trainer_compiled(compile_log)
  with open(config_json) as f:
    assert f.read() == '{"as": "the first run wrote it"}'


def test_trainer_refuses_an_unknown_key(tmp_path, compile_log):
  config = small_config()
  config.sparsity = ml_collections.ConfigDict({**config.sparsity.to_dict(), 'gama_sal': 0.5})
  with pytest.raises(config_lib.ConfigError, match='gama_sal'):
    loop.train_and_evaluate(config, str(tmp_path))
  assert not _trainer_compiled(compile_log)


# ------------------------------------------------------------ damaged files

# A 30-step run on generated data, checkpoints at 10, 20 and 30.
RECOVERY = {
    'num_train_steps': 30,
    'checkpoint_every': 10,
    'eval_every': 0,
    'log_every': 5,
    'export': False,
}


@pytest.fixture(scope='module')
def recovery_runs(tmp_path_factory):
  """(final state of the uninterrupted run, the workdir of one halted at step 20)."""
  reference_state = loop.train_and_evaluate(
      small_config(**RECOVERY), str(tmp_path_factory.mktemp('recovery_reference'))
  )
  halted = str(tmp_path_factory.mktemp('recovery_halted') / 'run')
  loop.train_and_evaluate(small_config(**RECOVERY, halt_after_step=20), halted)
  assert finished_steps(halted) == [10, 20]
  return leaves(jax.device_get(reference_state)), halted


def damage_checkpoint(workdir, step):
  """Cuts every array data file of a complete checkpoint short (a disk fault)."""
  folder = os.path.join(workdir, 'checkpoints', str(step))
  cut = 0
  for root, _, files in os.walk(folder):
    if os.path.basename(root) == 'd':
      for name in files:
        with open(os.path.join(root, name), 'r+b') as f:
          f.truncate(10)
        cut += 1
  assert cut, folder


def assert_same_state(state, want):
  got = leaves(jax.device_get(state))
  assert got.keys() == want.keys()
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(recovery_runs, tmp_path, caplog):
  reference_state, halted = recovery_runs
  workdir = str(tmp_path / 'run')
  shutil.copytree(halted, workdir)
  damage_checkpoint(workdir, 20)
  damaged = os.path.join(workdir, 'checkpoints', '20')
  # Export (reads only) falls back and moves nothing.
  with caplog.at_level(logging.WARNING):
    _, _, state, step = export.restore_run(workdir)
  assert step == 10 and int(state.step) == 10
  assert f'Checkpoint {damaged} cannot be restored (' in caplog.text
  assert finished_steps(workdir) == [10, 20]
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    report = export.export_inference_model(workdir, str(tmp_path / 'inference'), verify=False)
  assert report['source_step'] == 10
  assert f'Checkpoint {damaged} cannot be restored (' in caplog.text
  assert finished_steps(workdir) == [10, 20]
  # So does the trainer, which moves the damaged one aside and trains 11-30 again.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    state = loop.train_and_evaluate(small_config(**RECOVERY), workdir)
  assert f'Checkpoint {damaged} cannot be restored (' in caplog.text
  assert f'Moved damaged checkpoint {damaged} to {workdir}/damaged_checkpoints/20' in caplog.text
  assert os.listdir(os.path.join(workdir, 'damaged_checkpoints')) == ['20']
  assert finished_steps(workdir) == [10, 20, 30]
  assert_same_state(state, reference_state)


def test_no_checkpoint_that_restores_is_an_error_naming_each(recovery_runs, tmp_path):
  _, halted = recovery_runs
  workdir = str(tmp_path / 'run')
  shutil.copytree(halted, workdir)
  damage_checkpoint(workdir, 10)
  damage_checkpoint(workdir, 20)
  folders = [os.path.join(workdir, 'checkpoints', s) for s in ('20', '10')]
  match = (
      rf'No checkpoint in {workdir}/checkpoints can be restored \({folders[0]}: .*; '
      rf'{folders[1]}: .*\)\..*Fix: move {workdir}/checkpoints aside'
  )
  with pytest.raises(checkpointing.DamagedWorkdirError, match=match):
    loop.train_and_evaluate(small_config(**RECOVERY), workdir)
  with pytest.raises(export.ExportError, match=match):
    export.restore_run(workdir)
  assert finished_steps(workdir) == [10, 20]  # Nothing moved when nothing restores.


def test_damaged_fingerprint_json_is_rebuilt_and_allowed_changes_keep_the_run(
    recovery_runs, tmp_path, caplog
):
  reference_state, halted = recovery_runs
  workdir = str(tmp_path / 'run')
  shutil.copytree(halted, workdir)
  path = os.path.join(workdir, checkpointing.FINGERPRINT_FILE)
  with open(path, 'w') as f:
    f.write('{"version": 2, "model.na')  # Cut short.
  # Readers take the checkpoints' own fingerprint instead.
  with caplog.at_level(logging.WARNING):
    fp = checkpointing.read_fingerprint(workdir)
  assert fp == checkpointing.checkpoint_fingerprint(workdir, 20)
  assert fp == checkpointing.fingerprint(small_config(**RECOVERY))
  assert f'{path} is damaged (not valid JSON' in caplog.text
  # So does the export command.
  report = export.export_inference_model(workdir, str(tmp_path / 'inference'), verify=False)
  with open(os.path.join(report['path'], 'manifest.json')) as f:
    assert json.load(f)['source']['fingerprint']['fields'] == fp
  # The trainer rebuilds it, and resumes with every field that may change
  # changed (those testable on one device): the same run, bitwise.
  changes = {
      'log_every': 2,
      'eval_every': 5,
      'checkpoint_every': 5,
      'keep_checkpoints': 4,
      'eval_batch_size': 64,
      'skip_bad_steps': True,
      'input.data_dir': str(tmp_path / 'moved'),
      'input.num_eval_examples': 64,
      'input.prefetch': 2,
      'input.num_threads': 2,
      'input.cache': False,
      'export': True,
  }
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    state = loop.train_and_evaluate(small_config(**{**RECOVERY, **changes}), workdir)
  assert f'{path} was not valid JSON' in caplog.text and 'rebuilt it' in caplog.text
  with open(path) as f:
    assert json.load(f) == fp
  assert_same_state(state, reference_state)
  # The export at the end records it.
  with open(os.path.join(workdir, 'inference', 'manifest.json')) as f:
    assert json.load(f)['source']['fingerprint']['fields'] == fp


def test_damaged_fingerprint_json_next_to_checkpoints_without_one_is_an_error(tmp_path):
  workdir = str(tmp_path)
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as manager:
    manager.save(25, args=ocp.args.StandardSave({'w': jnp.zeros(3)}))
  path = os.path.join(workdir, checkpointing.FINGERPRINT_FILE)
  with open(path, 'w') as f:
    f.write('\0\0\0')
  with pytest.raises(
      checkpointing.DamagedWorkdirError,
      match=rf'{path} is not valid JSON.*carry no fingerprint.*Fix: .*delete {path}',
  ):
    checkpointing.check_workdir(workdir, small_config())


def test_damaged_metrics_lines_are_dropped_with_a_warning(tmp_path, caplog):
  path = str(tmp_path / 'metrics.jsonl')
  original = (
      '{"step": 1, "train_loss": 2.3}\n'
      '{"step": 2, "train_lo{"step": 2, "train_loss": 2.2}\n'  # Two writers interleaved.
      '{"step": 2, "train_loss": 2.2}\n'
      '\0\0\0\0\n'  # A block of zeros from a crash.
      '{"step": 3, "train_loss": 2.1}\n'
      '{"step": 4, "train_lo'  # Torn by a kill.
  )
  with open(path, 'w', encoding='utf-8') as f:
    f.write(original)
  with caplog.at_level(logging.WARNING):
    records = metric_writers.read_jsonl(path)
  assert [r['step'] for r in records] == [1, 2, 3]
  assert f'{path} line 2 is not a JSON record' in caplog.text
  assert f'{path} line 4 is not a JSON record' in caplog.text
  assert 'line 6' not in caplog.text  # A torn end is what a live run shows.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    metric_writers.truncate_jsonl(path, 2)  # Resuming at step 2.
  assert f'{path}: dropped its torn last line 6' in caplog.text
  assert f'{path}: dropped 2 damaged line(s) that are not JSON records (line 2: ' in caplog.text
  assert metric_writers.read_jsonl(path) == [
      {'step': 1, 'train_loss': 2.3},
      {'step': 2, 'train_loss': 2.2},
  ]
  (backup,) = [n for n in os.listdir(tmp_path) if n.startswith('metrics.jsonl.corrupt-')]
  assert f'kept in {tmp_path / backup}' in caplog.text
  with open(tmp_path / backup, encoding='utf-8') as f:
    assert f.read() == original


def test_trainer_resumes_over_damaged_metrics_lines(recovery_runs, tmp_path):
  reference_state, halted = recovery_runs
  workdir = str(tmp_path / 'run')
  shutil.copytree(halted, workdir)
  path = os.path.join(workdir, 'metrics.jsonl')
  with open(path, encoding='utf-8') as f:
    lines = f.read().split('\n')
  lines.insert(2, '{"step": 7, "train_lo')
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines) + '{"step": 21, "tra')
  state = loop.train_and_evaluate(small_config(**RECOVERY), workdir)
  assert_same_state(state, reference_state)
  steps = [r['step'] for r in metric_writers.read_jsonl(path)]
  assert steps == sorted(set(steps)) and steps[-1] == 30


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
