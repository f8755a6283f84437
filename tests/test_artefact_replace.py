"""Replacing an artefact: only folders the export owns, atomically, under kills and races.

A writer runs `save_artefact` in a subprocess whose `folder.at_stage` hook
pauses at one named step of the write; the test SIGKILLs it there. After every
kill the destination (or what the loader recovers) must load as the old or the
new artefact, never neither and never a mix, and the next write must succeed
and leave no leftovers. Each step is killed with the directory exchange
(renameat2) and, for the steps only it has, with the rename-aside fallback.
"""

import json
import os
import select
import shutil
import subprocess
import sys
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from srigl_jax import serving
from srigl_jax.serving import artefact, folder

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable-next=g-import-not-at-top,wrong-import-position
from conftest import REPO
from test_artefact_checks import export_family  # noqa: E402

# Writes argv[2]'s payload to argv[1]; pauses at step argv[3] (announced on
# stdout) until killed; argv[4] == 'fallback' disables the directory exchange.
_WRITER = """
import json, os, sys, time
import numpy as np
from srigl_jax.serving import artefact, folder
out, payload, stage, mode = sys.argv[1:5]
if mode == 'fallback':
  folder.exchange = lambda a, b: False
def at_stage(name):
  if name == stage:
    print('paused at', name, flush=True)
    time.sleep(600)
folder.at_stage = at_stage
arrays = dict(np.load(os.path.join(payload, 'arrays.npz')))
manifest = json.load(open(os.path.join(payload, 'manifest.json')))
report = json.load(open(os.path.join(payload, 'report.json')))
artefact.save_artefact(out, artefact._unflatten(arrays), manifest, report)
print('done', flush=True)
"""

# Every step of a replace, in order; the fallback's own steps after them.
EXCHANGE_STAGES = (
    'temp_created',
    'variables_written',
    'report_written',
    'manifest_written',
    'commit_locked',
    'exchanged',
    'trashed',
    'deleting',
    'committed',
)
FALLBACK_STAGES = ('aside', 'renamed', 'trashed')


def _payload(src, dst):
  """An artefact's arrays, manifest (without checksums) and report, as a writer takes them."""
  os.makedirs(dst)
  with ocp.StandardCheckpointer() as ckptr:
    tree = jax.tree.map(np.asarray, ckptr.restore(os.path.join(src, 'variables')))
  arrays = artefact._flatten_paths(tree)  # pylint: disable=protected-access
  np.savez(os.path.join(dst, 'arrays.npz'), **arrays)
  with open(os.path.join(src, 'manifest.json')) as f:
    manifest = json.load(f)
  del manifest['integrity']
  with open(os.path.join(dst, 'manifest.json'), 'w') as f:
    json.dump(manifest, f)
  shutil.copy(os.path.join(src, 'report.json'), dst)
  return dst, arrays


@pytest.fixture(scope='module')
def artefacts(tmp_path_factory):
  """{'old', 'new', 'newer'}: (artefact folder, payload folder, arrays) of steps 3, 4, 5."""
  out = {}
  root = tmp_path_factory.mktemp('artefacts')
  for seed, name in enumerate(('old', 'new', 'newer')):
    path = str(root / name)
    export_family('mlp', path, seed=seed)
    payload, arrays = _payload(path, str(root / f'{name}_payload'))
    out[name] = (path, payload, arrays)
  return out


def _start(out, payload, stage='none', mode='exchange'):
  return subprocess.Popen(
      [sys.executable, '-c', _WRITER, out, payload, stage, mode],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL,
      text=True,
      env=dict(os.environ, JAX_PLATFORMS='cpu'),
  )


def _wait_for(proc, what, timeout=240):
  ready, _, _ = select.select([proc.stdout], [], [], timeout)
  assert ready, f'the writer did not report {what!r} in {timeout} s'
  line = proc.stdout.readline().strip()
  assert line == what, f'expected {what!r}, the writer said {line!r}'


