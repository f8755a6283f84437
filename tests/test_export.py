"""Tests of srigl_jax.export and srigl_jax.serving: workdir -> inference folder -> served model.

One tiny SRigL run (MLP 784-64-64-10, 80%, gamma_sal 0.95 so that neurons are
ablated, 20 steps) is trained once for the module, on 8 fake CPU devices in a
subprocess; its trainer exports it. Everything else runs on one device.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import srigl_jax
from srigl_jax import export, serving
from srigl_jax.serving import artefact
from srigl_jax.serving.report import summary_line
from srigl_jax.training import build, loop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable-next=g-import-not-at-top,wrong-import-position
from test_train import HAVE_FMNIST, REPO, cli_overrides, small_config

EXPORT_OVERRIDES = {
    'mesh.data': -1,
    'optim.grad_accum_steps': 1,
    'sparsity.gamma_sal': 0.95,
    'write_plots': False,
}


@pytest.fixture(scope='module', autouse=True)
def _compile_once(compilation_cache):
  return compilation_cache


def _env(cache, **extra):
  return dict(
      os.environ,
      JAX_COMPILATION_CACHE_DIR=cache,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      JAX_PLATFORMS='cpu',
      **extra,
  )


@pytest.fixture(scope='module')
def run(tmp_path_factory, compilation_cache):
  """A workdir trained on 8 fake CPU devices and exported by the trainer.

  Returns:
    (workdir, the run's log lines).
  """
  workdir = str(tmp_path_factory.mktemp('run'))
  cmd = [
      sys.executable,
      '-m',
      'srigl_jax.main',
      '--config=configs/fashion_mnist.py',
      f'--workdir={workdir}',
      *cli_overrides(**EXPORT_OVERRIDES),
  ]
  out = subprocess.run(
      cmd,
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env=_env(compilation_cache, XLA_FLAGS='--xla_force_host_platform_device_count=8'),
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert '8 devices' in out.stderr
  return workdir, out.stderr.strip().splitlines()


def raw_test_images(n):
  """Raw uint8 (n, 28, 28) eval images and labels, as a server receives them."""
  if HAVE_FMNIST:
    from srigl_jax.data import idx  # pylint: disable=g-import-not-at-top

    images, labels = idx.load_idx_split(
        'fashion_mnist', '/usr/share/datasets/fashion-mnist', 'test'
    )
    return images[:n, :, :, 0], labels[:n]
  from srigl_jax.data import synthetic  # pylint: disable=g-import-not-at-top

  images, labels = synthetic.make_synthetic('test', n, (28, 28, 1), 10, 0)
  return images[..., 0], labels


def masked_logits(workdir, x):
  """Logits of the masked model restored from the workdir's checkpoint."""
  _, model, state, _ = export.restore_run(workdir)
  params = srigl_jax.apply_masks(state.params, srigl_jax.get_masks(state.opt_state))
  return np.asarray(model.apply({'params': params}, x, train=False))


def snapshot(folder, skip=('inference',)):
  """path -> md5 of every file (and every folder) under `folder`."""
  out = {}
  for root, dirs, files in os.walk(folder):
    dirs[:] = [d for d in dirs if os.path.relpath(os.path.join(root, d), folder) not in skip]
    for name in dirs + files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, folder)
      if os.path.isfile(path):
        with open(path, 'rb') as f:
          out[rel] = hashlib.md5(f.read()).hexdigest()
      else:
        out[rel] = 'dir'
  return out


# ------------------------------------------------------------ the trainer


