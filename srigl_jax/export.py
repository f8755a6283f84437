r"""From a training workdir to a deployable (condensed) inference model.

Export:

  python -m srigl_jax.export --workdir=DIR [--out=PATH]

or `export_inference_model(workdir, out=None)`. It restores the newest
complete checkpoint of DIR with the config saved in DIR (no optimizer to
rebuild by hand), converts the model with `srigl_jax.condensed.convert_model`
(sparse layers condensed, ablated neurons folded away, BatchNorm folded),
checks the converted model against the masked one on the whole eval split and
writes a self-contained folder, by default DIR/inference:

  manifest.json   model name and kwargs, input shape and dtype, the eval
                  preprocessing, per layer format / density / active neurons /
                  fan-in, the source checkpoint's step and the run's
                  fingerprint, and the shape of every saved array.
  variables/      the converted variables, saved with orbax.
  report.json     masked vs condensed accuracy, max |logit difference|, and
                  the latency of the masked dense model vs the condensed one
                  at batch 1 and at the eval batch size.

The folder is built next to its destination and renamed into place when
complete, so an interrupted export never leaves a half-written artefact
under the final name. Nothing in the training workdir is modified.

Serving needs only the folder:

  model = srigl_jax.load_inference_model(PATH)
  logits = model(model.preprocess(raw_uint8_images))

A dense run has nothing to condense: its artefact holds the dense params and
says so (`manifest['kind'] == 'dense'`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

import srigl_jax
from srigl_jax import checks, condensed, models, timing
from srigl_jax.data import augment as aug
from srigl_jax.data import pipeline as data_pipeline

__all__ = [
    'ArtefactError',
    'ExportError',
    'InferenceModel',
    'VerificationError',
    'export_inference_model',
    'export_model',
    'load_inference_model',
    'restore_run',
]

MANIFEST_FILE = 'manifest.json'
REPORT_FILE = 'report.json'
VARIABLES_DIR = 'variables'
FORMAT_VERSION = 1
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Timing repeats per batch size are clamped to this range.
_MIN_REPEATS, _MAX_REPEATS = 5, 200


class ExportError(ValueError):
  """The workdir cannot be exported; the message says why and what to do."""


class ArtefactError(ValueError):
  """An inference folder is missing, partial or corrupted."""


class VerificationError(RuntimeError):
  """The converted model predicts differently from the masked model."""


# ------------------------------------------------------------ the workdir


def _tuples(value: Any) -> Any:
  """JSON lists back to tuples (config.json stores tuples as lists)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def _lists(value: Any) -> Any:
  """Tuples and ConfigDicts as JSON values."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _lists(v) for k, v in value.items()}
  if isinstance(value, (tuple, list)):
    return [_lists(v) for v in value]
  return value


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run saved in `workdir/config.json`.

  Args:
    workdir: a training workdir.

  Returns:
    The config, with tuples restored.

  Raises:
    ExportError: no readable config.json.
  """
  path = os.path.join(workdir, 'config.json')
  try:
    with open(path, encoding='utf-8') as f:
      raw = json.load(f)
  except FileNotFoundError:
    raise ExportError(
        f'{path} not found: {workdir} is not a training workdir. Pass the '
        '--workdir of a run of python -m srigl_jax.main.'
    ) from None
  except json.JSONDecodeError as e:
    raise ExportError(
        f'{path} is not valid JSON ({e}); the workdir is '
        'damaged. Re-run the training command to rewrite it.'
    ) from None
  return ml_collections.ConfigDict(_tuples(raw))


def _build_model(config: ml_collections.ConfigDict):
  """(model, input shape, num_classes) of a run's config."""
  image_shape, num_classes = checks.input_geometry(config.input)
  kwargs = _tuples(_lists(config.model.kwargs))
  model = models.get_model(
      config.model.name, num_classes, dtype=_DTYPES[config.model.dtype], **kwargs
  )
  return model, tuple(image_shape), num_classes