def _kill(proc):
  proc.kill()
  proc.wait()


def _step_and_arrays(path):
  """(source step, host arrays) of the artefact loaded from `path`."""
  model = serving.load_inference_model(path)
  # pylint: disable-next=protected-access
  arrays = artefact._flatten_paths(jax.tree.map(np.asarray, model.variables))
  return model.manifest['source']['checkpoint_step'], arrays


def _assert_is(arrays, want):
  assert set(arrays) == set(want)
  for p in want:
    np.testing.assert_array_equal(arrays[p], want[p], err_msg=p)


def _save(out, artefacts, name):
  """Writes artefact `name` to `out` in this process, as the next export does."""
  _, payload, arrays = artefacts[name]
  with open(os.path.join(payload, 'manifest.json')) as f:
    manifest = json.load(f)
  # pylint: disable-next=protected-access
  artefact.save_artefact(out, artefact._unflatten(dict(arrays)), manifest, {})


def _entries(out):
  return sorted(os.listdir(os.path.dirname(out)))


def _place_old(artefacts, tmp_path, format_1=False):
  out = str(tmp_path / 'inference')
  shutil.copytree(artefacts['old'][0], out)
  if format_1:  # What the export wrote before the marker and the checksums.
    os.remove(os.path.join(out, serving.MARKER_FILE))
    with open(os.path.join(out, 'manifest.json')) as f:
      manifest = json.load(f)
    manifest['format_version'] = 1
    del manifest['integrity']
    with open(os.path.join(out, 'manifest.json'), 'w') as f:
      json.dump(manifest, f)
  return out


KILLS = [(s, 'exchange', False) for s in EXCHANGE_STAGES]
KILLS += [(s, 'fallback', False) for s in FALLBACK_STAGES]
KILLS += [('exchanged', 'exchange', True), ('aside', 'fallback', True)]


@pytest.mark.parametrize(
    'stage,mode,format_1', KILLS, ids=[f'{m}-{s}{"-format1" if f else ""}' for s, m, f in KILLS]
)
def test_a_kill_at_any_step_leaves_the_old_or_the_new_artefact(
    artefacts, tmp_path, stage, mode, format_1
):
  out = _place_old(artefacts, tmp_path, format_1)
  proc = _start(out, artefacts['new'][1], stage, mode)
  try:
    _wait_for(proc, f'paused at {stage}')
  finally:
    _kill(proc)
  step, arrays = _step_and_arrays(out)
  assert step in (3, 4), step
  _assert_is(arrays, artefacts['old' if step == 3 else 'new'][2])
  swapped = stage in ('exchanged', 'trashed', 'deleting', 'committed', 'renamed')
  assert step == (4 if swapped else 3), (stage, step)
  # The next write replaces it and leaves nothing of the killed one behind.
  _save(out, artefacts, 'newer')
  assert _entries(out) == ['.inference.lock', 'inference']
  step, arrays = _step_and_arrays(out)
  assert step == 5
  _assert_is(arrays, artefacts['newer'][2])


def test_the_loader_recovers_the_aside_copy_a_kill_left(artefacts, tmp_path):
  out = _place_old(artefacts, tmp_path)
  proc = _start(out, artefacts['new'][1], 'aside', 'fallback')
  try:
    _wait_for(proc, 'paused at aside')
  finally:
    _kill(proc)
  assert not os.path.exists(out)
  step, _ = _step_and_arrays(out)
  assert step == 3 and os.path.isdir(out)  # Renamed back into place.


