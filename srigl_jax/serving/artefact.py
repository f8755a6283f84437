"""The inference artefact: a self-contained folder, saved atomically, loaded after checks.

A folder holds

  srigl_jax_artefact.json  the marker: written first by the export, it says the
                  folder is the export's own (it may replace it) and records
                  the format.
  manifest.json   model name and kwargs, input shape and dtype, the eval
                  preprocessing, per layer format / density / active neurons /
                  fan-in, the converter's plan, the source checkpoint's step
                  and the run's fingerprint, the shape and dtype of every
                  saved array ('variables') and their sha256 ('integrity').
  variables/      the (converted) variables, saved with orbax.
  report.json     what the export measured (`srigl_jax.export`).

`ArtefactWriter` creates the folder's temporary copy next to its destination
before the export's long work, and swaps it into place when complete
(`srigl_jax.serving.folder`: the destination is the old or the new artefact
at every moment). `load_inference_model` needs only the folder: no training
config, optimizer or checkpoint. It refuses, before building or calling
anything, a manifest that does not fit the model registry, its own plan or the
saved arrays (`srigl_jax.serving.manifest`), and arrays whose checksums differ
from the manifest's or that hold NaN or inf.

Format 1 (before checksums and the marker) still loads, with every other check
and a warning that gives the command rewriting it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from srigl_jax import condensed
from srigl_jax.serving import folder
from srigl_jax.serving import manifest as manifest_lib
from srigl_jax.serving.folder import MANIFEST_FILE, MARKER_FILE, REPORT_FILE, VARIABLES_DIR
from srigl_jax.serving.model import InferenceModel, apply_fn, choose_cpu_dispatch
from srigl_jax.version import __version__

__all__ = [
    'FORMAT_VERSION',
    'MANIFEST_FILE',
    'MARKER_FILE',
    'REPORT_FILE',
    'VARIABLES_DIR',
    'ArtefactError',
    'ArtefactWriter',
    'array_digest',
    'format_version',
    'from_json',
    'integrity',
    'load_inference_model',
    'save_artefact',
    'tree_summary',
]

# The layout of the folder and of its manifest; a reader refuses newer ones.
# 2: the marker file and the manifest's 'integrity' (sha256 of every array).
# 3: grouped condensed layers (plan entries with group_size > 1). An artefact
# without them is written as version 2, which readers of version 2 load.
FORMAT_VERSION = 3
# The folder layout (the marker, checksums in the manifest) of version 2,
# which later versions keep; the marker records it.
_LAYOUT_VERSION = 2

_log = logging.getLogger(__name__)


class ArtefactError(ValueError):
  """An inference folder is missing, partial, damaged or inconsistent.

  Attributes:
    field: the manifest field (e.g. 'model.kwargs') or saved array (e.g.
      'params/dense_0/values') at fault, or None.
  """

  def __init__(self, message: str, field: str | None = None):
    super().__init__(message)
    self.field = field

  def __reduce__(self):
    return type(self), (str(self), self.field)


def from_json(value: Any) -> Any:
  """JSON lists back to tuples (JSON has no tuples; model kwargs and configs use them)."""
  if isinstance(value, dict):
    return {k: from_json(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(from_json(v) for v in value)
  return value


def tree_summary(tree) -> dict[str, Any]:
  """'/'-joined path -> {'shape', 'dtype'} of every array: the manifest's 'variables'."""
  out = {}
  for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    path = '/'.join(str(getattr(k, 'key', k)) for k in kp)
    out[path] = {'shape': [int(d) for d in np.shape(leaf)], 'dtype': str(np.asarray(leaf).dtype)}
  return out


def format_version(plan: Mapping[str, Any]) -> int:
  """The oldest format version that holds a converter's plan: 3 with grouped layers, else 2."""
  grouped = any(e.get('group_size', 1) > 1 for e in plan.get('layers', {}).values())
  return 3 if grouped else 2