def test_trainer_exports_verifies_and_reports(run):
  workdir, log = run
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  inf = summary['inference']
  assert inf['path'] == os.path.join(workdir, 'inference')
  assert inf['kind'] == 'condensed'
  assert inf['condensed_accuracy'] == inf['masked_accuracy']
  assert inf['masked_accuracy'] == pytest.approx(summary['eval_accuracy'])
  assert inf['max_abs_logit_diff'] < 1e-4
  assert [r['batch'] for r in inf['latency']] == [1, 32]
  assert all(r['dense_us'] > 0 and r['condensed_us'] > 0 for r in inf['latency'])
  # The structured baseline (ablated neurons removed, dense kernels) is timed too.
  assert all(r['structured_us'] > 0 for r in inf['latency'])
  # The payoff line is the last thing the run says.
  last = log[-1].split('] ', 1)[-1]
  assert last.startswith('condensed model: '), log[-3:]
  assert '(same as masked)' in last and 'faster than dense at batch 1' in last
  assert 'x vs structured)' in last

  path = inf['path']
  with open(os.path.join(path, 'manifest.json')) as f:
    manifest = json.load(f)
  with open(os.path.join(path, 'report.json')) as f:
    report = json.load(f)
  assert report['condensed_accuracy'] == inf['condensed_accuracy']
  assert manifest['model'] == {
      'name': 'mlp',
      'num_classes': 10,
      'dtype': 'float32',
      'kwargs': {'hidden_sizes': [64, 64]},
  }
  assert manifest['input'] == {'shape': [28, 28, 1], 'dtype': 'float32'}
  assert manifest['preprocessing']['mean'] == [0.286]
  assert manifest['source']['checkpoint_step'] == 20
  with open(os.path.join(workdir, 'fingerprint.json')) as f:
    assert manifest['source']['fingerprint']['fields'] == json.load(f)
  layers = manifest['layers']
  assert set(layers) >= {'dense_0', 'dense_1', 'head'}
  for rec in layers.values():
    assert set(rec) == {
        'format',
        'kind',
        'density',
        'neurons',
        'active_neurons',
        'fan_in',
        'group_size',
    }
    assert rec['group_size'] == 1  # the run trained ungrouped
  assert manifest['format_version'] == 2  # no grouped layer: readable by version-2 readers
  assert layers['dense_0']['format'] == 'condensed'
  # gamma_sal 0.95 ablates neurons, and the artefact knows it.
  assert layers['dense_0']['active_neurons'] < layers['dense_0']['neurons']
  assert summary['layers']['dense_0/kernel']['active_neurons'] == (
      layers['dense_0']['active_neurons']
  )


# ------------------------------------------------------------ load, serve


def test_loaded_model_serves_raw_images_like_the_masked_model(run, tmp_path):
  workdir, _ = run
  # The artefact survives a move: it holds everything it needs.
  path = str(tmp_path / 'moved')
  shutil.copytree(os.path.join(workdir, 'inference'), path)
  model = serving.load_inference_model(path)
  raw, labels = raw_test_images(50)
  x = model.preprocess(raw)
  assert x.shape == (50, 28, 28, 1) and x.dtype == np.float32
  logits = model(x)
  assert logits.shape == (50, 10) and logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits), masked_logits(workdir, x), atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(model.predict(raw), np.asarray(logits).argmax(-1))
  model(x)
  assert model.compiled_batch_sizes == (50,)  # Compiled once for this batch size.
  # Another batch size costs one more compile, and is not refused.
  np.testing.assert_allclose(np.asarray(model(x[:1])), np.asarray(logits)[:1], atol=1e-5)
  model(x[:1])
  assert model.compiled_batch_sizes == (1, 50)
  assert model(x[:0]).shape == (0, 10)
  assert model.layers['dense_0']['format'] == 'condensed'
  del labels


def test_bad_input_to_the_loaded_model_names_the_fix(run):
  model = serving.load_inference_model(os.path.join(run[0], 'inference'))
  raw, _ = raw_test_images(4)
  with pytest.raises(ValueError, match=r'uint8.*call model\.preprocess'):
    model(raw[..., None])
  with pytest.raises(ValueError, match=r'shape \(4, 28, 28\).*\(N, 28, 28, 1\)'):
    model(model.preprocess(raw)[..., 0])
  with pytest.raises(ValueError, match='dtype float64'):
    model(model.preprocess(raw).astype(np.float64))
  with pytest.raises(ValueError, match='preprocess expects raw uint8'):
    model.preprocess(model.preprocess(raw))
  with pytest.raises(ValueError, match=r'\(N, 28, 28, 1\) or \(N, 28, 28\)'):
    model.preprocess(raw[:, :20])


# ------------------------------------------------------------ export


