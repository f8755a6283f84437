"""Where an artefact lives: a folder only the export writes, replaced atomically.

An artefact folder NAME (in PARENT) is written as follows (`Writer`):

1. Under an exclusive lock on PARENT/.NAME.lock, leftovers of killed writes
   are cleaned up (see below) and a temporary folder PARENT/.NAME.tmp-XXXX is
   created with `MARKER_FILE` in it, first: the marker says the folder is
   ours, so an export may later replace or delete it. The writing process
   holds an flock on this folder for as long as it lives, so no other export
   mistakes it for a leftover.
2. The caller writes the artefact into it (this can take long; no lock held).
3. Under the lock again, the folder is swapped into place. Where the kernel
   can exchange two directories (Linux `renameat2(RENAME_EXCHANGE)`), NAME
   and the temporary folder swap in one step. Elsewhere the old artefact is
   renamed aside (.NAME.old-XXXX), the new one renamed in. The old one is
   then renamed to .NAME.trash-XXXX and deleted, its marker last.

So NAME is always the old or the new artefact, never a mix; only a kill
between the two renames of the fallback leaves no NAME, and then the complete
old artefact is aside: `recover` (called by the next export and by the
loader) renames it back. Leftovers (temporary folders of dead writers, asides
with NAME in place, trash) are deleted by the next export, and only if they
are ours: marked, or holding nothing but what an export writes (manifest.json,
report.json, variables/: format-1 exports wrote no marker). Readers (`reading`) take a shared lock while they read, so a
swap never happens in the middle of a load. The lock file stays next to the
artefact.

`at_stage` is called at each step of a write; tests replace it to kill a
writer there (tests/test_artefact_replace.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import platform
import secrets
import sys
from collections.abc import Iterator, Mapping
from typing import Any

try:
  import fcntl
except ImportError:  # Not POSIX: no locks (two exports must not race there).
  fcntl = None

MANIFEST_FILE = 'manifest.json'
REPORT_FILE = 'report.json'
VARIABLES_DIR = 'variables'
# Written first into a folder the export creates: export may replace it.
MARKER_FILE = 'srigl_jax_artefact.json'
# What a complete artefact of format 1 (before the marker) held, exactly.
_FORMAT_1_NAMES = frozenset({MANIFEST_FILE, REPORT_FILE, VARIABLES_DIR})
_LEFTOVER_KINDS = ('tmp', 'old', 'trash')

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# renameat2's syscall number, for a libc without the wrapper (glibc < 2.28).
_SYS_RENAMEAT2 = {'x86_64': 316, 'aarch64': 276}


class ForeignFolderError(ValueError):
  """A destination the export did not write, which it must not replace.

  Attributes:
    path: the destination.
    reason: what is there (e.g. "holds ['config.json', 'checkpoints']").
  """

  def __init__(self, path: str, reason: str):
    super().__init__(f'{path} {reason}')
    self.path = path
    self.reason = reason

  def __reduce__(self):
    return type(self), (self.path, self.reason)


def at_stage(stage: str) -> None:
  """Called at each step of a write (see the module docstring); does nothing."""
  del stage


# ------------------------------------------------------------ what is ours


def _is_format_1(path: str) -> bool:
  """A complete artefact of format 1: exactly its three entries, a parseable manifest."""
  try:
    if set(os.listdir(path)) != _FORMAT_1_NAMES:
      return False
    with open(os.path.join(path, MANIFEST_FILE), encoding='utf-8') as f:
      manifest = json.load(f)
  except (OSError, ValueError):
    return False
  return (
      isinstance(manifest, dict)
      and 'format_version' in manifest
      and os.path.isdir(os.path.join(path, VARIABLES_DIR))
  )


def replace_refusal(path: str) -> str | None:
  """Why the export must not replace `path`, or None when it may.

  It may replace nothing, an empty folder, a folder it marked, and a complete
  format-1 artefact. Anything else (a folder holding a stray manifest.json, a
  training workdir, its parent, a file, a symbolic link) is refused.

  Args:
    path: the destination (absolute).

  Returns:
    None, or the reason, to follow the path in a message.
  """
  if os.path.islink(path):
    return 'is a symbolic link'
  if not os.path.exists(path):
    return None
  if not os.path.isdir(path):
    return 'is a file'
  names = sorted(os.listdir(path))
  if not names or MARKER_FILE in names or _is_format_1(path):
    return None
  shown = names[:6] + (['...'] if len(names) > 6 else [])
  return f'holds {shown} and has no {MARKER_FILE}'


def _is_ours(path: str) -> bool:
  """A leftover folder we may delete: marked, or holding only what an export writes.

  The second covers the temporary folders of format-1 exports, which had no
  marker, complete or cut off by a kill.
  """
  try:
    names = set(os.listdir(path))
  except OSError:
    return False
  return MARKER_FILE in names or names <= _FORMAT_1_NAMES


def _leftovers(out: str) -> list[tuple[str, str]]:
  """(kind, path) of every PARENT/.NAME.{tmp,old,trash}-* folder."""
  parent, name = os.path.split(out)
  found = []
  try:
    entries = list(os.scandir(parent))
  except OSError:
    return []
  for entry in entries:
    for kind in _LEFTOVER_KINDS:
      if entry.name.startswith(f'.{name}.{kind}-') and entry.is_dir(follow_symlinks=False):
        found.append((kind, entry.path))
  return sorted(found)


def _sibling(out: str, kind: str) -> str:
  parent, name = os.path.split(out)
  return os.path.join(parent, f'.{name}.{kind}-{secrets.token_hex(6)}')


def lock_path(out: str) -> str:
  """The lock file of a destination: PARENT/.NAME.lock."""
  parent, name = os.path.split(out)
  return os.path.join(parent, f'.{name}.lock')


# ------------------------------------------------------------------ locks


@contextlib.contextmanager
def _locked(out: str) -> Iterator[None]:
  """The exclusive lock on `out`'s lock file (created if needed)."""
  fd = os.open(lock_path(out), os.O_RDWR | os.O_CREAT, 0o666)
  try:
    if fcntl is not None:
      fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # Releases the lock.