def _flat_arrays(tree) -> dict[str, np.ndarray]:
  """'/'-joined path -> host array of every leaf."""
  return {
      '/'.join(str(getattr(k, 'key', k)) for k in kp): np.asarray(leaf)
      for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def array_digest(array) -> str:
  """sha256 of an array's dtype, shape and C-order bytes."""
  array = np.asarray(array)
  h = hashlib.sha256(json.dumps([str(array.dtype), list(array.shape)]).encode())
  h.update(array.tobytes(order='C'))
  return h.hexdigest()


def _digest_of_all(arrays: Mapping[str, str]) -> str:
  h = hashlib.sha256()
  for path in sorted(arrays):
    h.update(f'{path}\n{arrays[path]}\n'.encode())
  return h.hexdigest()


def integrity(variables) -> dict[str, Any]:
  """The manifest's 'integrity': sha256 of every array, and one over all of them.

  Args:
    variables: the arrays being saved.

  Returns:
    {'algorithm': 'sha256', 'arrays': {path: hex digest}, 'all': hex digest
    over the sorted (path, digest) pairs}.
  """
  arrays = {path: array_digest(a) for path, a in _flat_arrays(variables).items()}
  return {'algorithm': 'sha256', 'arrays': arrays, 'all': _digest_of_all(arrays)}


# ------------------------------------------------------------------ saving


class ArtefactWriter:
  """An artefact being written to `out`; its temporary folder exists from the start.

  Creating it checks that the destination's parent and a folder next to the
  destination can be created (so an export finds out before its long work),
  and deletes the leftovers of killed exports. `save` writes and swaps the
  artefact into place; leaving the context without `save` deletes the
  temporary folder.

      with ArtefactWriter(out) as writer:
        ...  # convert, verify
        writer.save(variables, manifest, report)
  """

  def __init__(self, out: str):
    """Args: out: the destination (absolute); see `folder.replace_refusal`.

    Raises:
      OSError: the parent or the temporary folder cannot be created.
    """
    self.out = out
    self._folder = folder.Writer(
        out, {'format_version': _LAYOUT_VERSION, 'written_by': f'srigl_jax {__version__}'}
    )

  @property
  def tmp(self) -> str:
    """The temporary folder being written."""
    return self._folder.tmp

  def save(self, variables: Any, manifest: Mapping[str, Any], report: Mapping[str, Any]) -> None:
    """Writes the artefact and swaps it into place, replacing the previous one.

    Args:
      variables: the arrays to save (numpy).
      manifest: manifest.json without 'integrity' (computed here from
        `variables`); its 'variables' is `tree_summary(variables)`.
      report: report.json.

    Raises:
      folder.ForeignFolderError: something that is not an artefact appeared
        at `out` meanwhile.
      OSError: writing failed (nothing was replaced).
    """
    tmp = self._folder.tmp
    manifest = {**manifest, 'integrity': integrity(variables)}
    # The context waits for the (asynchronous) save to finish.
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, VARIABLES_DIR), variables)
    folder.at_stage('variables_written')
    with open(os.path.join(tmp, REPORT_FILE), 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=2)
    folder.at_stage('report_written')
    # The manifest last: a folder without it is known to be incomplete.
    with open(os.path.join(tmp, MANIFEST_FILE), 'w', encoding='utf-8') as f:
      json.dump(manifest, f, indent=2)
    folder.at_stage('manifest_written')
    self._folder.commit()

  def close(self) -> None:
    self._folder.close()

  def __enter__(self) -> ArtefactWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def save_artefact(
    out: str, variables: Any, manifest: Mapping[str, Any], report: Mapping[str, Any]
) -> None:
  """Writes the folder `out` (`ArtefactWriter`), replacing a previous artefact there.

  Args:
    out: the folder (absolute); if it exists, the export must be allowed to
      replace it (`folder.replace_refusal`, checked by the caller before its
      work and here again).
    variables: the arrays to save (numpy).
    manifest: manifest.json without 'integrity'.
    report: report.json.
  """
  with ArtefactWriter(out) as writer:
    writer.save(variables, manifest, report)


# ----------------------------------------------------------------- loading


def _rewrite(path: str, manifest: Any = None) -> str:
  """The command that rewrites the folder, with the run's workdir when recorded."""
  source = manifest.get('source') if isinstance(manifest, dict) else None
  workdir = source.get('workdir') if isinstance(source, dict) else None
  workdir = workdir if isinstance(workdir, str) and workdir else 'WORKDIR'
  return f'python -m srigl_jax.export --workdir={workdir} --out={path}'


def _artefact_error(path: str, why: str, manifest: Any = None) -> ArtefactError:
  return ArtefactError(
      f'{path} is not a complete inference artefact: {why}. Export it again: '
      + _rewrite(path, manifest)
  )


