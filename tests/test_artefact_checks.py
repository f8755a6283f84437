"""What the loader refuses: damaged arrays, and every manifest edit that does not fit the model.

Artefacts here are exported from untrained SRigL models (`test_convert.trained_like`:
masks with ablated neurons and BatchNorm statistics), without verification:
what is under test is the folder and the loader, not training. Every family's
artefact loads and serves the masked model's logits (the loader's model-implied
check accepts what the export writes); each damage and each manifest edit is
refused by `load_inference_model` with an `ArtefactError` naming the array or
the field and the command that rewrites the folder.
"""

import json
import logging
import os
import shutil
import sys

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

import srigl_jax
from srigl_jax import data, export, serving
from srigl_jax.serving import artefact
from srigl_jax.training import build, checkpointing

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable-next=g-import-not-at-top,wrong-import-position
from conftest import load_config
from test_convert import TINY, masked_logits, trained_like  # noqa: E402
from test_train import small_config  # noqa: E402

REWRITE = r'python -m srigl_jax\.export --workdir=\S+ --out='


def family_config(name):
  """The config of a TINY model on synthetic images of its input shape."""
  kwargs, shape, _ = TINY[name]
  config = load_config('fashion_mnist')
  config.model.name = name
  config.model.kwargs = ml_collections.ConfigDict(dict(kwargs))
  config.input = data.default_input_config('synthetic')
  config.input.image_shape = tuple(shape[1:])
  return config


def export_family(name, out, *, ragged=False, dense=False, seed=0):
  """Exports a TINY model (unverified) as of step 3 + seed; returns (model, variables, masks, x)."""
  model, variables, masks, x = trained_like(name, seed=seed)
  if ragged:
    # One extra weight in one neuron: not constant fan-in (as RigL gives),
    # so the export stores the layer structured.
    layer = next(k for k in masks if k != 'head' and masks[k] is not None)
    m = np.asarray(masks[layer]['kernel']).copy()
    flat = m.reshape(-1, m.shape[-1])
    col = np.nonzero(flat.any(0))[0][0]
    flat[np.nonzero(~flat[:, col])[0][0], col] = True
    masks[layer]['kernel'] = flat.reshape(m.shape)
  if dense:
    masks = jax.tree.map(lambda _: None, masks, is_leaf=lambda m: m is None)
  export.export_model(
      model,
      variables['params'],
      variables.get('batch_stats', {}),
      masks,
      family_config(name),
      out,
      step=3 + seed,
      workdir='/runs/' + name,
  )
  return model, variables, masks, x


@pytest.fixture(scope='module')
def mlp(tmp_path_factory):
  """A condensed MLP artefact (never modified: tests copy it)."""
  out = str(tmp_path_factory.mktemp('mlp') / 'inference')
  export_family('mlp', out)
  return out


@pytest.fixture(scope='module')
def cnn(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('cnn') / 'inference')
  export_family('cnn', out)
  return out


def copy(src, tmp_path, name='copy'):
  dst = str(tmp_path / name)
  shutil.copytree(src, dst)
  return dst


def read_manifest(path):
  with open(os.path.join(path, 'manifest.json')) as f:
    return json.load(f)


def write_manifest(path, manifest):
  with open(os.path.join(path, 'manifest.json'), 'w') as f:
    json.dump(manifest, f)


def rewrite_arrays(path, change):
  """Saves the artefact's arrays again after `change(flat dict)`; manifest untouched."""
  vdir = os.path.join(path, 'variables')
  with ocp.StandardCheckpointer() as ckptr:
    tree = jax.tree.map(np.asarray, ckptr.restore(vdir))
  flat = artefact._flatten_paths(tree)  # pylint: disable=protected-access
  change(flat)
  shutil.rmtree(vdir)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(vdir, artefact._unflatten(flat))  # pylint: disable=protected-access


# ------------------------------------------------- what the export writes


