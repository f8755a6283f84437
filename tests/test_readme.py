"""The README's Python examples run as written and do what they say."""

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
  return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _block(marker):
  """The one README python example that contains `marker`."""
  blocks = [b for b in _blocks() if marker in b]
  assert len(blocks) == 1, f"README has {len(blocks)} python examples with {marker!r}, not 1"
  return blocks[0]


def _run(code):
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def _check_training_output(stdout, layers):
  """The loss is learnt and each layer is at its ERK density with constant fan-in.

  Args:
    stdout: the example's output.
    layers: path -> (dense fan-in, the density ERK gives it at 90%).
  """
  assert float(re.search(r"^loss (\S+)$", stdout, re.M).group(1)) < 0.5
  found = re.findall(r"^(\S+) density=(\S+) active=(\d+)/(\d+) fan-in=(\d+)$", stdout, re.M)
  assert [f[0] for f in found] == list(layers), stdout
  for path, density, active, neurons, fan_in in found:
    dense_fan_in, want = layers[path]
    # Every active neuron holds fan-in weights: the density is exactly theirs.
    assert abs(float(density) - int(active) * int(fan_in) / (dense_fan_in * int(neurons))) < 1e-3
    assert abs(float(density) - want) < 0.01, (path, density)


def test_readme_training_loop_example_runs():
  stdout = _run(_block("class MLP(nn.Module)"))
  layers = {"Dense_0/kernel": (64, 0.14), "Dense_1/kernel": (256, 0.06), "head/kernel": (256, 0.8)}
  _check_training_output(stdout, layers)


def test_readme_nnx_example_trains_the_nnx_model_sparse():
  stdout = _run(_block("nnx.Optimizer"))
  layers = {"head/kernel": (256, 0.8), "linear1/kernel": (64, 0.14), "linear2/kernel": (256, 0.06)}
  _check_training_output(stdout, layers)


def test_readme_condensed_example_matches_masked_model():
  stdout = _run(_block("convert_model"))
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