def _invalid(path: str, manifest: Any, e: manifest_lib.ManifestError) -> ArtefactError:
  return ArtefactError(
      f'{path} has an invalid {MANIFEST_FILE}: {e}. Export it again: {_rewrite(path, manifest)}',
      field=e.field,
  )


def _damaged(path: str, manifest: Any, array: str, why: str) -> ArtefactError:
  return ArtefactError(
      f"{path} is damaged: array '{array}' {why}. Export it again: {_rewrite(path, manifest)}",
      field=array,
  )


def _read_manifest(path: str) -> dict[str, Any]:
  """manifest.json, checked field by field (`manifest.check_manifest`)."""
  try:
    with open(os.path.join(path, MANIFEST_FILE), encoding='utf-8') as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise _artefact_error(
        path, f'{MANIFEST_FILE} is missing (an interrupted ' 'or foreign folder)'
    ) from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise _artefact_error(path, f'{MANIFEST_FILE} is corrupted ({e})') from None
  if not isinstance(manifest, dict):
    raise _artefact_error(path, f'{MANIFEST_FILE} is not a JSON object')
  version = manifest.get('format_version')
  if isinstance(version, bool) or not isinstance(version, int) or version < 1:
    raise _invalid(
        path,
        manifest,
        manifest_lib.ManifestError('format_version', f'must be an integer >= 1, got {version!r}'),
    )
  if version > FORMAT_VERSION:
    raise ArtefactError(
        f"{path} has format version {manifest['format_version']}, newer than "
        f'this srigl_jax reads ({FORMAT_VERSION}): upgrade srigl_jax.'
    )
  try:
    manifest_lib.check_manifest(manifest)
  except manifest_lib.ManifestError as e:
    raise _invalid(path, manifest, e) from None
  return manifest


def _check_model(path: str, manifest: dict[str, Any]):
  """The model, once the manifest's variables are what it and the plan imply."""
  try:
    model = manifest_lib.build_model(manifest)
    expected = manifest_lib.expected_variables(manifest, model)
  except manifest_lib.ManifestError as e:
    raise _invalid(path, manifest, e) from None
  saved = manifest['variables']
  if saved != expected:
    diff = sorted(
        (set(saved) ^ set(expected))
        | {p for p in saved if p in expected and saved[p] != expected[p]}
    )

    def show(p, tree):
      return f"{tree[p]['shape']} {tree[p]['dtype']}" if p in tree else 'none'

    first = '; '.join(
        f'{p}: manifest {show(p, saved)}, implied {show(p, expected)}' for p in diff[:3]
    )
    raise _invalid(
        path,
        manifest,
        manifest_lib.ManifestError(
            'variables',
            f"do not match what model {manifest['model']['name']!r} and the plan imply ({first})",
        ),
    )
  return model


def _read_variables(path: str, manifest: Mapping[str, Any]) -> Any:
  """The saved arrays on the first local device, checked against the manifest."""
  expected = manifest['variables']
  vdir = os.path.join(path, VARIABLES_DIR)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  try:
    ckptr = ocp.StandardCheckpointer()
    if not os.path.isdir(vdir):
      raise _artefact_error(path, f'{VARIABLES_DIR}/ is missing', manifest)
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
          path, f'the saved arrays do not match the manifest ' f'(e.g. {diff[:3]})', manifest
      )
    target = _unflatten(
        {
            p: jax.ShapeDtypeStruct(tuple(m['shape']), jnp.dtype(m['dtype']), sharding=device)
            for p, m in expected.items()
        }
    )
    return ckptr.restore(vdir, target)
  except ArtefactError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise _artefact_error(
        path,
        f'{VARIABLES_DIR}/ cannot be read ({type(e).__name__}: ' f'{str(e)[:300]})',
        manifest,
    ) from None


def _check_arrays(path: str, manifest: Mapping[str, Any], variables) -> None:
  """Checksums (format 2) and finite floating values of the restored arrays."""
  arrays = _flat_arrays(variables)
  record = manifest.get('integrity')
  if record is not None:
    for p in sorted(arrays):
      if array_digest(arrays[p]) != record['arrays'][p]:
        raise _damaged(
            path, manifest, p, 'does not match its sha256 in the manifest (the file was changed)'
        )
    if _digest_of_all(record['arrays']) != record['all']:
      raise _invalid(
          path,
          manifest,
          manifest_lib.ManifestError('integrity.all', 'is not the digest of integrity.arrays'),
      )
  for p in sorted(arrays):
    a = arrays[p]
    if jnp.issubdtype(a.dtype, jnp.inexact):
      bad = int(a.size - np.count_nonzero(np.isfinite(a)))
      if bad:
        raise _damaged(path, manifest, p, f'holds {bad} non-finite values (NaN or inf)')


