r"""Input pipeline throughput: images/s of the ImageNet-style and CIFAR pipelines.

    python scripts/input_benchmark.py [--workers=0,1,2] \
        [--out=docs/benchmarks/input_cpu.json]

Two pipelines, on generated data prepared offline as TFDS array_record (by the
test fixture tests/fixtures/fake_tfds.py), read through `tfds.data_source`
exactly like the real datasets:

* imagenet: JPEG decoding of photo-like images (300-500 pixels a side),
  Inception random-resized crop to 224, flip and RandAugment(2, 9), batch 32,
  read from disk on every step (the ImageNet default: no cache);
* cifar: the 32x32 split cached in memory, pad-4 crop and flip, batch 128.

Each (pipeline, worker count) runs in a fresh subprocess that builds the
`Dataset` and takes batches until its prefetch buffers have been filled and
drained (worker start-up and buffered batches excluded), then times at least
`--batches` more batches and `--seconds`; rounds interleave every
configuration so a change in the machine's load hits all of them alike, and
the median is reported. Workers are grain worker processes (0 = in the
measuring process).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PIPELINES = {
    "imagenet": dict(
        name="imagenet2012",
        fields=dict(augment="inception_crop_flip", randaugment=(2, 9), image_size=224),
        batch=32,
    ),
    "cifar": dict(name="cifar10", fields=dict(augment="crop_flip"), batch=128),
}


def define_flags(fv: flags.FlagValues) -> flags.FlagValues:
  """Defines this benchmark's command-line flags on `fv`; returns it."""
  flags.DEFINE_list("workers", ["0", "1", "2"], "Grain worker counts to measure.", flag_values=fv)
  flags.DEFINE_list("pipelines", list(PIPELINES), "Pipelines to measure.", flag_values=fv)
  flags.DEFINE_integer("rounds", 3, "Rounds over all configurations.", flag_values=fv)
  flags.DEFINE_integer("batches", 10, "Timed batches, at least.", flag_values=fv)
  flags.DEFINE_float("seconds", 5.0, "Timed seconds, at least.", flag_values=fv)
  flags.DEFINE_integer("warmup", 2, "Batches taken before timing.", flag_values=fv)
  flags.DEFINE_integer("num_images", 768, "Images of the generated ImageNet split.", flag_values=fv)
  flags.DEFINE_string(
      "data_dir",
      None,
      "Where the generated data go; default a folder under /tmp, kept.",
      flag_values=fv,
  )
  flags.DEFINE_string("out", "docs/benchmarks/input_cpu.json", "The JSON result.", flag_values=fv)
  # Set by the benchmark on its own subprocesses.
  flags.DEFINE_string("child_pipeline", None, "Measure this pipeline once.", flag_values=fv)
  flags.DEFINE_integer("child_workers", 0, "Worker count of the child run.", flag_values=fv)
  return fv


def prepare_data(data_dir: str, num_images: int) -> None:
  """Writes the generated cifar10 and imagenet2012 splits (skipped when present)."""
  spec = importlib.util.spec_from_file_location(
      "fake_tfds", os.path.join(REPO, "tests", "fixtures", "fake_tfds.py")
  )
  fake_tfds = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(fake_tfds)
  if not os.path.isdir(os.path.join(data_dir, "imagenet2012")):
    photo = lambda rng: (int(rng.integers(300, 500)), int(rng.integers(300, 500)), 3)
    fake_tfds.prepare(
        data_dir,
        "imagenet2012",
        {"train": (num_images, photo), "validation": (10, photo)},
        image_fn=fake_tfds.natural_image,
    )
  if not os.path.isdir(os.path.join(data_dir, "cifar10")):
    small = lambda rng: (32, 32, 3)
    fake_tfds.prepare(
        data_dir,
        "cifar10",
        {"train": (max(num_images, 1024), small), "test": (10, small)},
        image_fn=fake_tfds.natural_image,
    )