def restore_run(workdir: str, config: ml_collections.ConfigDict | None = None):
  """Restores the newest complete checkpoint of a workdir onto one device.

  The optimizer is rebuilt from the run's config only for the shape of its
  state (the masks live in it); nothing is written to the workdir.

  Args:
    workdir: a training workdir.
    config: its config; default: `load_run_config(workdir)`.

  Returns:
    (config, model, state, step): the Flax model and the restored
    `srigl_jax.train.TrainState` on the first local device.

  Raises:
    ExportError: no config or no complete checkpoint.
  """
  # Imported here: train imports this module for its export hook.
  from srigl_jax import train  # pylint: disable=g-import-not-at-top

  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise ExportError(
        f'workdir {workdir} does not exist. Pass the --workdir '
        'of a run of python -m srigl_jax.main.'
    )
  config = load_run_config(workdir) if config is None else config
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  how = (
      'Train first (python -m srigl_jax.main --config=... '
      f'--workdir={workdir}), or let a running job reach its first '
      'checkpoint (checkpoint_every).'
  )
  if not os.path.isdir(ckpt_dir):
    raise ExportError(f'{workdir} has no checkpoints/ folder. {how}')
  manager = ocp.CheckpointManager(
      ckpt_dir,
      options=ocp.CheckpointManagerOptions(
          read_only=True, create=False, enable_async_checkpointing=False
      ),
  )
  try:
    # Orbax lists only finalised checkpoints: one cut off by a kill stays in
    # a temporary folder and is never picked up.
    step = manager.latest_step()
    if step is None:
      raise ExportError(f'{ckpt_dir} holds no complete checkpoint. {how}')
    model, image_shape, _ = _build_model(config)
    tx = train.create_optimizer(config, lambda _: 0.0, jax.random.key(0))
    init = train.make_init_fn(config, model, tx, image_shape, jax.random.key(0))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        jax.eval_shape(init, jax.random.key(0)),
    )
    state = manager.restore(step, args=ocp.args.StandardRestore(target))
  finally:
    manager.close()
  return config, model, state, int(step)


# -------------------------------------------------------- preprocessing


def preprocessing_spec(input_config) -> dict[str, Any]:
  """The eval preprocessing of a dataset as a JSON record.

  Args:
    input_config: the run's `config.input`.

  Returns:
    {'dataset', 'raw_dtype', 'resize' (output side of the eval centre crop,
    or None), 'mean', 'std' (per channel, on the 0-1 scale), 'output_shape'}.
  """
  spec = data_pipeline._spec(input_config.name)  # pylint: disable=protected-access
  image_shape, _ = checks.input_geometry(input_config)
  channels = image_shape[2]
  mean = list(spec.mean) * channels if len(spec.mean) == 1 else list(spec.mean)
  std = list(spec.std) * channels if len(spec.std) == 1 else list(spec.std)
  return {
      'dataset': input_config.name,
      'raw_dtype': 'uint8',
      'resize': int(image_shape[0]) if spec.resize else None,
      'mean': [float(m) for m in mean],
      'std': [float(s) for s in std],
      'output_shape': [int(d) for d in image_shape],
  }


def apply_preprocessing(spec: Mapping[str, Any], raw) -> np.ndarray:
  """Raw uint8 images -> the network's input, as `preprocessing_spec` records.

  Args:
    spec: the manifest's 'preprocessing' record.
    raw: uint8 images (N, H, W, C), or (N, H, W) for one-channel data; with
      'resize' set, a list of (H, W, C) images of any size (centre-cropped and
      resized as at eval time).

  Returns:
    float32 (N, *output_shape).

  Raises:
    ValueError: not uint8, or a shape that cannot be the raw images.
  """
  out_shape = tuple(spec['output_shape'])
  if spec.get('resize'):
    images = [np.asarray(im) for im in raw]
    for im in images:
      _check_raw_dtype(im)
    images = np.stack(
        [aug.crop_resize(im, aug.center_crop_box(*im.shape[:2]), spec['resize']) for im in images]
    )
  else:
    images = np.asarray(raw)
    _check_raw_dtype(images)
    if images.ndim == len(out_shape) and out_shape[-1] == 1:
      images = images[..., None]  # (N, H, W) grey images.
    if images.shape[1:] != out_shape:
      want = f'(N, {", ".join(map(str, out_shape))})'
      if out_shape[-1] == 1:
        want += f' or (N, {", ".join(map(str, out_shape[:-1]))})'
      raise ValueError(
          f'preprocess expects raw images of shape {want}, got '
          f'{images.shape}. For a single image add a batch axis (image[None]).'
      )
  return aug.normalize(images, spec['mean'], spec['std'])


