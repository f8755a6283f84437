"""The README's Python examples run as written and do what they say."""

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert len(blocks) >= 2, "README lost its python examples"
  return blocks


def _run(code):
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_readme_training_loop_example_runs():
  stdout = _run(_blocks()[0])
  loss = float(re.search(r"^loss (\S+)$", stdout, re.M).group(1))
  assert loss < 0.5
  assert len(re.findall(r"fan-in=(\d+)", stdout)) == 3


def test_readme_condensed_example_matches_masked_model():
  stdout = _run(_blocks()[1])
  assert float(stdout.strip().splitlines()[-1]) < 1e-4