# ResNet-50 adds no layer kind to ResNet-18's (convs with folded BatchNorms,
# residual sums); the rest each bring their own (pre-activation BatchNorms,
# attention kernels, depthwise convs and squeeze-excite).
@pytest.mark.parametrize('name', sorted(set(TINY) - {'resnet50'}))
def test_every_family_exports_an_artefact_that_loads_and_serves(name, tmp_path):
  out = str(tmp_path / 'inference')
  model, variables, masks, x = export_family(name, out)
  served = serving.load_inference_model(out, impl='xla')
  want = np.asarray(masked_logits(model, variables, masks, x))
  got = np.asarray(served(np.asarray(x)))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * max(1.0, np.abs(want).max()))
  manifest = served.manifest
  # Version 2: no grouped layers (those need version 3).
  assert manifest['format_version'] == 2 and serving.FORMAT_VERSION == 3
  assert set(manifest['integrity']['arrays']) == set(manifest['variables'])
  with open(os.path.join(out, serving.MARKER_FILE)) as f:
    assert json.load(f)['format_version'] == 2
  if name == 'resnet18':
    assert manifest['plan']['folded_batchnorms'], 'the case of a folded BatchNorm'


@pytest.mark.parametrize('variant', ['structured', 'dense'])
def test_structured_and_dense_artefacts_load_and_serve(variant, tmp_path):
  out = str(tmp_path / 'inference')
  for name in ('cnn', 'mlp'):
    model, variables, masks, x = export_family(
        name, out, ragged=variant == 'structured', dense=variant == 'dense'
    )
    served = serving.load_inference_model(out, impl='xla')
    formats = {r['format'] for r in served.layers.values()}
    assert variant in formats and served.kind == ('dense' if variant == 'dense' else 'condensed')
    want = np.asarray(masked_logits(model, variables, masks, x))
    np.testing.assert_allclose(np.asarray(served(np.asarray(x))), want, rtol=0, atol=1e-4)


def test_a_batch_of_zero_is_an_empty_result(mlp, cnn):
  for path in (mlp, cnn):
    model = serving.load_inference_model(path)
    out = model(np.zeros((0, *model.input_shape), np.float32))
    assert out.shape == (0, model.num_classes) and out.dtype == np.float32
    assert model.predict(np.zeros((0, *model.input_shape), np.uint8)).shape == (0,)


# ------------------------------------------------------- damaged arrays


@pytest.fixture(scope='module')
def wide_mlp(tmp_path_factory):
  """An MLP 784-64-64-10 at init: big enough for orbax to keep its arrays in a data file."""
  config = small_config()
  run = build.build(config, open_dataset=False)
  state = run.init(run.init_key)
  out = str(tmp_path_factory.mktemp('wide') / 'inference')
  export.export_model(
      run.model,
      state.params,
      state.batch_stats,
      srigl_jax.get_masks(state.opt_state),
      config,
      out,
      step=0,
      workdir='/runs/wide',
  )
  return out


def test_flipped_bytes_are_refused_naming_the_array(wide_mlp, tmp_path):
  for i, where in enumerate((0.2, 0.5, 0.8)):
    path = copy(wide_mlp, tmp_path, f'c{i}')
    # Orbax keeps the arrays zstd-compressed in one data file (no checksum
    # of its own): four flipped bytes there decode to other values.
    d = os.path.join(path, 'variables', 'ocdbt.process_0', 'd')
    data_file = max((os.path.join(d, f) for f in os.listdir(d)), key=os.path.getsize)
    raw = bytearray(open(data_file, 'rb').read())
    assert len(raw) > 20000, 'the arrays are not in a data file of their own'
    for k in range(4):
      raw[int(len(raw) * where) + k] ^= 0xFF
    with open(data_file, 'wb') as f:
      f.write(raw)
    with pytest.raises(serving.ArtefactError) as e:
      serving.load_inference_model(path)
    message = str(e.value)
    assert e.value.field.startswith('params/'), message
    assert message.startswith(
        f"{path} is damaged: array '{e.value.field}' does not match its sha256"
    ), message
    assert message.endswith(f'python -m srigl_jax.export --workdir=/runs/wide --out={path}')