def _check_raw_dtype(images: np.ndarray) -> None:
  if images.dtype != np.uint8:
    raise ValueError(
        f'preprocess expects raw uint8 images (0-255), got dtype '
        f'{images.dtype}. Already-normalised float input goes straight to '
        'model(x).'
    )


# ------------------------------------------------------------ conversion


def _dense_plan(params, masks) -> dict[str, Any]:
  """The plan record of an unconverted model: every kernel as stored."""
  layers = {}
  flat_masks = dict(jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0])
  for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if np.ndim(leaf) < 2 or getattr(kp[-1], 'key', None) != 'kernel':
      continue
    path = '/'.join(str(getattr(k, 'key', k)) for k in kp[:-1])
    shape = np.shape(leaf)
    fan_in = int(np.prod(shape[:-1]))
    mask = flat_masks.get(kp)
    density = 1.0 if mask is None else float(np.mean(np.asarray(mask)))
    layers[path] = {
        'format': 'dense',
        'kind': 'dense' if len(shape) == 2 else 'conv',
        'density': density,
        'neurons': int(shape[-1]),
        'active_neurons': int(shape[-1]),
        'fan_in': fan_in,
    }
  return {'layers': layers}


def _layer_records(plan, params, masks) -> dict[str, Any]:
  """Per kernel: format, kind, density, neurons, active neurons, fan-in.

  The converter's plan lists the layers it converted; kernels it left alone
  (dense ones, such as an ERK-dense classifier) are listed as 'dense'.
  """
  fields = ('format', 'kind', 'density', 'neurons', 'active_neurons', 'fan_in')
  records = {path: {k: rec.get(k) for k in fields} for path, rec in plan['layers'].items()}
  for path, rec in _dense_plan(params, masks)['layers'].items():
    records.setdefault(path, rec)
  return records


def _has_sparse_layers(masks) -> bool:
  return any(m is not None for m in jax.tree.leaves(masks, is_leaf=lambda x: x is None))


def _apply_fn(model, kind: str, plan, impl: str):
  """`f(variables, x) -> float32 logits` of a converted or dense artefact."""
  if kind == 'dense':

    def dense_apply(variables, x):
      return model.apply(variables, x, train=False).astype(jnp.float32)

    return dense_apply

  def condensed_apply(variables, x):
    # Variables are jit arguments, not constants baked into the executable.
    converted = condensed.ConvertedModel(model=model, variables=variables, plan=plan)
    return converted.apply(x, impl=impl).astype(jnp.float32)

  return condensed_apply


def _variables(params, batch_stats) -> dict[str, Any]:
  out = {'params': params}
  if batch_stats:
    out['batch_stats'] = batch_stats
  return out


# -------------------------------------------------------- verification


def _time_interleaved(fns: Mapping[str, Callable[[], Any]], budget_s: float) -> dict[str, float]:
  """Median microseconds per call of each fn, timed in interleaved rounds.

  Interleaving exposes every fn to the same machine load (other processes,
  cache state), so their ratio is fair even when absolute times drift.
  """
  for fn in fns.values():  # Compile and warm up.
    jax.block_until_ready(fn())
    jax.block_until_ready(fn())
  one_round = 0.0
  for fn in fns.values():
    start = time.perf_counter()
    jax.block_until_ready(fn())
    one_round += time.perf_counter() - start
  repeats = int(np.clip(budget_s / max(one_round, 1e-9), _MIN_REPEATS, _MAX_REPEATS))
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) * 1e6 for name, t in times.items()}


def _tie_tolerance(dtype: str, logits: np.ndarray) -> float:
  scale = max(1.0, float(np.max(np.abs(logits))) if logits.size else 1.0)
  return (2e-2 if dtype == 'bfloat16' else 1e-3) * scale


