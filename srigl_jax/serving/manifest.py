"""What an artefact's manifest must say, checked before anything is built or called.

`check_manifest` checks every field of a parsed manifest.json on its own and
against the others: types, ranges, the model registry's names, the
preprocessing record, the converter's plan against the per-layer records.
`expected_variables` then builds the model and says which arrays (path,
shape, dtype) the model and the plan imply: `jax.eval_shape` of the model's
init, with every converted layer's kernel replaced by the arrays its plan
entry describes and every folded BatchNorm removed. The loader compares that
with the manifest's 'variables' and those with the saved arrays.

Every refusal is a `ManifestError` naming the field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from srigl_jax import models
from srigl_jax.condensed import index_dtype_for
from srigl_jax.condensed.convert.analysis import module_path

KINDS = ('condensed', 'dense')
DTYPES = ('float32', 'bfloat16')  # model.dtype: the compute dtype.
LAYER_KINDS = ('dense', 'conv')
PLAN_FORMATS = ('condensed', 'structured')
LAYER_FORMATS = PLAN_FORMATS + ('dense',)
_PLAN_VERSION = 1
_TOP = (
    'format_version',
    'kind',
    'srigl_jax_version',
    'model',
    'input',
    'preprocessing',
    'layers',
    'plan',
    'source',
    'variables',
)
# Format 2 adds the checksums of the saved arrays.
_TOP_2 = _TOP + ('integrity',)
_RECORD = ('format', 'kind', 'density', 'neurons', 'active_neurons', 'fan_in')
# Format 3 adds group_size (group-shared fan-in) to layer records and plan
# entries; absent, it is 1.
_GROUP_SIZE = 'group_size'
_PLAN_ENTRY = (
    'kind',
    'neurons',
    'active_neurons',
    'dense_fan_in',
    'density',
    'folded_inputs',
    'batchnorm',
    'bias_map',
    'format',
    'fan_in',
)
_SHA256 = re.compile(r'[0-9a-f]{64}')


class ManifestError(ValueError):
  """A manifest field is missing, of the wrong type, or inconsistent.

  Attributes:
    field: the dotted field (e.g. 'model.kwargs', 'plan.layers.dense_0').
    why: what is wrong with it.
  """

  def __init__(self, field: str, why: str):
    super().__init__(f'{field}: {why}')
    self.field = field
    self.why = why

  def __reduce__(self):
    return type(self), (self.field, self.why)


# ------------------------------------------------------------ value checks


def _show(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + '...'


def _object(value, field: str, required: Sequence[str], optional: Sequence[str] = ()) -> dict:
  if not isinstance(value, dict):
    raise ManifestError(field, f'must be an object, got {_show(value)}')
  missing = [k for k in required if k not in value]
  if missing:
    raise ManifestError(field, f'lacks {missing}')
  extra = sorted(set(value) - set(required) - set(optional))
  if extra:
    raise ManifestError(field, f'has unknown fields {extra}')
  return value


def _mapping(value, field: str) -> dict:
  if not isinstance(value, dict):
    raise ManifestError(field, f'must be an object, got {_show(value)}')
  return value


def _int(value, field: str, lo: int = 0, hi: int | None = None) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise ManifestError(field, f'must be an integer, got {_show(value)}')
  if value < lo or (hi is not None and value > hi):
    bound = f'>= {lo}' if hi is None else f'in [{lo}, {hi}]'
    raise ManifestError(field, f'must be {bound}, got {value}')
  return value


def _number(value, field: str, lo: float | None = None, hi: float | None = None) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ManifestError(field, f'must be a finite number, got {_show(value)}')
  if (lo is not None and value < lo) or (hi is not None and value > hi):
    raise ManifestError(field, f'must be in [{lo}, {hi}], got {value}')
  return float(value)


def _str(value, field: str) -> str:
  if not isinstance(value, str):
    raise ManifestError(field, f'must be a string, got {_show(value)}')
  return value


def _choice(value, field: str, choices: Sequence[Any]):
  if isinstance(value, bool) or value not in choices:
    raise ManifestError(field, f'must be one of {list(choices)}, got {_show(value)}')
  return value


def _bool(value, field: str) -> bool:
  if not isinstance(value, bool):
    raise ManifestError(field, f'must be true or false, got {_show(value)}')
  return value


def _shape(value, field: str, rank: int | None = None, lo: int = 1) -> list[int]:
  if not isinstance(value, list) or (rank is not None and len(value) != rank):
    want = 'a list' if rank is None else f'a list of {rank}'
    raise ManifestError(field, f'must be {want} of integers, got {_show(value)}')
  for i, d in enumerate(value):
    _int(d, f'{field}[{i}]', lo)
  return value


def _dtype(value, field: str) -> np.dtype:
  _str(value, field)
  try:
    return jnp.dtype(value)
  except (TypeError, ValueError):
    raise ManifestError(field, f'is not a dtype: {_show(value)}') from None


# --------------------------------------------------------- the manifest


def check_manifest(manifest: Any) -> None:
  """Checks every field of a parsed manifest.json (format 1, 2 or 3), without the model.

  Args:
    manifest: the parsed JSON; its 'format_version' (an integer in [1, 3])
      is checked by the caller, before this.

  Raises:
    ManifestError: naming the first field at fault.
  """
  _object(manifest, 'manifest', _TOP_2 if manifest.get('format_version', 1) >= 2 else _TOP)
  kind = _choice(manifest['kind'], 'kind', KINDS)
  _str(manifest['srigl_jax_version'], 'srigl_jax_version')
  model = _object(manifest['model'], 'model', ('name', 'num_classes', 'dtype', 'kwargs'))
  _choice(model['name'], 'model.name', models.MODEL_NAMES)
  _int(model['num_classes'], 'model.num_classes', 1)
  _choice(model['dtype'], 'model.dtype', DTYPES)
  _mapping(model['kwargs'], 'model.kwargs')
  for key in ('num_classes', 'dtype'):
    if key in model['kwargs']:
      raise ManifestError('model.kwargs', f"sets {key!r}, which is model.{key}'s")
  inp = _object(manifest['input'], 'input', ('shape', 'dtype'))
  shape = _shape(inp['shape'], 'input.shape', rank=3)
  _choice(inp['dtype'], 'input.dtype', ('float32',))
  _check_preprocessing(manifest['preprocessing'], shape)
  layers = _mapping(manifest['layers'], 'layers')
  if not layers:
    raise ManifestError('layers', 'is empty: a model has at least its head')
  for path, record in layers.items():
    _check_record(record, f'layers.{path}')
  if kind == 'dense':
    plan = _object(manifest['plan'], 'plan', ('layers',))
    if plan['layers'] != layers:
      raise ManifestError(
          'plan.layers', 'differs from layers (a dense artefact lists its kernels in both)'
      )
  else:
    _check_plan(manifest['plan'], shape, layers)
  _check_source(manifest['source'], model, manifest['preprocessing'])
  variables = _mapping(manifest['variables'], 'variables')
  if not variables:
    raise ManifestError('variables', 'is empty')
  for path, rec in variables.items():
    rec = _object(rec, f'variables.{path}', ('shape', 'dtype'))
    _shape(rec['shape'], f'variables.{path}.shape', lo=0)
    _dtype(rec['dtype'], f'variables.{path}.dtype')
  if 'integrity' in manifest:
    _check_integrity(manifest['integrity'], variables)


def _check_preprocessing(record, input_shape: list[int]) -> None:
  field = 'preprocessing'
  record = _object(record, field, ('dataset', 'raw_dtype', 'resize', 'mean', 'std', 'output_shape'))
  _str(record['dataset'], f'{field}.dataset')
  _choice(record['raw_dtype'], f'{field}.raw_dtype', ('uint8',))
  out = _shape(record['output_shape'], f'{field}.output_shape', rank=3)
  if out != input_shape:
    raise ManifestError(f'{field}.output_shape', f'is {out} but input.shape is {input_shape}')
  if record['resize'] is not None:
    size = _int(record['resize'], f'{field}.resize', 1)
    if out[:2] != [size, size]:
      raise ManifestError(f'{field}.resize', f'is {size} but output_shape is {out}')
  channels = out[-1]
  for key, lo in (('mean', None), ('std', 1e-12)):
    values = record[key]
    if not isinstance(values, list) or len(values) != channels:
      raise ManifestError(
          f'{field}.{key}', f'must hold one number per channel ({channels}), got {_show(values)}'
      )
    for i, v in enumerate(values):
      _number(v, f'{field}.{key}[{i}]', lo=lo)


def _check_group_size(record, field: str, neurons: int, active: int) -> int:
  """The record's group size (1 when absent), which must divide both neuron counts."""
  if _GROUP_SIZE not in record:
    return 1
  g = _int(record[_GROUP_SIZE], f'{field}.{_GROUP_SIZE}', 1)
  if neurons % g or active % g:
    raise ManifestError(
        f'{field}.{_GROUP_SIZE}',
        f'is {g} but does not divide neurons={neurons} and active_neurons={active}',
    )
  if g > 1 and record['format'] != 'condensed':
    raise ManifestError(f'{field}.{_GROUP_SIZE}', f"is {g} for a {record['format']!r} layer")
  return g