def test_export_reads_the_newest_checkpoint_and_leaves_the_workdir_alone(run, tmp_path):
  workdir, _ = run
  before = snapshot(workdir)
  out = str(tmp_path / 'again')
  report = export.export_inference_model(workdir, out, timing_s=0.02)
  assert snapshot(workdir) == before
  assert report['source_step'] == 20 and report['path'] == out
  assert report['condensed_accuracy'] == report['masked_accuracy']
  # Exporting over its own artefact replaces it; over anything else, refuses.
  export.export_inference_model(workdir, out, verify=False)
  assert sorted(os.listdir(out)) == [
      'manifest.json',
      'report.json',
      serving.MARKER_FILE,
      'variables',
  ]
  assert sorted(os.listdir(tmp_path)) == ['.again.lock', 'again']
  with pytest.raises(export.ExportError, match='is not an inference folder'):
    export.export_inference_model(workdir, os.path.join(workdir, 'checkpoints'))
  with pytest.raises(export.ExportError, match='is the training workdir'):
    export.export_inference_model(workdir, workdir)
  with pytest.raises(export.ExportError, match='contains the training workdir'):
    export.export_inference_model(workdir, os.path.dirname(workdir))
  # A folder holding a stray manifest.json is not an artefact.
  stray = tmp_path / 'stray'
  os.makedirs(stray / 'notes')
  (stray / 'manifest.json').write_text('{}')
  with pytest.raises(
      export.ExportError, match=r'--out=\S+stray exists and is not an inference folder.*holds'
  ):
    export.export_inference_model(workdir, str(stray), verify=False)
  assert sorted(os.listdir(stray)) == ['manifest.json', 'notes']
  assert snapshot(workdir) == before


def test_an_unwritable_out_is_refused_before_the_checkpoint_is_read(run, tmp_path, monkeypatch):
  workdir, _ = run

  def never(*args, **kwargs):
    raise AssertionError('the checkpoint was read before --out was checked')

  monkeypatch.setattr(export, '_restore', never)
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(export.ExportError, match=r'--out=\S+ cannot be written: creating .*a_file'):
    export.export_inference_model(workdir, str(tmp_path / 'a_file' / 'inference'))


def test_workdir_without_a_complete_checkpoint_is_a_clear_error(run, tmp_path):
  with pytest.raises(export.ExportError, match='not a training workdir'):
    export.export_inference_model(str(tmp_path))
  workdir = tmp_path / 'wd'
  os.makedirs(workdir / 'checkpoints')
  shutil.copy(os.path.join(run[0], 'config.json'), workdir)
  # What a kill during the first checkpoint write leaves behind.
  os.makedirs(workdir / 'checkpoints' / '10.orbax-checkpoint-tmp-123')
  with pytest.raises(export.ExportError, match=r'no complete checkpoint.*Train first'):
    export.export_inference_model(str(workdir))


def test_corrupted_or_partial_artefact_is_a_clear_error(run, tmp_path):
  src = os.path.join(run[0], 'inference')

  def broken(name, damage):
    path = str(tmp_path / name)
    shutil.copytree(src, path)
    damage(path)
    return path

  cases = {
      'manifest.json is missing': lambda p: os.remove(os.path.join(p, 'manifest.json')),
      'manifest.json is corrupted': lambda p: open(os.path.join(p, 'manifest.json'), 'w').write(
          '{"kind": "cond'
      ),
      'variables/ is missing': lambda p: shutil.rmtree(os.path.join(p, 'variables')),
      'variables/ cannot be read': lambda p: [
          os.remove(os.path.join(r, f))
          for r, _, fs in os.walk(os.path.join(p, 'variables'))
          for f in fs
      ],
  }
  for i, (message, damage) in enumerate(cases.items()):
    with pytest.raises(
        serving.ArtefactError,
        match=f'not a complete inference artefact: {message}' r'.*python -m srigl_jax\.export',
    ):
      serving.load_inference_model(broken(f'c{i}', damage))

  def wrong_shape(p):
    with open(os.path.join(p, 'manifest.json')) as f:
      manifest = json.load(f)
    manifest['variables']['params/head/bias']['shape'] = [11]
    with open(os.path.join(p, 'manifest.json'), 'w') as f:
      json.dump(manifest, f)

  with pytest.raises(serving.ArtefactError, match='do not match the manifest'):
    serving.load_inference_model(broken('shape', wrong_shape))
  with pytest.raises(serving.ArtefactError, match='does not exist'):
    serving.load_inference_model(str(tmp_path / 'nowhere'))

  def newer_format(p):
    with open(os.path.join(p, 'manifest.json')) as f:
      manifest = json.load(f)
    manifest['format_version'] = serving.FORMAT_VERSION + 1
    with open(os.path.join(p, 'manifest.json'), 'w') as f:
      json.dump(manifest, f)

  with pytest.raises(serving.ArtefactError, match='upgrade srigl_jax'):
    serving.load_inference_model(broken('newer', newer_format))