@contextlib.contextmanager
def reading(path: str) -> Iterator[None]:
  """A shared lock on `path`'s lock file while it is read (none if it has none)."""
  try:
    fd = os.open(lock_path(path), os.O_RDONLY)
  except OSError:  # Never written by an export here, or not readable.
    yield
    return
  try:
    if fcntl is not None:
      fcntl.flock(fd, fcntl.LOCK_SH)
    yield
  finally:
    os.close(fd)


def _in_use(path: str) -> bool:
  """Whether a live writer holds `path` (its flock)."""
  if fcntl is None:
    return False
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return True  # Unreadable: not ours to judge.
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    return True
  finally:
    os.close(fd)
  return False


# ---------------------------------------------------------- swap, delete


def _libc():
  if not sys.platform.startswith('linux'):
    return None
  try:
    return ctypes.CDLL(None, use_errno=True)
  except OSError:
    return None


def exchange(a: str, b: str) -> bool:
  """Swaps the names of two existing directories atomically.

  Args:
    a, b: absolute paths on one filesystem.

  Returns:
    True when swapped; False where the kernel or filesystem cannot (then
    nothing changed).

  Raises:
    OSError: the exchange is supported but failed.
  """
  libc = _libc()
  if libc is None:
    return False
  args = (
      ctypes.c_int(_AT_FDCWD),
      ctypes.c_char_p(os.fsencode(a)),
      ctypes.c_int(_AT_FDCWD),
      ctypes.c_char_p(os.fsencode(b)),
      ctypes.c_uint(_RENAME_EXCHANGE),
  )
  if hasattr(libc, 'renameat2'):
    result = libc.renameat2(*args)
  elif platform.machine() in _SYS_RENAMEAT2:
    result = libc.syscall(ctypes.c_long(_SYS_RENAMEAT2[platform.machine()]), *args)
  else:
    return False
  if result == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
    return False
  raise OSError(err, os.strerror(err), b)


def _remove_tree(path: str) -> None:
  """Deletes a folder of ours, its top-level marker last (a half-deleted one stays ours)."""
  first = True
  for root, dirs, files in os.walk(path, topdown=False):
    for name in files:
      if root == path and name == MARKER_FILE:
        continue
      os.remove(os.path.join(root, name))
      if first:
        first = False
        at_stage('deleting')
    for name in dirs:
      full = os.path.join(root, name)
      if os.path.islink(full):
        os.remove(full)
      else:
        os.rmdir(full)
  with contextlib.suppress(FileNotFoundError):
    os.remove(os.path.join(path, MARKER_FILE))
  os.rmdir(path)


def _discard(old: str, out: str) -> None:
  """Marks an old artefact of `out`, renames it to trash, deletes it."""
  try:
    if not os.path.exists(os.path.join(old, MARKER_FILE)):
      # A format-1 artefact: marked now, so that its trash stays ours while
      # it is deleted.
      with open(os.path.join(old, MARKER_FILE), 'w', encoding='utf-8') as f:
        f.write('{}')
    trash = _sibling(out, 'trash')
    os.rename(old, trash)
    at_stage('trashed')
    _remove_tree(trash)
  except OSError:
    pass  # The new artefact is in place; the next export deletes what is left.