def _check_record(record, field: str) -> None:
  record = _object(record, field, _RECORD, (_GROUP_SIZE,))
  _choice(record['format'], f'{field}.format', LAYER_FORMATS)
  _choice(record['kind'], f'{field}.kind', LAYER_KINDS)
  _number(record['density'], f'{field}.density', 0.0, 1.0)
  neurons = _int(record['neurons'], f'{field}.neurons', 1)
  active = _int(record['active_neurons'], f'{field}.active_neurons', 0, neurons)
  _int(record['fan_in'], f'{field}.fan_in', 0)
  _check_group_size(record, field, neurons, active)


def _check_plan(plan, input_shape: list[int], layers: Mapping[str, Any]) -> None:
  plan = _object(plan, 'plan', ('version', 'format', 'input_shape', 'layers', 'folded_batchnorms'))
  _choice(plan['version'], 'plan.version', (_PLAN_VERSION,))
  plan_format = _choice(plan['format'], 'plan.format', PLAN_FORMATS)
  if _shape(plan['input_shape'], 'plan.input_shape', rank=3) != input_shape:
    raise ManifestError(
        'plan.input_shape', f"is {plan['input_shape']} but input.shape is {input_shape}"
    )
  entries = _mapping(plan['layers'], 'plan.layers')
  folded = _mapping(plan['folded_batchnorms'], 'plan.folded_batchnorms')
  for path, entry in entries.items():
    field = f'plan.layers.{path}'
    optional = ('in_shape', 'out_shape', 'input_hw', _GROUP_SIZE)
    entry = _object(entry, field, _PLAN_ENTRY, optional)
    kind = _choice(entry['kind'], f'{field}.kind', LAYER_KINDS)
    neurons = _int(entry['neurons'], f'{field}.neurons', 1)
    active = _int(entry['active_neurons'], f'{field}.active_neurons', 0, neurons)
    fan = _int(entry['dense_fan_in'], f'{field}.dense_fan_in', 1)
    _int(entry['fan_in'], f'{field}.fan_in', 0, fan)
    _int(entry['folded_inputs'], f'{field}.folded_inputs', 0, fan)
    _number(entry['density'], f'{field}.density', 0.0, 1.0)
    fmt = _choice(entry['format'], f'{field}.format', PLAN_FORMATS)
    if plan_format == 'structured' and fmt != 'structured':
      raise ManifestError(f'{field}.format', f'is {fmt!r} in a structured plan')
    _check_group_size(entry, field, neurons, active)
    if entry['batchnorm'] is not None:
      bn = _str(entry['batchnorm'], f'{field}.batchnorm')
      if folded.get(bn) != path:
        raise ManifestError(f'{field}.batchnorm', f'{bn!r} is not in plan.folded_batchnorms')
    if _bool(entry['bias_map'], f'{field}.bias_map'):
      if kind != 'conv':
        raise ManifestError(f'{field}.bias_map', 'only a convolution has a per-position bias')
      if 'input_hw' not in entry:
        raise ManifestError(field, "has a bias map but no 'input_hw'")
      _shape(entry['input_hw'], f'{field}.input_hw', rank=2)
    elif 'input_hw' in entry:
      raise ManifestError(f'{field}.input_hw', 'is set without a bias map')
    if kind == 'dense':
      for key in ('in_shape', 'out_shape'):
        if key not in entry:
          raise ManifestError(field, f'lacks {key!r} (a dense layer)')
      if math.prod(_shape(entry['in_shape'], f'{field}.in_shape')) != fan:
        raise ManifestError(
            f'{field}.in_shape', f"{entry['in_shape']} does not hold dense_fan_in={fan} inputs"
        )
      if math.prod(_shape(entry['out_shape'], f'{field}.out_shape')) != neurons:
        raise ManifestError(
            f'{field}.out_shape', f"{entry['out_shape']} does not hold neurons={neurons}"
        )
    elif 'in_shape' in entry or 'out_shape' in entry:
      raise ManifestError(field, "a convolution has no 'in_shape' / 'out_shape'")
    # The per-layer record repeats the plan's numbers.
    record = layers.get(path)
    if record is None:
      raise ManifestError('layers', f'lacks {path!r}, a layer of the plan')
    for key in _RECORD + (_GROUP_SIZE,):
      if record.get(key, 1) != entry.get(key, 1):
        raise ManifestError(
            f'layers.{path}.{key}', f'is {_show(record[key])} but the plan says {_show(entry[key])}'
        )
  for bn, src in folded.items():
    _str(src, f'plan.folded_batchnorms.{bn}')
    if src not in entries or entries[src]['batchnorm'] != bn:
      raise ManifestError(
          f'plan.folded_batchnorms.{bn}', f'names {src!r}, whose plan entry does not fold it'
      )
  for path, record in layers.items():
    if path not in entries and record['format'] != 'dense':
      raise ManifestError(
          f'layers.{path}.format', f"is {record['format']!r} but the plan does not convert it"
      )