def test_a_changed_value_is_refused_naming_the_array(mlp, tmp_path):
  path = copy(mlp, tmp_path)
  # Finite, plausible, and wrong: only the checksum can tell.
  rewrite_arrays(path, lambda flat: flat['params/dense_1/values'].__setitem__((0, 0), 0.5))
  with pytest.raises(
      serving.ArtefactError,
      match=r"is damaged: array 'params/dense_1/values' does not match its sha256.*" + REWRITE,
  ):
    serving.load_inference_model(path)


def test_nan_and_inf_are_refused_even_with_matching_checksums(mlp, tmp_path):
  for i, bad in enumerate((np.nan, np.inf)):
    path = copy(mlp, tmp_path, f'c{i}')

    def poison(flat, bad=bad):
      flat['params/head/values'][0, 0] = bad

    rewrite_arrays(path, poison)
    manifest = read_manifest(path)
    with ocp.StandardCheckpointer() as ckptr:
      manifest['integrity'] = artefact.integrity(ckptr.restore(os.path.join(path, 'variables')))
    write_manifest(path, manifest)
    with pytest.raises(
        serving.ArtefactError,
        match=r"is damaged: array 'params/head/values' holds 1 non-finite values.*" + REWRITE,
    ):
      serving.load_inference_model(path)


def test_indices_outside_the_layer_are_refused(mlp, tmp_path):
  path = copy(mlp, tmp_path)

  def out_of_range(flat):
    flat['params/dense_0/indices'][0, 0] = 5000

  rewrite_arrays(path, out_of_range)
  manifest = read_manifest(path)
  with ocp.StandardCheckpointer() as ckptr:
    manifest['integrity'] = artefact.integrity(ckptr.restore(os.path.join(path, 'variables')))
  write_manifest(path, manifest)
  with pytest.raises(
      serving.ArtefactError,
      match=r"its variables fail a check: layer 'dense_0': indices\[0, 0\] = 5000 is outside \[0, 36\).*"
      + REWRITE,
  ):
    serving.load_inference_model(path)


def test_edited_checksums_are_refused(mlp, tmp_path):
  path = copy(mlp, tmp_path)
  manifest = read_manifest(path)
  manifest['integrity']['all'] = '0' * 64
  write_manifest(path, manifest)
  with pytest.raises(serving.ArtefactError, match=r'integrity\.all: is not the digest') as e:
    serving.load_inference_model(path)
  assert e.value.field == 'integrity.all'


# ------------------------------------------------------------ format 1


def as_format_1(path):
  """What the format-1 export wrote: no marker, no checksums."""
  manifest = read_manifest(path)
  manifest['format_version'] = 1
  del manifest['integrity']
  write_manifest(path, manifest)
  os.remove(os.path.join(path, serving.MARKER_FILE))


def test_format_1_loads_with_every_other_check_and_a_warning(mlp, tmp_path, caplog):
  path = copy(mlp, tmp_path)
  as_format_1(path)
  with caplog.at_level(logging.WARNING):
    old = serving.load_inference_model(path)
  assert 'format version 1, without checksums' in caplog.text
  assert f'Rewrite it: python -m srigl_jax.export --workdir=/runs/mlp --out={path}' in caplog.text
  x = np.random.default_rng(0).standard_normal((2, *old.input_shape)).astype(np.float32)
  np.testing.assert_array_equal(
      np.asarray(old(x)), np.asarray(serving.load_inference_model(mlp)(x))
  )
  # NaN in a format-1 artefact (no checksum to catch it) is still refused.
  rewrite_arrays(path, lambda flat: flat['params/head/bias'].__setitem__(3, np.nan))
  with pytest.raises(serving.ArtefactError, match="array 'params/head/bias' holds 1 non-finite"):
    serving.load_inference_model(path)
  # And so are its manifest edits.
  path = copy(mlp, tmp_path, 'edited')
  as_format_1(path)
  manifest = read_manifest(path)
  manifest['kind'] = 'sparse'
  write_manifest(path, manifest)
  with pytest.raises(serving.ArtefactError, match='kind: must be one of'):
    serving.load_inference_model(path)
  # A format-1 folder with format-2 fields is not format 1.
  path = copy(mlp, tmp_path, 'mixed')
  manifest = read_manifest(path)
  manifest['format_version'] = 1
  write_manifest(path, manifest)
  with pytest.raises(serving.ArtefactError, match=r"has unknown fields \['integrity'\]"):
    serving.load_inference_model(path)