def test_artefact_with_arrays_out_of_range_is_refused_for_every_kernel(run, tmp_path):
  src = os.path.join(run[0], 'inference')
  with open(os.path.join(src, 'manifest.json')) as f:
    plan = json.load(f)['plan']
  layer, entry = next((p, e) for p, e in plan['layers'].items() if e['format'] == 'condensed')

  def rewritten(name, key, edit):
    """A copy of the artefact with one saved array of `layer` edited in place."""
    path = str(tmp_path / name)
    shutil.copytree(src, path)
    vdir = os.path.join(path, 'variables')
    with ocp.StandardCheckpointer() as ckptr:
      variables = jax.tree.map(np.array, ckptr.restore(vdir))
    node = variables['params']
    for k in layer.split('/'):
      node = node[k]
    node[key] = edit(node[key])
    shutil.rmtree(vdir)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(vdir, variables)
    # Checksums that match the edited arrays: only the range checks stand in the way.
    with open(os.path.join(path, 'manifest.json')) as f:
      manifest = json.load(f)
    manifest['integrity'] = artefact.integrity(variables)
    with open(os.path.join(path, 'manifest.json'), 'w') as f:
      json.dump(manifest, f)
    return path

  def set_first(a, v):
    a.flat[0] = v
    return a

  def swap_first_two(a):
    a[[0, 1]] = a[[1, 0]]
    return a

  fan = entry['dense_fan_in']
  cases = {
      rf'indices\[0, 0\] = {fan} is outside \[0, {fan}\)': ('past', 'indices', fan),
      r'indices\[0, 0\] = -1 is outside': ('negative', 'indices', -1),
      r'neuron_ids must be strictly increasing': ('unsorted', 'neuron_ids', None),
  }
  impls = ['xla'] + (['native'] if srigl_jax.condensed.native_available() else [])
  for message, (name, key, value) in cases.items():
    edit = swap_first_two if value is None else lambda a, v=value: set_first(a, v)
    path = rewritten(name, key, edit)
    for impl in impls:
      with pytest.raises(
          serving.ArtefactError,
          match=rf"its variables fail a check: layer '{layer}': {message}.*python -m srigl_jax\.export",
      ):
        serving.load_inference_model(path, impl=impl)


def test_dense_model_exports_a_dense_artefact(run, tmp_path, caplog):
  workdir, _ = run
  config, model, state, _ = export.restore_run(workdir)
  masks = jax.tree.map(lambda _: None, state.params)
  out = str(tmp_path / 'dense')
  dataset = build.build(config).dataset  # The eval data to verify on.
  with caplog.at_level(logging.INFO):
    report = export.export_model(
        model, state.params, {}, masks, config, out, step=20, dataset=dataset, timing_s=0.02
    )
  assert 'nothing to condense' in caplog.text
  assert report['kind'] == 'dense'
  assert report['condensed_accuracy'] == report['masked_accuracy']
  assert summary_line(report).startswith('dense model (nothing to condense)')
  served = serving.load_inference_model(out)
  assert served.kind == 'dense'
  assert {r['format'] for r in served.layers.values()} == {'dense'}
  x = served.preprocess(raw_test_images(3)[0])
  np.testing.assert_allclose(
      np.asarray(served(x)), np.asarray(model.apply({'params': state.params}, x)), atol=1e-5
  )