def _check_source(source, model: Mapping[str, Any], preprocessing: Mapping[str, Any]) -> None:
  source = _object(source, 'source', ('workdir', 'checkpoint_step', 'fingerprint'))
  if source['workdir'] is not None:
    _str(source['workdir'], 'source.workdir')
  _int(source['checkpoint_step'], 'source.checkpoint_step', 0)
  fp = _object(source['fingerprint'], 'source.fingerprint', ('fields', 'sha256'))
  fields = _mapping(fp['fields'], 'source.fingerprint.fields')
  _str(fp['sha256'], 'source.fingerprint.sha256')
  # The run's own record of its model: the model fields must agree with it.
  for key, value in (
      ('model.name', model['name']),
      ('model.dtype', model['dtype']),
      ('model.kwargs', model['kwargs']),
      ('input.name', preprocessing['dataset']),
  ):
    if key in fields and fields[key] != value:
      field = 'preprocessing.dataset' if key == 'input.name' else key
      raise ManifestError(
          field, f"is {_show(value)} but the run's fingerprint says {_show(fields[key])}"
      )


def _check_integrity(record, variables: Mapping[str, Any]) -> None:
  record = _object(record, 'integrity', ('algorithm', 'arrays', 'all'))
  _choice(record['algorithm'], 'integrity.algorithm', ('sha256',))
  arrays = _mapping(record['arrays'], 'integrity.arrays')
  if set(arrays) != set(variables):
    diff = sorted(set(arrays) ^ set(variables))
    raise ManifestError(
        'integrity.arrays', f'does not list the arrays of variables (e.g. {diff[:3]})'
    )
  for path, digest in list(arrays.items()) + [('all', record['all'])]:
    if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
      raise ManifestError(f'integrity.arrays.{path}', f'is not a sha256 digest: {_show(digest)}')


