"""The CI guard of conftest.py: with CI=true a hidden skip or a missing native library fails."""

import os
import shutil
import subprocess
import sys
import textwrap

from conftest import REPO

_RUN_PYTEST = textwrap.dedent("""
    import sys
    import pytest
    if sys.argv[1] == 'no-native':
      from srigl_jax.condensed import _native_lib
      _native_lib._load.cache_clear()
      _native_lib._load = lambda: (None, 'hidden by the test')
    sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', sys.argv[2]]))
""")


def _run(tmp_path, body: str, *, ci: bool, native: bool = True):
  shutil.copy(os.path.join(REPO, 'tests', 'conftest.py'), tmp_path / 'conftest.py')
  (tmp_path / 'test_sample.py').write_text(textwrap.dedent(body))
  env = {**os.environ, 'CI': 'true' if ci else ''}
  return subprocess.run(
      [sys.executable, '-c', _RUN_PYTEST, 'native' if native else 'no-native', str(tmp_path)],
      cwd=tmp_path,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )


_HIDDEN_SKIP = """
    import pytest

    def test_passes():
      pass

    def test_hides_a_regression():
      pytest.skip('the dataset could not be prepared')
"""


def test_a_hidden_skip_fails_on_ci_only(tmp_path):
  on_ci = _run(tmp_path, _HIDDEN_SKIP, ci=True)
  assert on_ci.returncode == 1, on_ci.stdout + on_ci.stderr
  assert 'test_hides_a_regression: Skipped: the dataset could not be prepared' in on_ci.stdout
  assert _run(tmp_path, _HIDDEN_SKIP, ci=False).returncode == 0


def test_gpu_and_long_skips_are_accepted_on_ci(tmp_path):
  body = """
      import pytest

      def test_gpu():
        pytest.skip('needs a GPU')

      def test_long():
        pytest.skip('runs with SRIGL_LONG_TESTS=1')
  """
  result = _run(tmp_path, body, ci=True)
  assert result.returncode == 0, result.stdout + result.stderr


def test_a_missing_native_library_stops_ci_at_once(tmp_path):
  result = _run(tmp_path, 'def test_passes():\n  pass\n', ci=True, native=False)
  assert result.returncode == 3, result.stdout + result.stderr
  assert 'native kernel library is missing (hidden by the test)' in result.stdout + result.stderr
  assert _run(tmp_path, 'def test_passes():\n  pass\n', ci=False, native=False).returncode == 0