def verify_and_time(
    masked_fn,
    masked_vars,
    cond_fn,
    cond_vars,
    config,
    input_shape,
    model_dtype: str,
    timing_s: float = 1.0,
) -> dict[str, Any]:
  """Runs both models on the eval split and times them.

  Both are compiled and timed with synchronous CPU dispatch
  (`srigl_jax.timing.sync_cpu_dispatch`), as in the benchmarks.

  Args:
    masked_fn, masked_vars: the masked (dense-kernel) model.
    cond_fn, cond_vars: the converted model.
    config: the run's config (eval split, batch sizes).
    input_shape: (H, W, C) of the network input.
    model_dtype: 'float32' or 'bfloat16' (sets the tie tolerance).
    timing_s: about how long to time each batch size (5-200 repeats).

  Returns:
    The report record (see the module docstring).

  Raises:
    VerificationError: a prediction differs beyond a float near-tie.
  """
  with timing.sync_cpu_dispatch():
    return _verify_and_time(
        masked_fn, masked_vars, cond_fn, cond_vars, config, input_shape, model_dtype, timing_s
    )


def _verify_and_time(
    masked_fn, masked_vars, cond_fn, cond_vars, config, input_shape, model_dtype, timing_s
):
  eval_batch = int(config.get('eval_batch_size') or config.batch_size)
  dataset = data_pipeline.create_dataset(
      config.input,
      seed=int(config.seed),
      global_batch_size=int(config.batch_size),
      eval_batch_size=eval_batch,
      process_index=0,
      process_count=1,
  )
  masked_jit, cond_jit = jax.jit(masked_fn), jax.jit(cond_fn)
  correct_m = correct_c = count = 0
  max_diff, near_ties, mismatches = 0.0, 0, []
  iterator = dataset.eval_batches()
  try:
    for batch in iterator:
      real = batch['mask'] > 0
      x = jnp.asarray(batch['image'])
      a = np.asarray(masked_jit(masked_vars, x))[real]
      b = np.asarray(cond_jit(cond_vars, x))[real]
      labels = batch['label'][real]
      pa, pb = a.argmax(-1), b.argmax(-1)
      diff = np.abs(a - b).max(-1) if len(a) else np.zeros(0)
      max_diff = max(max_diff, float(diff.max()) if len(a) else 0.0)
      correct_m += int((pa == labels).sum())
      correct_c += int((pb == labels).sum())
      tol = _tie_tolerance(model_dtype, a)
      for i in np.nonzero(pa != pb)[0]:
        margin = float(a[i, pa[i]] - a[i, pb[i]])
        # A flip the logit error can explain (top two within 2x the error)
        # is a float near-tie; anything else is a conversion bug.
        if diff[i] <= tol and margin <= 2 * diff[i] + 1e-7:
          near_ties += 1
        else:
          mismatches.append((count + int(i), int(pa[i]), int(pb[i]), float(diff[i])))
      count += len(a)
  finally:
    if hasattr(iterator, 'close'):
      iterator.close()
  report = {
      'eval_examples': count,
      'masked_accuracy': correct_m / max(count, 1),
      'condensed_accuracy': correct_c / max(count, 1),
      'max_abs_logit_diff': max_diff,
      'differing_predictions': len(mismatches),
      'near_tie_predictions': near_ties,
  }
  if mismatches:
    first = ', '.join(
        f'#{i}: masked {p} vs converted {q} (|diff| {d:.3g})' for i, p, q, d in mismatches[:5]
    )
    report['error'] = f'{len(mismatches)} of {count} eval predictions differ ' f'({first})'
    return report

  latency = []
  for batch_size in sorted({1, eval_batch}):
    x = jnp.zeros((batch_size,) + tuple(input_shape), jnp.float32)
    us = _time_interleaved(
        {
            'dense': lambda x=x: masked_jit(masked_vars, x),
            'condensed': lambda x=x: cond_jit(cond_vars, x),
        },
        timing_s,
    )
    latency.append(
        {
            'batch': batch_size,
            'dense_us': us['dense'],
            'condensed_us': us['condensed'],
            'speedup': us['dense'] / max(us['condensed'], 1e-9),
        }
    )
  report['latency'] = latency
  return report