# ------------------------------------------------------- manifest edits


def _fingerprint_too(m, key, value):
  m['source']['fingerprint']['fields'][key] = value


def _set(*keys):
  """An edit that sets manifest[keys[0]]...[keys[-2]] = keys[-1]."""

  def edit(m):
    node = m
    for k in keys[:-2]:
      node = node[k]
    node[keys[-2]] = keys[-1]

  return edit


def _delete(*keys):
  def edit(m):
    node = m
    for k in keys[:-1]:
      node = node[k]
    del node[keys[-1]]

  return edit


def _other_hidden_size(m):
  m['model']['kwargs']['hidden_sizes'] = [24, 17]
  _fingerprint_too(m, 'model.kwargs', m['model']['kwargs'])


def _unknown_kwarg(m):
  m['model']['kwargs']['widht'] = 3
  _fingerprint_too(m, 'model.kwargs', m['model']['kwargs'])


def _kwarg_of_wrong_type(m):
  m['model']['kwargs']['hidden_sizes'] = 'wide'
  _fingerprint_too(m, 'model.kwargs', m['model']['kwargs'])


def _other_input_shape(m):
  for rec in (m['input'], m['plan']):
    key = 'shape' if rec is m['input'] else 'input_shape'
    rec[key] = [6, 6, 2]
  m['preprocessing']['output_shape'] = [6, 6, 2]
  m['preprocessing']['mean'] = m['preprocessing']['mean'] * 2
  m['preprocessing']['std'] = m['preprocessing']['std'] * 2


def _fewer_active_neurons(m):
  # Plan and records agree with each other but not with the saved arrays.
  for rec in (m['plan']['layers']['dense_0'], m['layers']['dense_0']):
    rec['active_neurons'] -= 1


def _other_fan_in(m):
  for rec in (m['plan']['layers']['dense_1'], m['layers']['dense_1']):
    rec['fan_in'] += 1


def _layer_record_of_no_layer(m):
  m['layers']['dense_9'] = dict(m['layers']['head'], format='dense')


