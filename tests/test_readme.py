"""The README's Python example runs as written and trains."""

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_training_loop_example_runs():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert blocks, "README has no python example"
  out = subprocess.run([sys.executable, "-c", blocks[0]], capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  loss = float(re.search(r"^loss (\S+)$", out.stdout, re.M).group(1))
  assert loss < 0.5
  fan_ins = re.findall(r"fan-in=(\d+)", out.stdout)
  assert len(fan_ins) == 3