def format_report(report: Mapping[str, Any]) -> str:
  """The report as a short text table."""
  lines = [
      f"{report['kind']} model from step {report['source_step']}: " f"{report['path']}",
      f"  eval examples      {report['eval_examples']}",
      f"  masked accuracy    {100 * report['masked_accuracy']:.2f}%",
      f"  {report['kind']:9s} accuracy " f"{100 * report['condensed_accuracy']:.2f}%",
      f"  max |logit diff|   {report['max_abs_logit_diff']:.3g}",
      '  batch   dense (us)   ' + f"{report['kind']} (us)".ljust(16) + 'speed-up',
  ]
  for r in report.get('latency', []):
    lines.append(
        f"  {r['batch']:5d}   {r['dense_us']:10.1f}   "
        f"{r['condensed_us']:14.1f}   {r['speedup']:7.2f}x"
    )
  return '\n'.join(lines)


def summary_line(report: Mapping[str, Any]) -> str:
  """One line for the end of training: accuracy and speed-up at batch 1."""
  acc_c = 100 * report['condensed_accuracy']
  acc_m = 100 * report['masked_accuracy']
  same = (
      'same as masked'
      if report['condensed_accuracy'] == report['masked_accuracy']
      else f'masked {acc_m:.2f}%'
  )
  b1 = next((r for r in report.get('latency', []) if r['batch'] == 1), None)
  speed = f", {b1['speedup']:.1f}x faster than dense at batch 1" if b1 else ''
  if report['kind'] == 'dense':
    return f'dense model (nothing to condense): {acc_c:.2f}%, exported to ' f"{report['path']}"
  return f'condensed model: {acc_c:.2f}% ({same}){speed}'


# ------------------------------------------------------------------ export


def _tree_summary(tree) -> dict[str, Any]:
  out = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    path = '/'.join(str(getattr(k, 'key', k)) for k in kp)
    out[path] = {'shape': [int(d) for d in np.shape(leaf)], 'dtype': str(np.asarray(leaf).dtype)}
  return out


def _host(tree):
  """numpy copies of (replicated) arrays, also of multi-process ones."""

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_shards[0].data)
    return np.asarray(jax.device_get(x))

  return jax.tree.map(get, tree)


def _checkpoint_fingerprint(workdir: str, step: int) -> dict[str, Any] | None:
  """The custom metadata orbax keeps with a checkpoint (the run's fingerprint
  when the trainer records it there), or None."""
  manager = ocp.CheckpointManager(
      os.path.join(workdir, 'checkpoints'),
      options=ocp.CheckpointManagerOptions(read_only=True, create=False),
  )
  try:
    custom = getattr(manager.metadata(step), 'custom_metadata', None)
  except Exception:  # pylint: disable=broad-except
    custom = None  # Older checkpoints carry no metadata; not an error.
  finally:
    manager.close()
  return dict(custom) if custom else None


def _fingerprint(workdir: str | None, config, step: int | None = None) -> dict[str, Any]:
  """The run's fingerprint: fingerprint.json, else the checkpoint's metadata,
  else recomputed from the config; with a digest to compare runs by."""
  fp = None
  if workdir is not None:
    path = os.path.join(workdir, 'fingerprint.json')
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        fp = json.load(f)
    elif step is not None:
      fp = _checkpoint_fingerprint(workdir, step)
  if fp is None and hasattr(checks, 'fingerprint'):
    fp = checks.fingerprint(config)
  digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
  return {'fields': fp, 'sha256': digest}


def _check_out(out: str, workdir: str | None) -> None:
  """Refuses an --out that would overwrite something that is not an artefact."""
  if workdir is not None and os.path.realpath(out) == os.path.realpath(workdir):
    raise ExportError(
        f'--out={out} is the training workdir; pick a new folder '
        '(the default is WORKDIR/inference).'
    )
  if os.path.exists(out):
    is_artefact = os.path.isdir(out) and (
        not os.listdir(out) or os.path.exists(os.path.join(out, MANIFEST_FILE))
    )
    if not is_artefact:
      raise ExportError(
          f'--out={out} exists and is not an inference folder; ' 'pick a new path or remove it.'
      )


