r"""From a training run to a deployable (condensed) inference artefact.

  python -m srigl_jax.export --workdir=DIR [--out=PATH] [--timing_s=1.0]

or `export_inference_model(workdir, out=None)`. It rebuilds the run from the
config saved in DIR (`training.build`, the trainer's own build), restores the
newest complete checkpoint into the run's abstract state, and hands it to
`export_model`, which the trainer calls with its final state too:

  1. convert: `srigl_jax.condensed.convert_model` (sparse layers condensed,
     in the grouped format where the run trained with
     `config.sparsity.group_size`, ablated neurons folded away, BatchNorm
     folded); a dense run has nothing to condense and keeps its dense params
     (`manifest['kind'] == 'dense'`);
  2. verify: the converted model against the masked one on the whole eval
     split (predictions must agree up to float near-ties);
  3. time: the masked dense model against the converted one at batch 1 and at
     the eval batch size (`srigl_jax.timing`);
  4. write: `srigl_jax.serving.artefact.ArtefactWriter`, by default to
     DIR/inference, with report.json holding masked vs converted accuracy,
     max |logit difference| and the latencies.

--out is checked before any of this: the export replaces only a folder it
wrote itself (marked by `artefact.MARKER_FILE`) or a complete format-1
artefact, and it creates the artefact's temporary folder next to --out first,
so an unwritable --out fails at once. The new artefact replaces the old one
atomically (`srigl_jax.serving.folder`). Nothing else in the training workdir
is modified. Serving needs only the folder:
`srigl_jax.load_inference_model(PATH)` (`srigl_jax.serving`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from srigl_jax import condensed, config_lib, data, timing
from srigl_jax.data import pipeline as data_pipeline
from srigl_jax.serving import artefact, folder
from srigl_jax.serving.model import apply_fn
from srigl_jax.serving.report import format_report, summary_line
from srigl_jax.sparsity import transform as sparse_transform
from srigl_jax.training import build as build_lib
from srigl_jax.training import checkpointing
from srigl_jax.version import __version__

__all__ = [
    'ExportError',
    'VerificationError',
    'export_inference_model',
    'export_model',
    'load_run_config',
    'preprocessing_spec',
    'restore_run',
    'verify_and_time',
]

# Rounds of interleaved timing per batch size: at least, at most.
_MIN_ROUNDS, _MAX_ROUNDS = 5, 200


class ExportError(ValueError):
  """The workdir cannot be exported; the message says why and what to do."""


class VerificationError(RuntimeError):
  """The converted model predicts differently from the masked model."""


# ------------------------------------------------------------ the workdir


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
  return ml_collections.ConfigDict(artefact.from_json(raw))


def _restore(
    workdir: str, config: ml_collections.ConfigDict | None, *, open_dataset: bool
) -> tuple[build_lib.Run, Any, int]:
  """(run, state on the first local device, step) of the newest checkpoint that restores.

  Reads only: a damaged checkpoint is skipped with a warning naming its
  folder (`training.checkpointing.restore_newest`) and left where it is.
  """
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise ExportError(
        f'workdir {workdir} does not exist. Pass the --workdir '
        'of a run of python -m srigl_jax.main.'
    )
  config = load_run_config(workdir) if config is None else config
  ckpt_dir = os.path.join(workdir, checkpointing.CHECKPOINT_DIR)
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
    if manager.latest_step() is None:
      raise ExportError(f'{ckpt_dir} holds no complete checkpoint. {how}')
    run = build_lib.build(config, open_dataset=open_dataset)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), run.abstract_state
    )
    try:
      step, state, _ = checkpointing.restore_newest(manager, target)
    except checkpointing.DamagedWorkdirError as e:
      raise ExportError(str(e)) from None
  finally:
    manager.close()
  return run, state, int(step)


def restore_run(workdir: str, config: ml_collections.ConfigDict | None = None):
  """Restores the newest complete checkpoint of a workdir onto one device.

  The run is rebuilt from its config (`training.build`, reading no data) for
  the shapes of its state, masks included; nothing is written to the workdir.
  A checkpoint that cannot be restored (files cut short, missing or
  corrupted) is skipped with a warning naming its folder, and the previous
  complete one is used (`training.checkpointing.restore_newest`, as a resumed
  run does).

  Args:
    workdir: a training workdir.
    config: its config; default: `load_run_config(workdir)`.

  Returns:
    (config, model, state, step): the Flax model and the restored
    `training.state.TrainState` on the first local device.

  Raises:
    ExportError: no config, no complete checkpoint, or none that restores
      (naming each one's folder and error).
    config_lib.ConfigError: the saved config is not a valid run.
  """
  run, state, step = _restore(workdir, config, open_dataset=False)
  return run.config, run.model, state, step


def _fingerprint(workdir: str | None, config, step: int | None = None) -> dict[str, Any]:
  """The run's fingerprint with a digest to compare runs by.

  From the workdir (`training.checkpointing.read_fingerprint`: its
  fingerprint.json, or where that is missing or damaged the checkpoint's
  metadata), else computed from the config.
  """
  fp = checkpointing.read_fingerprint(workdir, step) if workdir is not None else None
  if fp is None:
    fp = checkpointing.fingerprint(config)
  digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()
  return {'fields': fp, 'sha256': digest}


# -------------------------------------------------------- the manifest


def _json_value(value: Any) -> Any:
  """Tuples and ConfigDicts as JSON values."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _json_value(v) for k, v in value.items()}
  if isinstance(value, (tuple, list)):
    return [_json_value(v) for v in value]
  return value


def preprocessing_spec(input_config) -> dict[str, Any]:
  """The eval preprocessing of a dataset as the manifest's 'preprocessing' record.

  Args:
    input_config: the run's `config.input`.

  Returns:
    {'dataset', 'raw_dtype', 'resize' (output side of the eval centre crop,
    or None), 'mean', 'std' (per channel, on the 0-1 scale), 'output_shape'};
    `srigl_jax.serving.apply_preprocessing` replays it.
  """
  spec = data_pipeline._spec(input_config.name)  # pylint: disable=protected-access
  image_shape, _ = data.input_geometry(input_config)
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
        'group_size': 1,
    }
  return {'layers': layers}