def test_a_writer_holding_the_lock_makes_writers_and_loaders_wait(artefacts, tmp_path):
  out = _place_old(artefacts, tmp_path)
  holder = _start(out, artefacts['new'][1], 'commit_locked')
  waiter = None
  try:
    _wait_for(holder, 'paused at commit_locked')
    waiter = _start(out, artefacts['newer'][1])
    loaded = {}
    reader = threading.Thread(target=lambda: loaded.update(step=_step_and_arrays(out)[0]))
    reader.start()
    reader.join(timeout=5)
    assert reader.is_alive() and waiter.poll() is None, 'nobody waited for the lock'
  finally:
    _kill(holder)
  reader.join(timeout=120)
  assert loaded['step'] in (3, 5)
  _wait_for(waiter, 'done')
  assert waiter.wait(timeout=60) == 0
  assert _entries(out) == ['.inference.lock', 'inference']
  assert _step_and_arrays(out)[0] == 5


def test_racing_writers_leave_one_complete_artefact(artefacts, tmp_path):
  out = _place_old(artefacts, tmp_path)
  for _ in range(2):
    procs = [_start(out, artefacts[name][1]) for name in ('new', 'newer')]
    for proc in procs:
      _wait_for(proc, 'done')
      assert proc.wait(timeout=60) == 0
    step, arrays = _step_and_arrays(out)
    _assert_is(arrays, artefacts['new' if step == 4 else 'newer'][2])
    assert _entries(out) == ['.inference.lock', 'inference']


def test_a_live_writers_folder_is_kept_and_foreign_leftovers_too(artefacts, tmp_path):
  out = _place_old(artefacts, tmp_path)
  foreign = tmp_path / '.inference.tmp-notours'
  os.makedirs(foreign)
  (foreign / 'notes.txt').write_text('mine')
  # What a format-1 export killed while it wrote its variables left behind.
  os.makedirs(tmp_path / '.inference.tmp-format1' / 'variables' / 'd')
  slow = _start(out, artefacts['new'][1], 'temp_created')
  try:
    _wait_for(slow, 'paused at temp_created')
    theirs = (foreign.name, '.inference.tmp-format1')
    (live,) = [n for n in _entries(out) if n.startswith('.inference.tmp-') and n not in theirs]
    fast = _start(out, artefacts['newer'][1])
    _wait_for(fast, 'done')
    assert fast.wait(timeout=60) == 0
    assert live in _entries(out)  # Still being written: not a leftover.
  finally:
    _kill(slow)
  assert _step_and_arrays(out)[0] == 5
  _save(out, artefacts, 'old')
  assert _entries(out) == ['.inference.lock', foreign.name, 'inference']
  assert os.listdir(foreign) == ['notes.txt']


def test_what_the_export_may_replace(artefacts, tmp_path):
  assert folder.replace_refusal(str(tmp_path / 'nothing')) is None
  os.makedirs(tmp_path / 'empty')
  assert folder.replace_refusal(str(tmp_path / 'empty')) is None
  assert folder.replace_refusal(artefacts['old'][0]) is None
  assert folder.replace_refusal(_place_old(artefacts, tmp_path, format_1=True)) is None
  stray = tmp_path / 'stray'
  os.makedirs(stray)
  (stray / 'manifest.json').write_text('{}')
  assert 'has no srigl_jax_artefact.json' in folder.replace_refusal(str(stray))
  (tmp_path / 'file').write_text('')
  assert folder.replace_refusal(str(tmp_path / 'file')) == 'is a file'
  os.symlink(artefacts['old'][0], tmp_path / 'link')
  assert folder.replace_refusal(str(tmp_path / 'link')) == 'is a symbolic link'
  # A format-1 artefact with anything else in it is not one.
  extra = _place_old(artefacts, tmp_path / 'x', format_1=True)
  (tmp_path / 'x' / 'inference' / 'mine.txt').write_text('')
  assert folder.replace_refusal(extra) is not None


def test_the_directory_exchange_is_used_here(tmp_path):
  a, b = tmp_path / 'a', tmp_path / 'b'
  os.makedirs(a / 'in_a')
  os.makedirs(b / 'in_b')
  if not folder.exchange(str(a), str(b)):
    pytest.skip('this filesystem cannot exchange directories (the fallback is tested above)')
  assert os.listdir(a) == ['in_b'] and os.listdir(b) == ['in_a']
