"""Tests of the trainer, the configs and the entry point (CPU, tiny models).

The end-to-end runs use a few hundred real Fashion-MNIST images when Debian's
dataset-fashion-mnist is installed, generated data otherwise.
"""

import json
import math
import os
import platform
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

# pylint: disable-next=g-import-not-at-top,wrong-import-position
from conftest import CONFIGS, HAVE_FMNIST, REPO, cli_flags, load_config, set_fields
from ml_collections import config_flags

import srigl_jax
from srigl_jax import config_lib, models
from srigl_jax.training import build, loop, metric_writers, optimizer, steps
from srigl_jax.training.state import TrainState

CONFIG_NAMES = (
    'fashion_mnist',
    'cifar10_resnet18',
    'cifar10_wrn22',
    'imagenet_resnet50',
    'imagenet_vit_b16',
    'imagenet_mobilenet_v3',
)

# Small run: MLP 784-64-64-10 at 80% SRigL, 20 steps of batch 32 (two
# micro-batches of 16), masks updated every 5 steps until step 15, on one
# device (the 8-device run overrides mesh.data).
SMALL_OVERRIDES = {
    'batch_size': 32,
    'optim.grad_accum_steps': 2,
    'mesh.data': 1,
    'num_train_steps': 20,
    'log_every': 5,
    'eval_every': 10,
    'checkpoint_every': 10,
    'model.kwargs.hidden_sizes': (64, 64),
    'sparsity.sparsity': 0.8,
    'sparsity.update_every': 5,
    'input.num_train_examples': 512,
    'input.num_eval_examples': 200,
    'input.prefetch': 0,
}
if not HAVE_FMNIST:
  SMALL_OVERRIDES['input.name'] = 'synthetic'
  SMALL_OVERRIDES['input.image_shape'] = (28, 28, 1)


def small_config(**extra):
  """The small run's config (plus `extra` dotted overrides)."""
  return set_fields(load_config('fashion_mnist'), {**SMALL_OVERRIDES, **extra})


def cli_overrides(**extra):
  """The small run's --config.* flags (plus `extra`)."""
  return cli_flags({**SMALL_OVERRIDES, **extra})


@pytest.fixture(scope='module', autouse=True)
def _compile_once(compilation_cache):
  """Reruns of one config in this module compile nothing."""
  return compilation_cache


def tensorboard_scalars(workdir):
  """(tag, step) -> value from the TFRecord event files of workdir."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  out = {}
  for name in os.listdir(workdir):
    if not name.startswith('events.out.tfevents'):
      continue
    with open(os.path.join(workdir, name), 'rb') as f:
      data = f.read()
    i = 0
    while i < len(data):
      (length,) = struct.unpack('<Q', data[i : i + 8])
      event = event_pb2.Event.FromString(data[i + 12 : i + 12 + length])
      i += 12 + length + 4  # length, its crc, payload, payload crc
      for v in event.summary.value:
        out[(v.tag, event.step)] = v.simple_value
  return out


def records(workdir):
  return metric_writers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_every_config_defaults_to_srigl_90(name):
  config = load_config(name)
  assert config.sparsity.method == 'srigl'
  assert config.sparsity.sparsity == 0.9
  assert config.sparsity.no_ablation == (r'(^|/)head/kernel$',)
  assert set(config.keys()) >= {'input', 'model', 'sparsity', 'optim'}
  assert config_lib.resolve_stop_step(config) == int(0.75 * config.num_train_steps)


_SHAPES = {  # Input shape and classes of each config's dataset.
    'fashion_mnist': ((28, 28, 1), 10),
    'cifar10_resnet18': ((32, 32, 3), 10),
    'cifar10_wrn22': ((32, 32, 3), 10),
    'imagenet_resnet50': ((224, 224, 3), 1000),
    'imagenet_vit_b16': ((224, 224, 3), 1000),
    'imagenet_mobilenet_v3': ((224, 224, 3), 1000),
}


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_config_builds_a_valid_sparse_model(name):
  """The trainer's build of the full-size config: checks, model, optimizer, masks, no data."""
  config = load_config(name)
  run = build.build(config, open_dataset=False)
  assert (run.image_shape, run.num_classes) == _SHAPES[name]
  assert run.dataset is None
  state, order = run.abstract_state, run.call_order
  masks = srigl_jax.get_masks(state)
  sparse = {
      '/'.join(str(k.key) for k in kp) for kp, _ in jax.tree_util.tree_leaves_with_path(masks)
  }
  assert len(sparse) >= 2
  assert order and next(iter(order)) == ''  # the model itself is called first
  specs = srigl_jax.sparsity.transform.find_sparse_state(state.opt_state).layers.by_path()
  if 'head/kernel' in specs:
    assert not specs['head/kernel'].ablation
  if name == 'imagenet_mobilenet_v3':
    assert not any('depthwise' in p for p in sparse)
  if name == 'imagenet_vit_b16':
    assert any(p.endswith('attention/query/kernel') for p in sparse)
    assert 'embedding/kernel' in sparse  # the first layer is sparse