def test_grouped_run_exports_grouped_layers_and_the_loader_checks_them(run, tmp_path):
  """A run trained with group_size=8: its manifest carries G, the loader rebuilds it."""
  workdir, _ = run
  config, model, state, _ = export.restore_run(workdir)
  config = config.copy_and_resolve_references()
  config.sparsity.group_size = 8
  tx = srigl_jax.srigl(
      optax.sgd(0.1),
      sparsity=0.8,
      stop_step=100,
      group_size=8,
      key=jax.random.key(0),
  )
  masks = srigl_jax.get_masks(tx.init(state.params))
  out = str(tmp_path / 'grouped')
  export.export_model(model, state.params, {}, masks, config, out, step=20)
  with open(os.path.join(out, 'manifest.json')) as f:
    manifest = json.load(f)
  assert manifest['format_version'] == 3 == serving.FORMAT_VERSION
  # 64-wide hidden layers are grouped; the 10-wide head trained ungrouped.
  assert manifest['layers']['dense_0']['group_size'] == 8
  assert manifest['layers']['head']['group_size'] == 1
  assert manifest['plan']['layers']['dense_1']['group_size'] == 8
  assert manifest['variables']['params/dense_0/values']['shape'][2] == 8
  served = serving.load_inference_model(out)
  x = served.preprocess(raw_test_images(5)[0])
  params = srigl_jax.apply_masks(state.params, masks)
  np.testing.assert_allclose(
      np.asarray(served(x)),
      np.asarray(model.apply({'params': params}, x, train=False)),
      atol=1e-4,
      rtol=1e-4,
  )

  # A manifest whose group size does not match the saved arrays is refused,
  # naming the arrays, with the command that writes the artefact again.
  for g, implied in ((4, r'\[\d+\] int32'), (1, 'none')):
    manifest['plan']['layers']['dense_0']['group_size'] = g
    manifest['layers']['dense_0']['group_size'] = g
    with open(os.path.join(out, 'manifest.json'), 'w') as f:
      json.dump(manifest, f)
    with pytest.raises(serving.ArtefactError) as e:
      serving.load_inference_model(out)
    assert e.value.field == 'variables'
    assert re.search(
        r'params/dense_0/group_ids: manifest \[\d+\] int32, implied ' + implied, str(e.value)
    ), str(e.value)
    assert 'python -m srigl_jax.export --workdir=' in str(e.value)
  # The record and the plan disagreeing is refused too.
  manifest['layers']['dense_0']['group_size'] = 8
  with open(os.path.join(out, 'manifest.json'), 'w') as f:
    json.dump(manifest, f)
  with pytest.raises(serving.ArtefactError, match='group_size: is 8 but the plan says 1') as e:
    serving.load_inference_model(out)
  assert e.value.field == 'layers.dense_0.group_size'


def test_differing_predictions_fail_the_export(run, tmp_path, monkeypatch):
  workdir, _ = run
  real = export.condensed.convert_model

  def wrong_head(*args, **kwargs):
    converted = real(*args, **kwargs)
    head = converted.variables['params']['head']
    for key, value in head.items():
      if np.issubdtype(np.asarray(value).dtype, np.floating):
        head[key] = -np.asarray(value)
    return converted

  monkeypatch.setattr(export.condensed, 'convert_model', wrong_head)
  out = str(tmp_path / 'wrong')
  with pytest.raises(
      export.VerificationError, match=r'predictions differ.*No artefact was written'
  ):
    export.export_inference_model(workdir, out)
  assert not os.path.exists(out)


# The top logit of every example, and the runner-up this far below it.
_TOP, _MARGIN = 10.0, 1e-4
# The near-tie tolerance at that scale: 1e-3 of the largest |logit| (float32).
_TOL = 1e-3 * _TOP


def _near_ties(monkeypatch, error):
  """Makes every eval example a near tie, and the converted model flip it by `error`.

  Both models' logits become 0 but for the predicted class (_TOP) and the next
  class (_TOP - _MARGIN); the converted model adds `error` to the runner-up,
  which flips every prediction with a logit error of exactly `error`.
  """
  real = export.apply_fn

  def tie(logits):
    rows = jnp.arange(logits.shape[0])
    top = jnp.argmax(logits, -1)
    runner = (top + 1) % logits.shape[-1]
    out = jnp.zeros_like(logits).at[rows, top].set(_TOP).at[rows, runner].set(_TOP - _MARGIN)
    return out, rows, runner

  def wrong_apply_fn(model, kind, plan, impl):
    fn = real(model, kind, plan, impl)
    if plan is None:  # The masked model.
      return lambda v, x: tie(fn(v, x))[0]

    def converted(v, x):
      out, rows, runner = tie(fn(v, x))
      return out.at[rows, runner].add(error)

    return converted

  monkeypatch.setattr(export, 'apply_fn', wrong_apply_fn)


def test_a_logit_error_above_the_tie_tolerance_fails_the_export(run, tmp_path, monkeypatch):
  _near_ties(monkeypatch, 1.1 * _TOL)
  out = str(tmp_path / 'wrong')
  with pytest.raises(export.VerificationError, match=r'of \d+ eval predictions differ') as e:
    export.export_inference_model(run[0], out, timing_s=0.02)
  assert '|diff| 0.011' in str(e.value)
  assert os.listdir(tmp_path) == ['.wrong.lock']  # No artefact, no temporary folder.