def export_model(
    model,
    params,
    batch_stats,
    masks,
    config,
    out: str,
    *,
    step: int,
    workdir: str | None = None,
    verify: bool = True,
    timing_s: float = 1.0,
) -> dict[str, Any]:
  """Converts a trained model, verifies it and writes the inference folder.

  Args:
    model: the Flax module.
    params: trained params (masked weights are zeroed again here).
    batch_stats: BatchNorm statistics ({} if none).
    masks: `srigl_jax.get_masks(opt_state)` (None leaves for dense ones).
    config: the run's config (model, input, eval split, batch sizes).
    out: the folder to write.
    step: the training step of these params.
    workdir: the training workdir, for its fingerprint.
    verify: run the eval split through both models and time them.
    timing_s: about how long to time each batch size.

  Returns:
    The report (also written to out/report.json), with 'path' and 'kind'.

  Raises:
    ExportError: `out` would overwrite something else.
    VerificationError: predictions differ (nothing is written).
  """
  out = os.path.abspath(out)
  _check_out(out, workdir)
  params, batch_stats, masks = _host((params, batch_stats, masks))
  params = jax.tree.map(np.asarray, srigl_jax.apply_masks(params, masks))
  _, input_shape, num_classes = _build_model(config)
  masked_vars = _variables(params, batch_stats)
  sample = np.zeros((1,) + input_shape, np.float32)
  if _has_sparse_layers(masks):
    kind = 'condensed'
    # RigL/SET/static masks are not constant fan-in: those layers are stored
    # structured (ablated neurons removed) instead of failing the export.
    converted = condensed.convert_model(model, masked_vars, masks, sample, on_ragged='structured')
    variables, plan = _host(converted.variables), converted.plan
  else:
    kind = 'dense'
    logging.info(
        'No sparse layers (a dense run): nothing to condense, the '
        'artefact holds the dense params.'
    )
    variables, plan = masked_vars, _dense_plan(params, masks)

  manifest = {
      'format_version': FORMAT_VERSION,
      'kind': kind,
      'srigl_jax_version': srigl_jax.__version__,
      'model': {
          'name': config.model.name,
          'num_classes': int(num_classes),
          'dtype': config.model.dtype,
          'kwargs': _lists(config.model.kwargs),
      },
      'input': {'shape': list(input_shape), 'dtype': 'float32'},
      'preprocessing': preprocessing_spec(config.input),
      'layers': _layer_records(plan, params, masks),
      'plan': plan,
      'source': {
          'workdir': workdir,
          'checkpoint_step': int(step),
          'fingerprint': _fingerprint(workdir, config, step),
      },
      'variables': _tree_summary(variables),
  }
  json.dumps(manifest)  # Fails here, before any file is written.

  report = {'kind': kind, 'path': out, 'source_step': int(step)}
  if verify:
    report.update(
        verify_and_time(
            _apply_fn(model, 'dense', None, 'auto'),
            masked_vars,
            _apply_fn(model, kind, plan, 'auto'),
            variables,
            config,
            input_shape,
            config.model.dtype,
            timing_s,
        )
    )
  report['device'] = str(jax.local_devices()[0].device_kind)
  if 'error' in report:
    # Nothing servable is left behind for a model that would answer wrongly.
    raise VerificationError(
        f'The converted model disagrees with the masked model: '
        f"{report['error']}. No artefact was written. This is a bug in the "
        'conversion of this model; please report it with this message.'
    )

  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out)}.tmp-', dir=parent)
  try:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would hide it from servers.
    # The context waits for the (asynchronous) save to finish before the
    # folder is renamed into place.
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, VARIABLES_DIR), variables)
    with open(os.path.join(tmp, REPORT_FILE), 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=2)
    # The manifest last: a folder without it is known to be incomplete.
    with open(os.path.join(tmp, MANIFEST_FILE), 'w', encoding='utf-8') as f:
      json.dump(manifest, f, indent=2)
    if os.path.exists(out):
      shutil.rmtree(out)  # A previous artefact (checked by _check_out).
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return report