def _layer_records(plan, params, masks) -> dict[str, Any]:
  """Per kernel: format, kind, density, neurons, active neurons, fan-in, group size.

  The converter's plan lists the layers it converted; kernels it left alone
  (dense ones, such as an ERK-dense classifier) are listed as 'dense'.
  """
  fields = ('format', 'kind', 'density', 'neurons', 'active_neurons', 'fan_in', 'group_size')
  records = {path: {k: rec.get(k) for k in fields} for path, rec in plan['layers'].items()}
  for path, rec in _dense_plan(params, masks)['layers'].items():
    records.setdefault(path, rec)
  return records


def _group_size(config) -> int:
  """The run's `config.sparsity.group_size` (1 for configs written before it existed)."""
  return int(config.sparsity.get('group_size', 1))


def _has_sparse_layers(masks) -> bool:
  return any(m is not None for m in jax.tree.leaves(masks, is_leaf=lambda x: x is None))


def _variables(params, batch_stats) -> dict[str, Any]:
  out = {'params': params}
  if batch_stats:
    out['batch_stats'] = batch_stats
  return out


def _host(tree):
  """numpy copies of (replicated) arrays, also of multi-process ones."""

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_shards[0].data)
    return np.asarray(jax.device_get(x))

  return jax.tree.map(get, tree)


# -------------------------------------------------------- verification


def _tie_tolerance(dtype: str, logits: np.ndarray) -> float:
  scale = max(1.0, float(np.max(np.abs(logits))) if logits.size else 1.0)
  return (2e-2 if dtype == 'bfloat16' else 1e-3) * scale


def _verify(masked_fn, masked_vars, cond_fn, cond_vars, dataset, model_dtype) -> dict[str, Any]:
  """Both models over the eval split: accuracies, logit difference, disagreements."""
  correct_m = correct_c = count = 0
  max_diff, near_ties, mismatches = 0.0, 0, []
  iterator = dataset.eval_batches()
  try:
    for batch in iterator:
      real = batch['mask'] > 0
      x = jnp.asarray(batch['image'])
      a = np.asarray(masked_fn(masked_vars, x))[real]
      b = np.asarray(cond_fn(cond_vars, x))[real]
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