# (edit, the field the error names, a piece of the message)
MLP_EDITS = {
    'unknown kind': (_set('kind', 'sparse'), 'kind', "must be one of ['condensed', 'dense']"),
    'dense kind of a condensed plan': (_set('kind', 'dense'), 'plan', 'has unknown fields'),
    'unknown model': (_set('model', 'name', 'mlp2'), 'model.name', 'must be one of'),
    'other hidden size (fingerprint kept)': (
        _set('model', 'kwargs', 'hidden_sizes', [24, 17]),
        'model.kwargs',
        "the run's fingerprint says",
    ),
    'other hidden size': (
        _other_hidden_size,
        'plan.layers.dense_1.out_shape',
        'is [16] but the kernel [24, 17] says [17]',
    ),
    'unknown kwarg': (_unknown_kwarg, 'model.kwargs', "unexpected keyword argument 'widht'"),
    'kwarg of the wrong type': (_kwarg_of_wrong_type, 'model', 'cannot take input.shape'),
    'dtype in kwargs': (
        _set('model', 'kwargs', 'dtype', 'float32'),
        'model.kwargs',
        "sets 'dtype'",
    ),
    'wrong num_classes': (
        _set('model', 'num_classes', 11),
        'plan.layers.head.out_shape',
        'is [10] but the kernel [16, 11] says [11]',
    ),
    'num_classes as text': (_set('model', 'num_classes', '10'), 'model.num_classes', 'integer'),
    'unknown dtype': (_set('model', 'dtype', 'float16'), 'model.dtype', 'must be one of'),
    'other dtype than the run': (_set('model', 'dtype', 'bfloat16'), 'model.dtype', 'fingerprint'),
    'input of rank 2': (_set('input', 'shape', [6, 6]), 'input.shape', 'a list of 3'),
    'input shape unlike the preprocessing': (
        _set('input', 'shape', [6, 6, 2]),
        'preprocessing.output_shape',
        'but input.shape is [6, 6, 2]',
    ),
    'other input shape throughout': (
        _other_input_shape,
        'plan.layers.dense_0.in_shape',
        'the kernel [72, 24] says [72]',
    ),
    'uint8 input': (_set('input', 'dtype', 'uint8'), 'input.dtype', "must be one of ['float32']"),
    'missing plan': (_delete('plan'), 'manifest', "lacks ['plan']"),
    'missing model.dtype': (_delete('model', 'dtype'), 'model', "lacks ['dtype']"),
    'extra top-level field': (_set('comment', 'hi'), 'manifest', "unknown fields ['comment']"),
    'extra layer field': (_set('layers', 'head', 'sparsity', 0), 'layers.head', 'unknown fields'),
    'format_version as text': (_set('format_version', '2'), 'format_version', 'integer >= 1'),
    'neurons as text': (_set('layers', 'head', 'neurons', '10'), 'layers.head.neurons', 'integer'),
    'density above 1': (
        _set('layers', 'head', 'density', 1.5),
        'layers.head.density',
        '[0.0, 1.0]',
    ),
    'record unlike the plan': (
        _set('layers', 'dense_0', 'fan_in', 3),
        'layers.dense_0.fan_in',
        'but the plan says',
    ),
    'fewer active neurons': (_fewer_active_neurons, 'variables', 'do not match what model'),
    'other fan-in': (_other_fan_in, 'variables', 'params/dense_1/indices'),
    'record of no layer': (_layer_record_of_no_layer, 'layers', "not its layers: ['dense_9']"),
    'plan layer that is not converted': (
        _delete('plan', 'layers', 'head'),
        'layers.head.format',
        'the plan does not convert it',
    ),
    'batchnorm not folded': (
        _set('plan', 'layers', 'dense_0', 'batchnorm', 'bn_0'),
        'plan.layers.dense_0.batchnorm',
        'not in plan.folded_batchnorms',
    ),
    'bias map on a dense layer': (
        _set('plan', 'layers', 'dense_0', 'bias_map', True),
        'plan.layers.dense_0.bias_map',
        'only a convolution',
    ),
    'mean of the wrong length': (
        _set('preprocessing', 'mean', [0.1, 0.2]),
        'preprocessing.mean',
        'one number per channel (1)',
    ),
    'std of zero': (_set('preprocessing', 'std', [0.0]), 'preprocessing.std[0]', 'must be in'),
    'mean of text': (
        _set('preprocessing', 'mean', ['a']),
        'preprocessing.mean[0]',
        'finite number',
    ),
    'raw float images': (
        _set('preprocessing', 'raw_dtype', 'float32'),
        'preprocessing.raw_dtype',
        '',
    ),
    'resize unlike the output': (_set('preprocessing', 'resize', 32), 'preprocessing.resize', ''),
    'other dataset than the run': (
        _set('preprocessing', 'dataset', 'mnist'),
        'preprocessing.dataset',
        'fingerprint',
    ),
    'negative step': (_set('source', 'checkpoint_step', -1), 'source.checkpoint_step', '>= 0'),
    'variables of another dtype': (
        _set('variables', 'params/head/values', 'dtype', 'float64'),
        None,  # The saved arrays disagree first ('not a complete inference artefact').
        'do not match the manifest',
    ),
    'checksum list without an array': (
        _delete('integrity', 'arrays', 'params/head/bias'),
        'integrity.arrays',
        'does not list',
    ),
    'checksum that is no digest': (
        _set('integrity', 'arrays', 'params/head/bias', 'abc'),
        'integrity.arrays.params/head/bias',
        'not a sha256',
    ),
    'plan of another version': (_set('plan', 'version', 2), 'plan.version', 'must be one of [1]'),
    'layers of the plan dropped': (_delete('layers', 'dense_0'), 'layers', "lacks 'dense_0'"),
}