def export_inference_model(
    workdir: str, out: str | None = None, *, verify: bool = True, timing_s: float = 1.0
) -> dict[str, Any]:
  """Exports the newest complete checkpoint of a training workdir.

  Args:
    workdir: the training workdir (holding config.json and checkpoints/).
    out: the inference folder to write; default `workdir/inference`.
    verify: check the converted model on the eval split and time it.
    timing_s: about how long to time each batch size (dense and converted
      calls interleaved, 5 to 200 repeats, medians reported).

  Returns:
    The report (as in report.json): kind, path, source_step,
    masked_accuracy, condensed_accuracy, max_abs_logit_diff and latency
    [{batch, dense_us, condensed_us, speedup}, ...].

  Raises:
    ExportError: no config or no complete checkpoint in the workdir.
    VerificationError: the converted model predicts differently.
  """
  workdir = os.path.abspath(workdir)
  config, model, state, step = restore_run(workdir)
  out = os.path.join(workdir, 'inference') if out is None else out
  return export_model(
      model,
      state.params,
      state.batch_stats,
      srigl_jax.get_masks(state.opt_state),
      config,
      out,
      step=step,
      workdir=workdir,
      verify=verify,
      timing_s=timing_s,
  )


# -------------------------------------------------------------------- load


class InferenceModel:
  """A loaded inference artefact: `model(x) -> logits`, jitted.

  Attributes:
    path: the folder it was loaded from.
    manifest: its manifest.json.
    kind: 'condensed' or 'dense'.
    input_shape: (H, W, C) of one input.
    impl: the kernel choice ('auto': the fastest for the device).
  """

  def __init__(self, path: str, manifest: dict[str, Any], model, variables, impl: str = 'auto'):
    self.path = path
    self.manifest = manifest
    self.kind = manifest['kind']
    self.input_shape = tuple(manifest['input']['shape'])
    self.input_dtype = np.dtype(manifest['input']['dtype'])
    self.impl = impl
    self.module = model
    self.variables = variables
    self._fn = jax.jit(_apply_fn(model, self.kind, manifest['plan'], impl))

  @property
  def layers(self) -> dict[str, Any]:
    """Per layer: format, kind, density, neurons, active neurons, fan-in."""
    return self.manifest['layers']

  def __call__(self, x) -> jax.Array:
    """Float32 logits (N, num_classes) of preprocessed input (N, *input_shape).

    Raises:
      ValueError: wrong shape or dtype (raw images: use `preprocess` first).
    """
    dtype = getattr(x, 'dtype', None)
    if dtype is None:
      x = np.asarray(x)
      dtype = x.dtype
    want = '(N, ' + ', '.join(map(str, self.input_shape)) + ')'
    if np.dtype(dtype) != self.input_dtype:
      hint = (
          ' These look like raw images: call model.preprocess(raw) first.'
          if np.dtype(dtype) == np.uint8
          else ''
      )
      raise ValueError(
          f'Input dtype {np.dtype(dtype)} but this model takes ' f'{self.input_dtype} {want}.{hint}'
      )
    if tuple(x.shape[1:]) != self.input_shape or len(x.shape) < 2:
      raise ValueError(
          f'Input shape {tuple(x.shape)} but this model takes {want}. Raw '
          'images go through model.preprocess(raw); add a batch axis for one '
          'example (x[None]).'
      )
    return self._fn(self.variables, x)

  def preprocess(self, raw) -> np.ndarray:
    """The eval preprocessing recorded at export (uint8 images -> input)."""
    return apply_preprocessing(self.manifest['preprocessing'], raw)

  def predict(self, raw) -> np.ndarray:
    """Class ids of raw uint8 images."""
    return np.asarray(jnp.argmax(self(self.preprocess(raw)), -1))


def _artefact_error(path: str, why: str) -> ArtefactError:
  return ArtefactError(
      f'{path} is not a complete inference artefact: {why}. Export it again: '
      'python -m srigl_jax.export --workdir=WORKDIR --out=' + path
  )