def _check_runs(path: str, manifest: Mapping[str, Any], model, variables, impl: str) -> None:
  """The model traced (not run) on its arrays: float32 logits (1, num_classes)."""
  want = (1, manifest['model']['num_classes'])
  x = jax.ShapeDtypeStruct((1, *manifest['input']['shape']), jnp.float32)
  try:
    out = jax.eval_shape(apply_fn(model, manifest['kind'], manifest['plan'], impl), variables, x)
  except Exception as e:  # pylint: disable=broad-except
    # Whatever the model raises on arrays that passed every check above.
    raise _invalid(
        path,
        manifest,
        manifest_lib.ManifestError(
            'plan', f'the model does not run on its arrays ({type(e).__name__}: {str(e)[:300]})'
        ),
    ) from None
  if tuple(out.shape) != want or out.dtype != jnp.float32:
    raise _invalid(
        path,
        manifest,
        manifest_lib.ManifestError(
            'model.num_classes', f'the model outputs {out.dtype} {tuple(out.shape)}, not {want}'
        ),
    )


def load_inference_model(
    path: str, impl: str = 'auto', sync_dispatch: bool = True
) -> InferenceModel:
  """Loads an inference folder written by `srigl_jax.export`, after checking it.

  Needs no training config, optimizer or checkpoint: only the folder. Before
  anything is built or called, every manifest field is checked against the
  model registry, the plan and the saved arrays (`srigl_jax.serving.manifest`);
  then the restored arrays against their sha256 and for NaN or inf. Where
  `path` is missing because an export was killed while it replaced it, the
  previous artefact it kept aside is put back (`folder.recover`).

  Args:
    path: the folder (e.g. WORKDIR/inference).
    impl: condensed kernel choice (`srigl_jax.condensed.IMPLS`); 'auto' picks
      the fastest for the device.
    sync_dispatch: run CPU computations on the calling thread, which suits
      one request at a time (`srigl_jax.serving.model.choose_cpu_dispatch`:
      takes effect only when nothing has run on JAX's CPU client yet).

  Returns:
    An `InferenceModel` on the first local device.

  Raises:
    ArtefactError: the folder is missing, partial, damaged or inconsistent;
      the message gives the command that rewrites it.
    ValueError: an unknown `impl`.
  """
  if impl not in condensed.IMPLS:
    raise ValueError(f'impl must be one of {condensed.IMPLS}, got {impl!r}')
  choose_cpu_dispatch(sync_dispatch)
  path = os.path.abspath(path)
  source = path
  if not os.path.isdir(path):
    source = folder.recover(path) if os.path.isdir(os.path.dirname(path)) else None
    if source is None:
      raise ArtefactError(
          f'{path} does not exist. Export a training workdir '
          'first: python -m srigl_jax.export --workdir=WORKDIR'
      )
    if source != path:
      _log.warning(
          '%s is missing: loading the previous artefact that an interrupted export left at %s '
          '(the next export of this folder puts it back).',
          path,
          source,
      )
  with folder.reading(source):
    manifest = _read_manifest(source)
    variables = _read_variables(source, manifest)
    model = _check_model(source, manifest)
  _check_arrays(source, manifest, variables)
  if manifest['kind'] == 'condensed':
    # Once, here, for every kernel: no index out of range reaches one.
    try:
      condensed.ConvertedModel(model=model, variables=variables, plan=manifest['plan']).validate()
    except (ValueError, KeyError, TypeError) as e:
      raise ArtefactError(
          f'{source} is damaged: its variables fail a check: {str(e).rstrip(".")}. '
          f'Export it again: {_rewrite(source, manifest)}',
          field='variables',
      ) from None
  _check_runs(source, manifest, model, variables, impl)
  if manifest['format_version'] < _LAYOUT_VERSION:
    _log.warning(
        '%s has format version %d, without checksums: its manifest and arrays were checked, '
        'but damage that leaves the values finite cannot be detected. Rewrite it: %s',
        source,
        manifest['format_version'],
        _rewrite(source, manifest),
    )
  return InferenceModel(source, manifest, model, variables, impl)


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