def test_a_flip_within_the_tie_tolerance_is_a_counted_near_tie(run, tmp_path, monkeypatch):
  _near_ties(monkeypatch, 0.9 * _TOL)
  out = str(tmp_path / 'ties')
  report = export.export_inference_model(run[0], out, timing_s=0.02)
  assert report['near_tie_predictions'] == report['eval_examples'] > 0
  assert report['differing_predictions'] == 0
  assert report['max_abs_logit_diff'] == pytest.approx(0.9 * _TOL, rel=1e-3)
  with open(os.path.join(out, 'report.json')) as f:
    assert json.load(f)['near_tie_predictions'] == report['eval_examples']


# ------------------------------------------------------------ 8 devices


_SERVE = """
import json, sys
import jax, numpy as np
import srigl_jax
model = srigl_jax.load_inference_model(sys.argv[1])
raw = np.load(sys.argv[2])
print(json.dumps({'devices': jax.device_count(),
                  'logits': np.asarray(model(model.preprocess(raw))).tolist()}))
"""


def test_eight_device_workdir_exports_and_serves_on_one_device(run, tmp_path, compilation_cache):
  # `run` trained on 8 devices; export from the command line and serve, each
  # in a one-device process of its own.
  workdir, _ = run
  out = str(tmp_path / 'cli')
  done = subprocess.run(
      [
          sys.executable,
          '-m',
          'srigl_jax.export',
          f'--workdir={workdir}',
          f'--out={out}',
          '--timing_s=0.05',
      ],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env=_env(compilation_cache),
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'batch   dense (us)' in done.stdout
  assert done.stdout.strip().splitlines()[-1].startswith('condensed model: ')

  raw, _ = raw_test_images(16)
  np.save(tmp_path / 'raw.npy', raw)
  served = subprocess.run(
      [sys.executable, '-c', _SERVE, out, str(tmp_path / 'raw.npy')],
      cwd=str(tmp_path),
      capture_output=True,
      text=True,
      timeout=300,
      env=_env(compilation_cache),
  )
  assert served.returncode == 0, served.stderr[-3000:]
  result = json.loads(served.stdout.strip().splitlines()[-1])
  assert result['devices'] == 1
  x = serving.apply_preprocessing(
      json.load(open(os.path.join(out, 'manifest.json')))['preprocessing'], raw
  )
  np.testing.assert_allclose(
      np.array(result['logits']), masked_logits(workdir, x), atol=1e-4, rtol=1e-4
  )


def test_failed_export_keeps_the_summary_and_fails_the_run(tmp_path, monkeypatch):
  def broken(*args, **kwargs):
    raise ValueError("convert_model: layer 'dense_0' cannot be followed")

  monkeypatch.setattr(export.condensed, 'convert_model', broken)
  workdir = str(tmp_path / 'wd')
  config = small_config(
      **{
          **EXPORT_OVERRIDES,
          'mesh.data': 1,
          'num_train_steps': 4,
          'eval_every': 4,
          'checkpoint_every': 4,
          'log_every': 4,
          'sparsity.update_every': 2,
          'model.kwargs.hidden_sizes': (16, 16),
      }
  )
  with pytest.raises(ValueError, match="layer 'dense_0' cannot be followed"):
    loop.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['final_step'] == 4 and 'inference' not in summary
  assert not os.path.exists(os.path.join(workdir, 'inference'))


def test_preprocessing_record_replays_the_eval_pipeline():
  # Fashion-MNIST: what the data pipeline feeds the network at eval time.
  from srigl_jax.data import augment  # pylint: disable=g-import-not-at-top

  config = small_config()
  spec = export.preprocessing_spec(config.input)
  assert spec['output_shape'] == [28, 28, 1] and spec['resize'] is None
  raw = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
  np.testing.assert_array_equal(
      serving.apply_preprocessing(spec, raw),
      augment.normalize(raw[..., None], (0.2860,), (0.3530,)),
  )
  # ImageNet-style: images of any size, centre-cropped and resized.
  spec = export.preprocessing_spec(srigl_jax.data.default_input_config('imagenet2012'))
  assert spec['resize'] == 224 and len(spec['mean']) == 3
  images = [np.full((300, 400, 3), 128, np.uint8), np.full((256, 256, 3), 128, np.uint8)]
  out = serving.apply_preprocessing(spec, images)
  assert out.shape == (2, 224, 224, 3) and out.dtype == np.float32