@pytest.mark.parametrize('method', config_lib.RECIPES)
def test_arg_selects_method_and_sparsity(method):
  config = load_config('cifar10_resnet18', f'method={method},sparsity=0.95')
  assert config.sparsity.method == method
  assert config.sparsity.sparsity == (0.0 if method == 'dense' else 0.95)
  inner_method, gamma = config_lib.optimizer_method(config)
  if method == 'srigl_noablation':
    assert (inner_method, gamma) == ('srigl', 0.0)
  else:
    assert inner_method == method


@pytest.mark.parametrize(
    'arg, match',
    [
        ('methd=rigl', 'Unknown config arg key'),
        ('method=magic', 'Invalid value'),
        ('sparsity=lots', 'expected a float'),
        ('sparsity=1.5', r'\[0, 1\)'),
        ('rigl', 'not key=value'),
    ],
)
def test_bad_arg_is_a_clear_error(arg, match):
  with pytest.raises(ValueError, match=match):
    load_config('cifar10_resnet18', arg)


def test_paper_hyperparameters():
  r18 = load_config('cifar10_resnet18')
  assert (
      r18.batch_size,
      r18.optim.learning_rate,
      r18.optim.weight_decay,
      r18.optim.decay_factor,
      r18.optim.decay_every_epochs,
  ) == (128, 0.1, 5e-4, 0.2, 77.0)
  assert r18.num_train_steps == 250 * (50_000 // 128)
  r50 = load_config('imagenet_resnet50')
  assert (
      r50.batch_size,
      r50.num_train_steps,
      r50.sparsity.update_every,
      r50.sparsity.grad_accumulation,
      r50.optim.label_smoothing,
  ) == (512, 256_000, 800, 8, 0.1)
  vit = load_config('imagenet_vit_b16')
  assert (
      vit.optim.name,
      vit.sparsity.distribution,
      vit.sparsity.gamma_sal,
      vit.optim.grad_clip_norm,
      vit.optim.label_smoothing,
  ) == ('adamw', 'uniform', 0.95, 1.0, 0.11)
  mnv3 = load_config('imagenet_mobilenet_v3')
  assert mnv3.sparsity.dense_layers == ('depthwise',)


def _parse_flags(argv):
  fv = flags.FlagValues()
  argv = ['prog'] + argv
  config_flags.DEFINE_config_file('config', None, flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def test_command_line_overrides_and_stop_step_follows_num_train_steps():
  path = os.path.join(CONFIGS, 'cifar10_resnet18.py')
  config = _parse_flags(
      [
          f'--config={path}:method=rigl,sparsity=0.8',
          '--config.num_train_steps=200',
          '--config.batch_size=64',
          '--config.seed=1',
          '--config.checkpoint_every=100',
          '--config.sparsity.gamma_sal=0.5',
      ]
  )
  assert (config.sparsity.method, config.sparsity.sparsity) == ('rigl', 0.8)
  assert (
      config.num_train_steps,
      config.batch_size,
      config.seed,
      config.checkpoint_every,
      config.sparsity.gamma_sal,
  ) == (200, 64, 1, 100, 0.5)
  assert config_lib.resolve_stop_step(config) == 150
  pinned = _parse_flags([f'--config={path}', '--config.sparsity.stop_step=42'])
  assert config_lib.resolve_stop_step(pinned) == 42


def test_unknown_override_field_is_an_error():
  path = os.path.join(CONFIGS, 'fashion_mnist.py')
  with pytest.raises(Exception, match='num_train_stepz'):
    _parse_flags([f'--config={path}', '--config.num_train_stepz=3'])


def test_learning_rate_schedules():
  config = load_config('cifar10_resnet18')
  lr = optimizer.create_learning_rate_fn(config.optim, steps_per_epoch=10, num_train_steps=2500)
  assert np.isclose(lr(0), 0.1) and np.isclose(lr(769), 0.1)
  assert np.isclose(lr(770), 0.02) and np.isclose(lr(1540), 0.004)
  r50 = load_config('imagenet_resnet50').optim
  lr = optimizer.create_learning_rate_fn(r50, steps_per_epoch=10, num_train_steps=1000)
  assert np.isclose(lr(0), 0.0) and np.isclose(lr(25), 0.1)
  assert np.isclose(lr(50), 0.2) and np.isclose(lr(299), 0.2)
  assert np.isclose(lr(300), 0.02) and np.isclose(lr(900), 0.0002)
  vit = load_config('imagenet_vit_b16').optim
  lr = optimizer.create_learning_rate_fn(vit, steps_per_epoch=1, num_train_steps=116)
  assert np.isclose(lr(8), 1.5e-3) and np.isclose(lr(16), 3e-3)
  assert np.isclose(lr(66), 1.5e-3) and np.isclose(lr(116), 0.0, atol=1e-9)


def test_learning_rate_gets_its_epoch_length_once_before_it_is_asked():
  # The optimizer is built before the Dataset knows the epoch length.
  config = load_config('cifar10_resnet18')
  lr = optimizer.LearningRate(config.optim, num_train_steps=2500)
  with pytest.raises(RuntimeError, match='before its epoch length'):
    lr(0)
  lr.set_steps_per_epoch(10)
  want = optimizer.create_learning_rate_fn(config.optim, 10, 2500)
  for step in (0, 769, 770, 1540, 2499):
    assert lr(step) == want(step)
  with pytest.raises(RuntimeError, match='already'):
    lr.set_steps_per_epoch(20)
  config.optim.schedule = 'linear'
  with pytest.raises(config_lib.ConfigError, match='optim.schedule') as info:
    optimizer.LearningRate(config.optim, num_train_steps=2500)
  assert info.value.field == 'optim.schedule'


# ------------------------------------------------------------- end to end


@pytest.fixture(scope='module')
def full_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('full'))
  state = loop.train_and_evaluate(small_config(), workdir)
  return workdir, state


def test_run_leaves_checkpoints_metrics_events_plots(full_run):
  workdir, _ = full_run
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  assert steps == [10, 20]
  tb = tensorboard_scalars(workdir)
  for name in ('accuracy.png', 'active_neurons.png'):
    with open(os.path.join(workdir, name), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  recs = records(workdir)
  train_recs = [r for r in recs if 'train_loss' in r]
  assert [r['step'] for r in train_recs] == [5, 10, 15, 20]
  evals = [r for r in recs if 'eval_accuracy' in r]
  assert [r['step'] for r in evals] == [10, 20]
  # Layer stats at the start, after each mask update (5, 10) and each eval
  # (10, 20).
  stat_steps = sorted({r['step'] for r in recs if 'global_sparsity' in r})
  assert stat_steps == [0, 5, 10, 20]
  for r in evals:
    for layer in ('dense_0/kernel', 'dense_1/kernel'):
      for field in ('density', 'active_neurons', 'neurons', 'fan_in'):
        assert f'{layer}/{field}' in r
    assert 0.7 < r['global_sparsity'] < 0.85
    assert math.isfinite(r['eval_loss'])
  assert tb[('eval_accuracy', 20)] == pytest.approx(evals[-1]['eval_accuracy'])
  assert ('dense_0/kernel/active_neurons', 5) in tb and ('train_loss', 15) in tb
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['final_step'] == 20
  assert summary['eval_accuracy'] == evals[-1]['eval_accuracy']
  assert summary['steps_per_sec'] > 0
  if HAVE_FMNIST:
    assert summary['eval_accuracy'] > 0.4  # 20 steps on 640 images.


def test_masked_weights_are_zero_and_fan_in_is_constant(full_run):
  _, state = full_run
  masks = srigl_jax.get_masks(state)
  flat_masks = jax.tree_util.tree_leaves_with_path(masks)
  assert flat_masks
  params = dict(jax.tree_util.tree_leaves_with_path(state.params))
  for kp, m in flat_masks:
    m = np.asarray(m)
    w = np.asarray(params[kp])
    assert np.all(w[~m] == 0.0)
    per_neuron = m.reshape(-1, m.shape[-1]).sum(0)
    active = per_neuron[per_neuron > 0]
    assert active.size and np.all(active == active[0])  # constant fan-in
  for s in srigl_jax.layer_stats(state).values():
    assert int(s['fan_in']) == int(s['min_fan_in'])


def test_resume_after_stop_matches_uninterrupted_run(full_run, tmp_path):
  workdir_full, state_full = full_run
  workdir = str(tmp_path / 'resumed')
  first = loop.train_and_evaluate(small_config(halt_after_step=12), workdir)
  assert int(first.step) == 12
  assert not os.path.exists(os.path.join(workdir, 'summary.json'))
  state = loop.train_and_evaluate(small_config(), workdir)
  assert int(state.step) == 20
  jax.tree.map(
      np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(state_full.params)
  )
  jax.tree.map(
      np.testing.assert_array_equal,
      jax.device_get(srigl_jax.get_masks(state)),
      jax.device_get(srigl_jax.get_masks(state_full)),
  )

  def comparable(recs):
    # The halted run logs the train loss of steps 11-12 at 12, so the resumed
    # record at 15 covers 13-15 only; evals and mask statistics must match.
    return [
        {k: v for k, v in r.items() if k != 'steps_per_sec'}
        for r in recs
        if 'global_sparsity' in r or r['step'] <= 10
    ]

  assert comparable(records(workdir)) == comparable(records(workdir_full))


def test_non_finite_loss_stops_with_the_step(tmp_path, nan_batches):
  nan_batches({7})
  with pytest.raises(FloatingPointError, match=r'Non-finite training loss \(nan\) at step 7;'):
    loop.train_and_evaluate(small_config(), str(tmp_path))
  # The checkpoint of step 10 was never written.
  assert not os.path.exists(tmp_path / 'checkpoints' / '10')


def test_grad_accumulation_matches_one_batch_and_steps_compile_once():
  config = small_config()
  config.sparsity.method = 'dense'
  config.sparsity.sparsity = 0.0
  model = models.get_model('mlp', 10, hidden_sizes=(16,))
  tx = optimizer.create_optimizer(config, lambda s: 0.1, jax.random.key(0))
  params = model.init(jax.random.key(1), np.zeros((1, 28, 28, 1)))['params']
  state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  state = state.replace(step=jnp.zeros([], jnp.int32))  # as the trainer's init
  rng = np.random.default_rng(0)
  batch = {
      'image': rng.normal(size=(32, 28, 28, 1)).astype(np.float32),
      'label': rng.integers(0, 10, 32).astype(np.int32),
  }
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  state = jax.device_put(state, replicated)  # as the trainer's jitted init
  batch = jax.device_put(batch, sharding)
  outs = []
  for accum in (1, 4):
    config.optim.grad_accum_steps = accum
    step = jax.jit(
        steps.make_train_step(model, config, jax.random.key(2), sharding),
        in_shardings=(replicated, sharding),
        out_shardings=(replicated, replicated),
    )
    outs.append(step(state, batch))
    step(outs[-1][0], batch)
    assert step._cache_size() == 1  # pylint: disable=protected-access
  (s1, m1), (s4, m4) = outs
  np.testing.assert_allclose(m1['loss'], m4['loss'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s1.params, s4.params)


def _run_cli(workdir, n_devices, extra=()):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={n_devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  cmd = [
      sys.executable,
      '-m',
      'srigl_jax.main',
      f'--config={os.path.join(CONFIGS, "fashion_mnist.py")}',
      f'--workdir={workdir}',
      *cli_overrides(**dict(extra)),
  ]
  return subprocess.Popen(
      cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )


def test_one_and_eight_devices_give_the_same_metrics(full_run, tmp_path):
  # The same run as full_run (one device, in this process) on 8 fake CPU
  # devices through the command line: 2 rows per device per micro-batch.
  workdir_one, _ = full_run
  workdir = str(tmp_path / 'dev8')
  proc = _run_cli(workdir, 8, {'mesh.data': -1, 'write_plots': False}.items())
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  assert '8 devices' in out
  one, eight = records(workdir_one), records(workdir)
  assert [r['step'] for r in one] == [r['step'] for r in eight]
  for a, b in zip(one, eight):
    assert a.keys() == b.keys()
    for key in a:
      if key == 'steps_per_sec':
        continue
      if '/' in key or key in ('eval_accuracy', 'step', 'global_sparsity'):
        assert a[key] == b[key], key  # masks and counts: exactly equal
      else:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)


def test_keep_freed_memory_on_glibc(monkeypatch):
  # The entry point's process-wide setting (the library never calls it).
  from srigl_jax import main  # pylint: disable=g-import-not-at-top

  monkeypatch.setenv('SRIGL_JAX_SYSTEM_MALLOC', '1')
  assert not main.keep_freed_memory()  # Opted out: glibc defaults stay.
  monkeypatch.delenv('SRIGL_JAX_SYSTEM_MALLOC')
  glibc = sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc'
  assert main.keep_freed_memory() == glibc


def test_progress_rate_and_eta_exclude_pauses():
  clock = iter([10.0, 12.0, 20.0, 21.0, 30.0, 31.0, 40.0])
  progress = loop.Progress(total_steps=100, clock=lambda: next(clock))
  step = jnp.zeros([], jnp.int32)
  progress.step_done(step)  # Step 1 (compiles): the clock starts at 10.
  for _ in range(4):
    progress.step_done(step)
  assert progress.lap() == 2.0  # 4 steps in 12 - 10 s; restarts at 20.
  assert progress.eta(5, 2.0) == '0:00:47'
  progress.step_done(step)
  progress.pause(step)  # 1 step in 21 - 20 s; an eval follows.
  progress.step_done(step)  # The clock restarts at 30.
  progress.step_done(step)
  assert progress.lap() == 1.0  # 1 step in 31 - 30 s.
  assert progress.steps_per_sec == 6 / 4
  assert progress.eta(5, None) == '?'