# ------------------------------------------------------ model and plan


def build_model(manifest: Mapping[str, Any]) -> nn.Module:
  """The manifest's model from the registry (after `check_manifest`).

  Raises:
    ManifestError: the kwargs are not the model's.
  """
  m = manifest['model']
  try:
    return models.get_model(
        m['name'], m['num_classes'], dtype=jnp.dtype(m['dtype']), **_tuples(m['kwargs'])
    )
  except (TypeError, ValueError) as e:
    raise ManifestError('model.kwargs', f'do not build {m["name"]!r} ({e})') from None


def _tuples(value):
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def _abstract_init(model: nn.Module, input_shape: Sequence[int]):
  """(logits, variables, {module path: (module, input shape, output shape)}), all abstract."""
  calls = {}

  def record(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if context.method_name == '__call__' and args and hasattr(y, 'shape'):
      calls.setdefault(
          module_path(context.module), (context.module, tuple(args[0].shape), tuple(y.shape))
      )
    return y

  def init(key):
    x = jnp.zeros((1, *input_shape), jnp.float32)
    with nn.intercept_methods(record):
      return model.init_with_output({'params': key, 'dropout': key}, x, train=False)

  logits, variables = jax.eval_shape(init, jax.random.key(0))
  return logits, variables, calls


def _flat(tree) -> dict[str, dict[str, Any]]:
  out = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    path = '/'.join(str(getattr(k, 'key', k)) for k in kp)
    out[path] = {'shape': [int(d) for d in leaf.shape], 'dtype': str(jnp.dtype(leaf.dtype))}
  return out


def _spec(shape, dtype) -> dict[str, Any]:
  return {'shape': [int(d) for d in shape], 'dtype': str(jnp.dtype(dtype))}


def expected_variables(manifest: Mapping[str, Any], model: nn.Module) -> dict[str, dict[str, Any]]:
  """The arrays (path -> {'shape', 'dtype'}) that the model and the plan imply.

  Also checks the layer records and the plan against the model's own layers.

  Args:
    manifest: a manifest that passed `check_manifest`.
    model: `build_model(manifest)`.

  Returns:
    The manifest's 'variables' as a correct export writes them.

  Raises:
    ManifestError: the model cannot be initialised on the input shape, or the
      records, the plan or the number of classes do not fit the model.
  """
  name = manifest['model']['name']
  shape = manifest['input']['shape']
  try:
    logits, variables, calls = _abstract_init(model, shape)
  except Exception as e:  # pylint: disable=broad-except
    # Flax and jax raise many kinds of error for kwargs or input shapes a
    # model cannot take; all of them mean the same here.
    raise ManifestError(
        'model',
        f'{name!r} with these kwargs cannot take input.shape {shape} '
        f'({type(e).__name__}: {str(e)[:300]})',
    ) from None
  num_classes = manifest['model']['num_classes']
  if tuple(logits.shape) != (1, num_classes):
    raise ManifestError(
        'model.num_classes', f'is {num_classes} but the model outputs {tuple(logits.shape)}'
    )
  flat = {p: s for p, s in _flat(variables).items() if p.split('/')[0] in ('params', 'batch_stats')}
  kernels = {
      p[len('params/') : -len('/kernel')]: s['shape']
      for p, s in flat.items()
      if p.startswith('params/') and p.endswith('/kernel') and len(s['shape']) >= 2
  }
  layers = manifest['layers']
  if set(layers) != set(kernels):
    extra, missing = sorted(set(layers) - set(kernels)), sorted(set(kernels) - set(layers))
    raise ManifestError(
        'layers',
        f'do not list the kernels of model {name!r} (not its layers: {extra[:3]}, '
        f'missing: {missing[:3]})',
    )
  plan_layers = manifest['plan']['layers'] if manifest['kind'] == 'condensed' else {}
  for path, kshape in kernels.items():
    if path in plan_layers:
      continue
    want = {
        'format': 'dense',
        'kind': 'dense' if len(kshape) == 2 else 'conv',
        'neurons': kshape[-1],
        'active_neurons': kshape[-1],
        'fan_in': math.prod(kshape[:-1]),
    }
    for key, value in want.items():
      if layers[path][key] != value:
        raise ManifestError(
            f'layers.{path}.{key}',
            f'is {_show(layers[path][key])} but the kernel {kshape} says {value!r}',
        )
  if manifest['kind'] == 'dense':
    return flat
  for bn, _ in manifest['plan']['folded_batchnorms'].items():
    call = calls.get(bn)
    if call is None or not isinstance(call[0], nn.BatchNorm):
      raise ManifestError('plan.folded_batchnorms', f'{bn!r} is not a BatchNorm of model {name!r}')
    for collection in ('params', 'batch_stats'):
      for p in [p for p in flat if p.startswith(f'{collection}/{bn}/')]:
        del flat[p]
  for path, entry in plan_layers.items():
    flat.update(_converted_arrays(path, entry, kernels[path], calls.get(path), flat))
  return flat


def _converted_arrays(path: str, entry, kernel_shape, call, flat) -> dict[str, dict[str, Any]]:
  """The arrays of one converted layer; removes its kernel and bias from `flat`."""
  field = f'plan.layers.{path}'
  neurons, active, fan = entry['neurons'], entry['active_neurons'], entry['dense_fan_in']
  if entry['kind'] == 'conv':
    if len(kernel_shape) != 4:
      raise ManifestError(f'{field}.kind', f'is conv but the kernel has shape {kernel_shape}')
    implied = {'neurons': kernel_shape[-1], 'dense_fan_in': math.prod(kernel_shape[:-1])}
  else:
    implied = {
        'in_shape': kernel_shape[: len(entry['in_shape'])],
        'out_shape': kernel_shape[len(entry['in_shape']) :],
    }
  for key, value in implied.items():
    if entry[key] != value:
      raise ManifestError(
          f'{field}.{key}', f'is {entry[key]} but the kernel {kernel_shape} says {value}'
      )
  for leaf in ('kernel', 'bias'):
    flat.pop(f'params/{path}/{leaf}', None)
  p = f'params/{path}'
  out = {f'{p}/bias': _spec((neurons,), np.float32)}
  g = entry.get(_GROUP_SIZE, 1)
  if entry['format'] == 'condensed' and g > 1:
    # Grouped: indices (taps) and ids once per group, G weights per entry.
    index = 'taps' if entry['kind'] == 'conv' else 'indices'
    n_groups = active // g
    out[f'{p}/group_ids'] = _spec((n_groups,), np.int32)
    out[f'{p}/values'] = _spec((n_groups, entry['fan_in'], g), np.float32)
    out[f'{p}/{index}'] = _spec((n_groups, entry['fan_in']), index_dtype_for(fan))
  elif entry['format'] == 'condensed':
    index = 'taps' if entry['kind'] == 'conv' else 'indices'
    out[f'{p}/neuron_ids'] = _spec((active,), np.int32)
    out[f'{p}/values'] = _spec((active, entry['fan_in']), np.float32)
    out[f'{p}/{index}'] = _spec((active, entry['fan_in']), index_dtype_for(fan))
  else:
    out[f'{p}/neuron_ids'] = _spec((active,), np.int32)
    kept = kernel_shape[:-1] if entry['kind'] == 'conv' else [fan]
    out[f'{p}/kernel'] = _spec((*kept, active), np.float32)
  if entry['bias_map']:
    _, in_shape, out_shape = call
    if list(in_shape[1:3]) != entry['input_hw']:
      raise ManifestError(
          f'{field}.input_hw',
          f"is {entry['input_hw']} but the layer's input is {list(in_shape[1:3])}",
      )
    out[f'{p}/bias_map'] = _spec((*out_shape[1:3], neurons), np.float32)
  return out