def load_inference_model(path: str, impl: str = 'auto') -> InferenceModel:
  """Loads an inference folder written by `export_inference_model`.

  Needs no training config, optimizer or checkpoint: only the folder.

  Args:
    path: the folder (e.g. WORKDIR/inference).
    impl: condensed kernel choice; 'auto' picks the fastest for the device.

  Returns:
    An `InferenceModel` on the first local device.

  Raises:
    ArtefactError: the folder is missing, partial or corrupted.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise ArtefactError(
        f'{path} does not exist. Export a training workdir '
        'first: python -m srigl_jax.export --workdir=WORKDIR'
    )
  try:
    with open(os.path.join(path, MANIFEST_FILE), encoding='utf-8') as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise _artefact_error(
        path, f'{MANIFEST_FILE} is missing (an interrupted ' 'or foreign folder)'
    ) from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise _artefact_error(path, f'{MANIFEST_FILE} is corrupted ({e})') from None
  missing = [
      k
      for k in ('format_version', 'kind', 'model', 'input', 'preprocessing', 'plan', 'variables')
      if k not in manifest
  ]
  if missing:
    raise _artefact_error(path, f'{MANIFEST_FILE} lacks {missing}')
  if manifest['format_version'] > FORMAT_VERSION:
    raise ArtefactError(
        f"{path} has format version {manifest['format_version']}, newer than "
        f'this srigl_jax reads ({FORMAT_VERSION}): upgrade srigl_jax.'
    )

  vdir = os.path.join(path, VARIABLES_DIR)
  expected = manifest['variables']
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  try:
    ckptr = ocp.StandardCheckpointer()
    if not os.path.isdir(vdir):
      raise _artefact_error(path, f'{VARIABLES_DIR}/ is missing')
    meta = ckptr.metadata(vdir)
    meta_tree = getattr(meta, 'item_metadata', meta)
    meta_tree = getattr(meta_tree, 'tree', meta_tree)
    found = {
        p: {'shape': [int(d) for d in m.shape], 'dtype': str(m.dtype)}
        for p, m in _flatten_paths(meta_tree).items()
    }
    if found != expected:
      diff = sorted(
          (set(found) ^ set(expected))
          | {p for p in found if p in expected and found[p] != expected[p]}
      )
      raise _artefact_error(
          path, f'the saved arrays do not match the manifest ' f'(e.g. {diff[:3]})'
      )
    target = _unflatten(
        {
            p: jax.ShapeDtypeStruct(tuple(m['shape']), np.dtype(m['dtype']), sharding=device)
            for p, m in expected.items()
        }
    )
    variables = ckptr.restore(vdir, target)
  except ArtefactError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise _artefact_error(
        path, f'{VARIABLES_DIR}/ cannot be read ({type(e).__name__}: ' f'{str(e)[:300]})'
    ) from None
  m = manifest['model']
  model = models.get_model(
      m['name'], m['num_classes'], dtype=_DTYPES[m['dtype']], **_tuples(m['kwargs'])
  )
  return InferenceModel(path, manifest, model, variables, impl)


def _flatten_paths(tree) -> dict[str, Any]:
  out = {}

  def walk(node, prefix):
    if isinstance(node, Mapping):
      for k, v in node.items():
        walk(v, prefix + (str(k),))
    else:
      out['/'.join(prefix)] = node

  walk(tree, ())
  return out


def _unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, leaf in flat.items():
    node = out
    *parents, last = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = leaf
  return out


# --------------------------------------------------------------------- CLI


def main(argv):
  """`python -m srigl_jax.export --workdir=DIR [--out=PATH]`."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  del argv
  flag_values = flags.FLAGS
  try:
    report = export_inference_model(
        flag_values.workdir, flag_values.out, timing_s=flag_values.timing_s
    )
  except (ExportError, VerificationError) as e:
    # The message names the problem and the fix; a traceback would bury it.
    sys.exit(f'{type(e).__name__}: {e}')
  print(format_report(report))
  print(summary_line(report))


if __name__ == '__main__':
  from absl import (
      app,  # pylint: disable=g-import-not-at-top
      flags,  # pylint: disable=g-import-not-at-top
  )

  flags.DEFINE_string('workdir', None, 'Training workdir to export.')
  flags.DEFINE_string('out', None, 'Inference folder (default WORKDIR/inference).')
  flags.DEFINE_float('timing_s', 1.0, 'About how long to time each batch size.')
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