def _recover_locked(out: str) -> bool:
  """With the lock held: renames a complete aside copy back when `out` is missing."""
  if os.path.lexists(out):
    return False
  asides = [p for kind, p in _leftovers(out) if kind == 'old' and _complete(p)]
  if not asides:
    return False
  os.rename(max(asides, key=os.path.getmtime), out)
  return True


def _complete(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MANIFEST_FILE)) and os.path.isdir(
      os.path.join(path, VARIABLES_DIR)
  )


def _clean_locked(out: str) -> list[str]:
  """With the lock held: deletes the leftovers of killed writes; returns them."""
  removed = []
  for kind, path in _leftovers(out):
    if kind == 'old' and not os.path.lexists(out):
      continue  # The only copy (recovery found it incomplete): keep it.
    if kind == 'tmp' and _in_use(path):
      continue
    if _is_ours(path):
      _remove_tree(path)
      removed.append(path)
  return removed


def recover(out: str) -> str | None:
  """The folder to load when `out` is missing after an interrupted replace.

  The complete old artefact a killed writer left aside is renamed back into
  place; where that is not allowed (a read-only parent) it is loaded where it
  is.

  Args:
    out: the artefact's path (absolute).

  Returns:
    `out` (restored), the aside copy's path, or None when there is none.
  """
  asides = [p for kind, p in _leftovers(out) if kind == 'old' and _complete(p)]
  if not asides:
    return None
  try:
    with _locked(out):
      _recover_locked(out)
  except OSError:
    return max(asides, key=os.path.getmtime)
  return out if os.path.isdir(out) else None


# ----------------------------------------------------------------- writer


class Writer:
  """The temporary folder of one write, created (marked, locked) on construction.

  Use as a context manager: the folder is deleted on exit unless `commit`
  swapped it into place.

  Attributes:
    out: the destination.
    tmp: the temporary folder to write into.
  """

  def __init__(self, out: str, marker: Mapping[str, Any]):
    """Cleans up leftovers and creates the temporary folder.

    Args:
      out: the destination (absolute); its parent is created if needed.
      marker: what `MARKER_FILE` records (e.g. the format version).

    Raises:
      OSError: the parent or the folder cannot be created (not writable).
    """
    self.out = out
    self.committed = False
    self._fd = None
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with _locked(out):
      _recover_locked(out)
      _clean_locked(out)
      self.tmp = _sibling(out, 'tmp')
      os.mkdir(self.tmp, 0o777)  # The umask applies, as to any new folder.
      try:
        self._fd = os.open(self.tmp, os.O_RDONLY)
        if fcntl is not None:
          fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with open(os.path.join(self.tmp, MARKER_FILE), 'w', encoding='utf-8') as f:
          json.dump(dict(marker), f, indent=2)
      except BaseException:
        self.close()
        raise
    at_stage('temp_created')

  def commit(self) -> None:
    """Swaps the written folder into place and deletes the old artefact.

    Raises:
      ForeignFolderError: something that is not an artefact appeared at
        `out` while this one was written.
    """
    _sync_tree(self.tmp)
    with _locked(self.out):
      refusal = replace_refusal(self.out)
      if refusal is not None:
        raise ForeignFolderError(self.out, refusal)
      at_stage('commit_locked')
      old = None
      if not os.path.lexists(self.out):
        os.rename(self.tmp, self.out)
        at_stage('renamed')
      elif exchange(self.tmp, self.out):
        old = self.tmp
        at_stage('exchanged')
      else:
        old = _sibling(self.out, 'old')
        os.rename(self.out, old)
        at_stage('aside')
        os.rename(self.tmp, self.out)
        at_stage('renamed')
      self.committed = True
      _sync_dir(os.path.dirname(self.out))
      if old is not None:
        _discard(old, self.out)
    at_stage('committed')

  def close(self) -> None:
    """Deletes the temporary folder unless committed; releases its lock."""
    try:
      if not self.committed and os.path.isdir(self.tmp):
        _remove_tree(self.tmp)
    finally:
      if self._fd is not None:
        os.close(self._fd)
        self._fd = None

  def __enter__(self) -> Writer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _sync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _sync_tree(path: str) -> None:
  """fsyncs every file and folder under `path`: on disk before it is renamed in."""
  for root, _, files in os.walk(path):
    for name in files:
      fd = os.open(os.path.join(root, name), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    _sync_dir(root)