def _child(fv: flags.FlagValues) -> None:
  """Measures one configuration; prints its images/s as one JSON line."""
  from srigl_jax import data  # pylint: disable=g-import-not-at-top

  spec = PIPELINES[fv.child_pipeline]
  config = data.default_input_config(spec["name"])
  config.data_dir = fv.data_dir
  for key, value in spec["fields"].items():
    config[key] = value
  config.num_workers = fv.child_workers
  # Threads only help where the work releases the GIL (decoding).
  config.num_threads = 4 if spec["name"] == "imagenet2012" and fv.child_workers == 0 else 1
  config.prefetch = 2
  dataset = data.create_dataset(
      config, seed=0, global_batch_size=spec["batch"], process_index=0, process_count=1
  )
  iterator = dataset.train_batches()
  # Batches that may already sit in a buffer when the consumer asks: the
  # prefetch buffer of each worker (or of the process) and one per thread.
  buffered = config.prefetch * max(1, fv.child_workers) + config.num_threads
  for _ in range(fv.warmup + buffered):
    next(iterator)
  start = time.perf_counter()
  count = 0
  while count < fv.batches or time.perf_counter() - start < fv.seconds:
    batch = next(iterator)
    count += 1
  seconds = time.perf_counter() - start
  assert batch["image"].shape[0] == spec["batch"]
  if hasattr(iterator, "close"):
    iterator.close()
  print(json.dumps({"images_per_sec": count * spec["batch"] / seconds}), flush=True)


def _run_child(pipeline: str, workers: int, data_dir: str, fv: flags.FlagValues) -> float:
  """Images/s of one configuration, measured in a fresh process."""
  command = [
      sys.executable,
      os.path.abspath(__file__),
      f"--child_pipeline={pipeline}",
      f"--child_workers={workers}",
      f"--data_dir={data_dir}",
      f"--batches={fv.batches}",
      f"--seconds={fv.seconds}",
      f"--warmup={fv.warmup}",
  ]
  out = subprocess.run(command, capture_output=True, text=True, check=False)
  lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
  if out.returncode or not lines:
    raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
  return json.loads(lines[-1])["images_per_sec"]


def _machine() -> dict:
  import grain  # pylint: disable=g-import-not-at-top

  from srigl_jax import timing  # pylint: disable=g-import-not-at-top
  from srigl_jax.data import available_cpus  # pylint: disable=g-import-not-at-top

  return {
      "cpu": timing.cpu_model(),
      "cpus_available": available_cpus(),
      "load_average_at_start": os.getloadavg()[0],
      "python": platform.python_version(),
      "grain": getattr(grain, "__version__", "?"),
  }


def _main(argv: Sequence[str], fv: flags.FlagValues) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if fv.child_pipeline:
    _child(fv)
    return
  import srigl_jax  # pylint: disable=g-import-not-at-top

  data_dir = fv.data_dir or os.path.join(tempfile.gettempdir(), "srigl_jax_input_bench")
  workers = [int(w) for w in fv.workers]
  prepare_data(data_dir, fv.num_images)
  machine = _machine()
  samples: dict[tuple[str, int], list[float]] = {}
  for r in range(fv.rounds):
    for pipeline in fv.pipelines:
      for w in workers:
        rate = _run_child(pipeline, w, data_dir, fv)
        samples.setdefault((pipeline, w), []).append(rate)
        print(f"round {r + 1}: {pipeline:8s} workers={w}: {rate:8.0f} images/s")
  rows = [
      {
          "pipeline": pipeline,
          "workers": w,
          "images_per_sec": statistics.median(rates),
          "samples": rates,
      }
      for (pipeline, w), rates in samples.items()
  ]
  print(f"\n{machine['cpu']}, {machine['cpus_available']} CPUs; median images/s")
  print(f"{'pipeline':9s} {'workers':>7s} {'images/s':>9s}")
  for row in rows:
    print(f"{row['pipeline']:9s} {row['workers']:7d} {row['images_per_sec']:9.0f}")
  best = {
      pipeline: max(r["images_per_sec"] for r in rows if r["pipeline"] == pipeline)
      for pipeline in fv.pipelines
  }
  result = {
      "machine": machine,
      "setup": {p: PIPELINES[p] for p in fv.pipelines},
      "rounds": fv.rounds,
      "timed_at_least": {"batches": fv.batches, "seconds": fv.seconds},
      "srigl_jax": os.path.dirname(os.path.abspath(srigl_jax.__file__)),
      "rows": rows,
      "best": best,
  }
  os.makedirs(os.path.dirname(os.path.abspath(fv.out)), exist_ok=True)
  with open(fv.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {fv.out}")


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the benchmark with the command-line flags `argv` (default `sys.argv[1:]`)."""
  fv = define_flags(flags.FlagValues())
  _main(fv([__file__, *(sys.argv[1:] if argv is None else argv)]), fv)


if __name__ == "__main__":
  app.run(functools.partial(_main, fv=define_flags(flags.FLAGS)))
