"""The inference artefact: a self-contained folder, saved atomically and loaded.

A folder holds

  manifest.json   model name and kwargs, input shape and dtype, the eval
                  preprocessing, per layer format / density / active neurons /
                  fan-in, the converter's plan, the source checkpoint's step
                  and the run's fingerprint, and the shape and dtype of every
                  saved array ('variables').
  variables/      the (converted) variables, saved with orbax.
  report.json     what the export measured (`srigl_jax.export`).

`save_artefact` builds the folder next to its destination and renames it into
place when complete, so an interrupted save never leaves a half-written
artefact under the final name. `load_inference_model` needs only the folder:
no training config, optimizer or checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from srigl_jax import models
from srigl_jax.serving.model import InferenceModel

MANIFEST_FILE = 'manifest.json'
REPORT_FILE = 'report.json'
VARIABLES_DIR = 'variables'
# The layout of the folder and of its manifest; a reader refuses newer ones.
# Version 2 adds grouped condensed layers (plan entries with group_size > 1);
# an artefact without them is written as version 1, which older readers load.
FORMAT_VERSION = 2
# The manifest fields a reader needs.
_REQUIRED = ('format_version', 'kind', 'model', 'input', 'preprocessing', 'plan', 'variables')


class ArtefactError(ValueError):
  """An inference folder is missing, partial or corrupted."""


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
  """The oldest format version that holds a converter's plan: 2 with grouped layers, else 1."""
  grouped = any(e.get('group_size', 1) > 1 for e in plan.get('layers', {}).values())
  return 2 if grouped else 1


def is_artefact_folder(path: str) -> bool:
  """Whether `path` is an artefact (or an empty folder) that a save may replace."""
  return os.path.isdir(path) and (
      not os.listdir(path) or os.path.exists(os.path.join(path, MANIFEST_FILE))
  )


def save_artefact(
    out: str, variables: Any, manifest: Mapping[str, Any], report: Mapping[str, Any]
) -> None:
  """Writes the folder `out` atomically, replacing a previous artefact there.

  Args:
    out: the folder (absolute); if it exists it must be an artefact
      (`is_artefact_folder`, checked by the caller before its work).
    variables: the arrays to save (numpy).
    manifest: manifest.json (its 'variables' is `tree_summary(variables)`).
    report: report.json.
  """
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
      shutil.rmtree(out)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _artefact_error(path: str, why: str) -> ArtefactError:
  return ArtefactError(
      f'{path} is not a complete inference artefact: {why}. Export it again: '
      'python -m srigl_jax.export --workdir=WORKDIR --out=' + path
  )


def _read_manifest(path: str) -> dict[str, Any]:
  try:
    with open(os.path.join(path, MANIFEST_FILE), encoding='utf-8') as f:
      manifest = json.load(f)
  except FileNotFoundError:
    raise _artefact_error(
        path, f'{MANIFEST_FILE} is missing (an interrupted ' 'or foreign folder)'
    ) from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise _artefact_error(path, f'{MANIFEST_FILE} is corrupted ({e})') from None
  missing = [k for k in _REQUIRED if k not in manifest]
  if missing:
    raise _artefact_error(path, f'{MANIFEST_FILE} lacks {missing}')
  if manifest['format_version'] > FORMAT_VERSION:
    raise ArtefactError(
        f"{path} has format version {manifest['format_version']}, newer than "
        f'this srigl_jax reads ({FORMAT_VERSION}): upgrade srigl_jax.'
    )
  return manifest


def _read_variables(path: str, expected: Mapping[str, Any]) -> Any:
  """The saved arrays on the first local device, checked against the manifest."""
  vdir = os.path.join(path, VARIABLES_DIR)
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
    return ckptr.restore(vdir, target)
  except ArtefactError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise _artefact_error(
        path, f'{VARIABLES_DIR}/ cannot be read ({type(e).__name__}: ' f'{str(e)[:300]})'
    ) from None


def load_inference_model(path: str, impl: str = 'auto') -> InferenceModel:
  """Loads an inference folder written by `srigl_jax.export`.

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
  manifest = _read_manifest(path)
  variables = _read_variables(path, manifest['variables'])
  _check_group_layout(path, manifest, variables)
  m = manifest['model']
  model = models.get_model(
      m['name'], m['num_classes'], dtype=jnp.dtype(m['dtype']), **from_json(m['kwargs'])
  )
  return InferenceModel(path, manifest, model, variables, impl)


def _check_group_layout(path: str, manifest: Mapping[str, Any], variables) -> None:
  """Refuses condensed layers whose arrays do not have the plan's group layout.

  A layer with ``group_size`` G > 1 holds ``values (n_groups, k, G)``,
  ``indices`` (``taps`` for a conv) ``(n_groups, k)`` and ``group_ids
  (n_groups,)``; a layer with G = 1 holds ``values (n_active, k)``, indices
  of the same shape and ``neuron_ids (n_active,)``. Either way the bias has
  a multiple of G entries.
  """
  params = variables.get('params', {})
  for name, entry in manifest['plan'].get('layers', {}).items():
    if entry.get('format') != 'condensed':
      continue
    g = entry.get('group_size', 1)  # plans written before groups existed: 1
    node = params
    for key in name.split('/'):
      node = node.get(key, {}) if isinstance(node, Mapping) else {}
    index_name = 'taps' if entry.get('kind') == 'conv' else 'indices'
    ids_name = 'group_ids' if g > 1 else 'neuron_ids'
    names = ('values', index_name, ids_name, 'bias')
    shapes = [tuple(np.shape(node[n])) if n in node else None for n in names]
    vs, xs, ids, bs = shapes
    ok = None not in shapes and len(vs) == (3 if g > 1 else 2)
    ok = ok and xs == vs[:2] and ids == vs[:1] and len(bs) == 1 and bs[0] % g == 0
    ok = ok and (g == 1 or vs[2] == g)
    if ok:
      continue
    want = (
        f'values (n_groups, k, {g}), {index_name} (n_groups, k), group_ids (n_groups,)'
        if g > 1
        else f'values (n_active, k), {index_name} (n_active, k), neuron_ids (n_active,)'
    )
    held = ', '.join(f'{n} {tuple(np.shape(a))}' for n, a in sorted(node.items())) or 'nothing'
    workdir = manifest.get('source', {}).get('workdir') or 'WORKDIR'
    raise ArtefactError(
        f"{path}: layer '{name}' does not have the group layout its manifest "
        f'records: group_size={g} needs {want}, but it holds {held}. The '
        'arrays and the manifest come from different exports; write the '
        f'artefact again: python -m srigl_jax.export --workdir={workdir} --out={path}'
    )


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
