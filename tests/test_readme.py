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
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
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


def _deploy_block():
  blocks = [b for b in _blocks() if "load_inference_model" in b]
  assert len(blocks) == 1, "README lost its Deploy example"
  return blocks[0]


def _write_idx_images(path, images):
  """uint8 (N, 28, 28) images as a gzipped IDX file, as Debian ships them."""
  import gzip  # pylint: disable=g-import-not-at-top
  import struct  # pylint: disable=g-import-not-at-top

  with gzip.open(path, "wb") as f:
    f.write(struct.pack(">HBBIII", 0, 8, 3, *images.shape))
    f.write(images.tobytes())


def test_readme_deploy_example_serves_the_masked_models_predictions(tmp_path):
  """The Deploy snippet serves a freshly exported, verified artefact: the masked model's classes."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  import srigl_jax  # pylint: disable=g-import-not-at-top
  from srigl_jax import export, serving  # pylint: disable=g-import-not-at-top
  from srigl_jax.training import build  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, str(pathlib.Path(__file__).parent))
  from test_train import small_config  # pylint: disable=g-import-not-at-top

  # A freshly initialised sparse model stands in for a trained one (training
  # would cost the suite time); the export verifies it on the eval split as
  # the trainer's export does.
  config = small_config(**{"sparsity.gamma_sal": 0.95})
  run = build.build(config)
  state = run.init(run.init_key)
  masks = srigl_jax.get_masks(state.opt_state)
  workdir = tmp_path / "workdir" / "fashion_mnist"
  report = export.export_model(
      run.model,
      state.params,
      state.batch_stats,
      masks,
      config,
      str(workdir / "inference"),
      step=0,
      dataset=run.dataset,
      timing_s=0.02,
  )
  assert report["eval_examples"] > 0 and report["differing_predictions"] == 0

  code = _deploy_block().replace("workdir/fashion_mnist", str(workdir))
  images = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
  if not pathlib.Path(images).exists():
    fake = tmp_path / "t10k-images-idx3-ubyte.gz"
    _write_idx_images(fake, np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8))
    code = code.replace(images, str(fake))
    images = str(fake)
  stdout = _run(code)
  classes = [int(c) for c in re.search(r"^classes \[(.*)\]$", stdout, re.M).group(1).split(",")]
  assert re.search(r"^dense_0 condensed \d+/64 neurons, fan-in \d+$", stdout, re.M)

  # The same 8 raw images through the run's own eval preprocessing and the
  # masked model.
  import gzip  # pylint: disable=g-import-not-at-top

  with gzip.open(images) as f:
    raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:8]
  x = serving.apply_preprocessing(export.preprocessing_spec(config.input), raw)
  params = srigl_jax.apply_masks(state.params, masks)
  logits = np.asarray(run.model.apply({"params": params}, x, train=False))
  top2 = np.sort(logits, -1)[:, -2:]
  assert (top2[:, 1] - top2[:, 0]).min() > 1e-4, "a near tie would make this check flaky"
  assert classes == logits.argmax(-1).tolist()