def _latency(
    masked_fn, masked_vars, cond_fn, cond_vars, dataset, timing_s, structured
) -> list[dict]:
  """Median latency of the models at batch 1 and at the eval batch size."""
  latency = []
  for batch_size in sorted({1, dataset.eval_batch_size}):
    x = jnp.zeros((batch_size, *dataset.image_shape), jnp.float32)
    fns = {
        'dense': lambda x=x: masked_fn(masked_vars, x),
        'condensed': lambda x=x: cond_fn(cond_vars, x),
    }
    if structured is not None:
      struct_fn, struct_vars = structured
      fns['structured'] = lambda x=x: struct_fn(struct_vars, x)
    timings = timing.time_interleaved(
        fns, budget_s=timing_s, max_rounds=_MAX_ROUNDS, min_rounds=_MIN_ROUNDS
    )
    us = timings.medians_us()
    record = {'batch': batch_size, 'dense_us': us['dense']}
    if structured is not None:
      record['structured_us'] = us['structured']
    record['condensed_us'] = us['condensed']
    record['speedup'] = us['dense'] / max(us['condensed'], 1e-9)
    if structured is not None:
      record['speedup_vs_structured'] = us['structured'] / max(us['condensed'], 1e-9)
    latency.append(record)
  return latency


def verify_and_time(
    masked_fn,
    masked_vars,
    cond_fn,
    cond_vars,
    dataset: data.Dataset,
    model_dtype: str,
    timing_s: float = 1.0,
    structured: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
  """Runs both models on the eval split and, if they agree, times them.

  Both are jitted and run with synchronous CPU dispatch
  (`srigl_jax.timing.sync_cpu_dispatch`), as in the benchmarks. Timing calls
  the two models in turn (`timing.time_interleaved`) on zero inputs of batch 1
  and of the eval batch size.

  Args:
    masked_fn, masked_vars: the masked (dense-kernel) model,
      `f(variables, x) -> logits`.
    cond_fn, cond_vars: the converted model.
    dataset: the eval data (its eval batches of a single process).
    model_dtype: 'float32' or 'bfloat16' (sets the tolerance of a near-tie).
    timing_s: about how long to time each batch size (at least 5 and at most
      200 rounds).
    structured: optional ``(fn, variables)`` of the structured baseline (the
      same model with its ablated neurons removed and dense kernels, format
      'structured'), timed alongside.

  Returns:
    The report record: eval_examples, masked_accuracy, condensed_accuracy,
    max_abs_logit_diff, differing_predictions, near_tie_predictions, and
    either 'latency' [{batch, dense_us, structured_us, condensed_us, speedup,
    speedup_vs_structured}, ...] (the structured entries with ``structured``;
    speedup is against masked dense) or, when a prediction differs beyond a
    float near-tie, 'error' (untimed).
  """
  with timing.sync_cpu_dispatch():
    masked_jit, cond_jit = jax.jit(masked_fn), jax.jit(cond_fn)
    report = _verify(masked_jit, masked_vars, cond_jit, cond_vars, dataset, model_dtype)
    if 'error' not in report:
      if structured is not None:
        structured = (jax.jit(structured[0]), structured[1])
      report['latency'] = _latency(
          masked_jit, masked_vars, cond_jit, cond_vars, dataset, timing_s, structured
      )
  return report


# ------------------------------------------------------------------ export


def _check_out(out: str, workdir: str | None) -> None:
  """Refuses an --out that the export did not write (`folder.replace_refusal`).

  Runs before any long work, and `folder.Writer` checks again under the lock
  before the swap.
  """
  if workdir is not None:
    real_out, real_workdir = os.path.realpath(out), os.path.realpath(workdir)
    if real_out == real_workdir:
      raise ExportError(
          f'--out={out} is the training workdir; pick a new folder '
          '(the default is WORKDIR/inference).'
      )
    if real_workdir.startswith(real_out.rstrip(os.sep) + os.sep):
      raise ExportError(
          f'--out={out} contains the training workdir {workdir}; pick a new '
          'folder (the default is WORKDIR/inference).'
      )
  refusal = folder.replace_refusal(out)
  if refusal is not None:
    raise ExportError(
        f'--out={out} exists and is not an inference folder written by '
        f'srigl_jax.export: it {refusal}. The export replaces only its own '
        f'folders ({artefact.MARKER_FILE} in them); pick a new path, or remove '
        'this one yourself if nothing in it is needed.'
    )


def _writer(out: str) -> artefact.ArtefactWriter:
  """The artefact's temporary folder next to `out`, created now: a writable --out."""
  try:
    return artefact.ArtefactWriter(out)
  except OSError as e:
    raise ExportError(
        f'--out={out} cannot be written: creating {e.filename or os.path.dirname(out)} '
        f'failed ({e.strerror or e}). Pick a writable --out, or fix the permissions '
        'of its parent folder.'
    ) from None


def _check_finite(variables, step: int) -> None:
  """Refuses params with NaN or inf: the artefact would answer NaN."""
  for kp, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    leaf = np.asarray(leaf)
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      bad = int(leaf.size - np.count_nonzero(np.isfinite(leaf)))
      if bad:
        path = '/'.join(str(getattr(k, 'key', k)) for k in kp)
        raise ExportError(
            f'the model of step {step} holds {bad} non-finite values (NaN or inf) in '
            f"'{path}'; an artefact of it would answer NaN, so none was written. "
            'Export a run whose last checkpoint is finite (a NaN loss stops '
            'training before it is checkpointed).'
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
    dataset: data.Dataset | None = None,
    timing_s: float = 1.0,
) -> dict[str, Any]:
  """Converts a trained model, verifies and times it, and writes the inference folder.

  Args:
    model: the Flax module.
    params: trained params (masked weights are zeroed again here).
    batch_stats: BatchNorm statistics ({} if none).
    masks: `srigl_jax.get_masks(opt_state)` (None leaves for dense ones).
    config: the run's config (model, input).
    out: the folder to write.
    step: the training step of these params.
    workdir: the training workdir, for its fingerprint.
    dataset: the eval data to verify and time on (a single process's); None
      writes the artefact unverified and untimed.
    timing_s: about how long to time each batch size.

  Returns:
    The report (also written to out/report.json), with 'path' and 'kind'.

  Raises:
    ExportError: `out` would overwrite something the export did not write,
      cannot be written, or the params hold NaN or inf.
    VerificationError: predictions differ (nothing is written).
  """
  out = os.path.abspath(out)
  _check_out(out, workdir)
  with _writer(out) as writer:
    return _export(
        writer,
        model,
        params,
        batch_stats,
        masks,
        config,
        step=step,
        workdir=workdir,
        dataset=dataset,
        timing_s=timing_s,
    )


def _export(
    writer: artefact.ArtefactWriter,
    model,
    params,
    batch_stats,
    masks,
    config,
    *,
    step: int,
    workdir: str | None,
    dataset: data.Dataset | None,
    timing_s: float,
) -> dict[str, Any]:
  """`export_model` into an open writer (its folder exists, --out was checked)."""
  out = writer.out
  params, batch_stats, masks = _host((params, batch_stats, masks))
  params = jax.tree.map(np.asarray, sparse_transform.apply_masks(params, masks))
  _check_finite(_variables(params, batch_stats), step)
  input_shape, num_classes = data.input_geometry(config.input)
  input_shape = tuple(input_shape)
  masked_vars = _variables(params, batch_stats)
  sample = np.zeros((1,) + input_shape, np.float32)
  if _has_sparse_layers(masks):
    kind = 'condensed'
    # RigL/SET/static masks are not constant fan-in: those layers are stored
    # structured (ablated neurons removed) instead of failing the export.
    # Layers trained grouped are stored grouped, and must be grouped as the
    # run says.
    converted = condensed.convert_model(
        model,
        masked_vars,
        masks,
        sample,
        on_unsupported='structured',
        group_size=_group_size(config),
    )
    variables, plan = _host(converted.variables), converted.plan
    # The baseline that drops the ablated neurons but keeps dense kernels.
    baseline = condensed.convert_model(model, masked_vars, masks, sample, format='structured')
    structured = (apply_fn(model, 'condensed', baseline.plan, 'auto'), baseline.variables)
  else:
    kind = 'dense'
    structured = None
    logging.info(
        'No sparse layers (a dense run): nothing to condense, the '
        'artefact holds the dense params.'
    )
    variables, plan = masked_vars, _dense_plan(params, masks)

  manifest = {
      'format_version': artefact.format_version(plan),
      'kind': kind,
      'srigl_jax_version': __version__,
      'model': {
          'name': config.model.name,
          'num_classes': int(num_classes),
          'dtype': config.model.dtype,
          'kwargs': _json_value(config.model.kwargs),
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
      'variables': artefact.tree_summary(variables),
  }
  try:
    json.dumps(manifest)  # Fails here, before any file is written.
  except (TypeError, ValueError) as e:
    raise ExportError(
        f'the manifest cannot be written as JSON ({e}): model.kwargs must hold '
        'numbers, strings, booleans, lists and dicts only. Fix the config.'
    ) from None

  report = {'kind': kind, 'path': out, 'source_step': int(step)}
  if dataset is not None:
    report.update(
        verify_and_time(
            apply_fn(model, 'dense', None, 'auto'),
            masked_vars,
            apply_fn(model, kind, plan, 'auto'),
            variables,
            dataset,
            config.model.dtype,
            timing_s,
            structured=structured,
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
  try:
    writer.save(variables, manifest, report)
  except folder.ForeignFolderError as e:
    raise ExportError(
        f'--out={out} was created by something else during the export: it '
        f'{e.reason}. Nothing was written; pick a new path.'
    ) from None
  except OSError as e:
    raise ExportError(
        f'writing the artefact next to {out} failed ({e}); the folder at '
        '--out, if any, is unchanged. Free disk space or fix the permissions, '
        'then export again.'
    ) from None
  return report


def export_inference_model(
    workdir: str, out: str | None = None, *, verify: bool = True, timing_s: float = 1.0
) -> dict[str, Any]:
  """Exports the newest complete checkpoint of a training workdir.

  Args:
    workdir: the training workdir (holding config.json and checkpoints/).
    out: the inference folder to write; default `workdir/inference`.
    verify: check the converted model on the eval split and time it (this
      reads the eval data).
    timing_s: about how long to time each batch size (dense and converted
      calls interleaved, 5 to 200 rounds, medians reported).

  Returns:
    The report (as in report.json): kind, path, source_step, device and, when
    verified, eval_examples, masked_accuracy, condensed_accuracy,
    max_abs_logit_diff, differing_predictions, near_tie_predictions and
    latency [{batch, dense_us, structured_us, condensed_us, speedup,
    speedup_vs_structured}, ...].

  Raises:
    ExportError: no config or no complete checkpoint in the workdir, or an
      --out that the export must not replace or cannot write (checked first).
    config_lib.ConfigError: the saved config is not a valid run.
    VerificationError: the converted model predicts differently.
  """
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise ExportError(
        f'workdir {workdir} does not exist. Pass the --workdir '
        'of a run of python -m srigl_jax.main.'
    )
  config = load_run_config(workdir)
  out = os.path.abspath(os.path.join(workdir, 'inference') if out is None else out)
  # --out is checked, and its folder created, before the long work.
  _check_out(out, workdir)
  with _writer(out) as writer:
    run, state, step = _restore(workdir, config, open_dataset=verify)
    return _export(
        writer,
        run.model,
        state.params,
        state.batch_stats,
        sparse_transform.get_masks(state.opt_state),
        run.config,
        step=step,
        workdir=workdir,
        dataset=run.dataset,
        timing_s=timing_s,
    )


# --------------------------------------------------------------------- CLI


def main(argv):
  """`python -m srigl_jax.export --workdir=DIR [--out=PATH] [--timing_s=S]`."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  del argv
  flag_values = flags.FLAGS
  try:
    report = export_inference_model(
        flag_values.workdir, flag_values.out, timing_s=flag_values.timing_s
    )
  except (ExportError, VerificationError, config_lib.ConfigError) as e:
    # The message names the problem and the fix; a traceback would bury it.
    sys.exit(f'{type(e).__name__}: {e}')
  print(format_report(report))
  print(summary_line(report))


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string('workdir', None, 'Training workdir to export.')
  flags.DEFINE_string('out', None, 'Inference folder (default WORKDIR/inference).')
  flags.DEFINE_float('timing_s', 1.0, 'About how long to time each batch size.')
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