@pytest.mark.parametrize('case', sorted(MLP_EDITS))
def test_manifest_edit_is_refused_at_load(case, mlp, tmp_path):
  edit, field, message = MLP_EDITS[case]
  path = copy(mlp, tmp_path)
  manifest = read_manifest(path)
  edit(manifest)
  write_manifest(path, manifest)
  with pytest.raises(serving.ArtefactError) as e:
    serving.load_inference_model(path)
  text = str(e.value)
  assert e.value.field == field, text
  assert message in text, text
  assert f'python -m srigl_jax.export --workdir=/runs/mlp --out={path}' in text, text


def _conv_taps_of_another_dtype(m):
  m['variables']['params/conv_1/taps']['dtype'] = 'int32'


CNN_EDITS = {
    'conv with other neurons': (
        _set('plan', 'layers', 'conv_1', 'neurons', 9),
        'layers.conv_1.neurons',
        'but the plan says 9',
    ),
    'conv plan with an in_shape': (
        _set('plan', 'layers', 'conv_1', 'in_shape', [54]),
        'plan.layers.conv_1',
        "no 'in_shape'",
    ),
    'conv kernel of another size': (
        _set('model', 'kwargs', 'features', [6, 9]),
        'model.kwargs',
        'fingerprint',
    ),
}


@pytest.mark.parametrize('case', sorted(CNN_EDITS))
def test_conv_manifest_edit_is_refused_at_load(case, cnn, tmp_path):
  edit, field, message = CNN_EDITS[case]
  path = copy(cnn, tmp_path)
  manifest = read_manifest(path)
  edit(manifest)
  write_manifest(path, manifest)
  with pytest.raises(serving.ArtefactError) as e:
    serving.load_inference_model(path)
  assert e.value.field == field and message in str(e.value), str(e.value)


def test_an_unknown_impl_is_refused_before_loading(mlp):
  with pytest.raises(ValueError, match='impl must be one of'):
    serving.load_inference_model(mlp, impl='fast')


def test_the_export_refuses_non_finite_params(tmp_path):
  model, variables, masks, _ = trained_like('mlp')
  params = jax.tree.map(np.array, variables['params'])
  params['dense_1']['bias'][2] = np.nan
  out = str(tmp_path / 'inference')
  with pytest.raises(
      export.ExportError,
      match=r"step 3 holds 1 non-finite values \(NaN or inf\) in 'params/dense_1/bias'.*none was",
  ):
    export.export_model(model, params, {}, masks, family_config('mlp'), out, step=3)
  assert os.listdir(tmp_path) == ['.inference.lock']


def test_a_damaged_fingerprint_file_is_named_and_replaced(tmp_path, caplog):
  (tmp_path / 'fingerprint.json').write_text('{"model.name": ')
  config = family_config('mlp')
  with caplog.at_level(logging.WARNING):
    fp = export._fingerprint(str(tmp_path), config)  # pylint: disable=protected-access
  # No checkpoint carries one here: the config's own fingerprint stands in.
  assert fp['fields'] == checkpointing.fingerprint(config)
  assert f"{tmp_path / 'fingerprint.json'} is damaged (not valid JSON" in caplog.text
