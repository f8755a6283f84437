r"""Input pipeline throughput: images/s of the ImageNet-style and CIFAR pipelines.

    python -m srigl_jax.benchmarks.input [--before=DIR] [--workers=0,1,2] \
        [--out=docs/benchmarks/input_cpu.json]

Two pipelines, on generated data prepared offline as TFDS array_record (see
`srigl_jax.data.fake_tfds`), read through `tfds.data_source` exactly like the
real datasets:

* imagenet: JPEG decoding of photo-like images (300-500 pixels a side),
  Inception random-resized crop to 224, flip and RandAugment(2, 9), batch 32,
  read from disk on every step (the ImageNet default: no cache);
* cifar: the 32x32 split cached in memory, pad-4 crop and flip, batch 128.

Each (pipeline, implementation, worker count) runs in a fresh subprocess that
builds the `Dataset` and takes batches until its prefetch buffers have been
filled and drained (worker start-up and buffered batches excluded), then
times at least `--batches` more batches and `--seconds`; rounds interleave
every configuration so a change in the machine's load hits all of them
alike, and the median is reported.

`--before=DIR` also measures the `srigl_jax` of an older source tree (e.g. a
`git worktree` of the commit before the grain pipeline) side by side. Its
`num_workers` meant decoding threads (at least 1), so there "workers w" runs
max(w, 1) threads; here it is grain worker processes (0 = in the training
process).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

PIPELINES = {
    "imagenet": dict(
        name="imagenet2012",
        fields=dict(augment="inception_crop_flip", randaugment=(2, 9), image_size=224),
        batch=32,
    ),
    "cifar": dict(name="cifar10", fields=dict(augment="crop_flip"), batch=128),
}


def prepare_data(data_dir: str, num_images: int) -> None:
  """Writes the generated cifar10 and imagenet2012 splits (skipped when present)."""
  from srigl_jax.data import fake_tfds  # pylint: disable=g-import-not-at-top

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


def _import_data_from(tree: str):
  """`srigl_jax.data` of the source tree `tree`, even when another copy is pip-installed.

  An editable install answers `import srigl_jax` from a meta-path finder that
  comes before sys.path, so that finder is dropped in this (child) process.
  """
  sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
  sys.path.insert(0, tree)
  from srigl_jax import data  # pylint: disable=g-import-not-at-top

  return data


def _child(args) -> None:
  """Measures one configuration; prints one JSON line."""
  data = _import_data_from(args.tree)

  spec = PIPELINES[args.pipeline]
  config = data.default_input_config(spec["name"])
  config.data_dir = args.data_dir
  for key, value in spec["fields"].items():
    config[key] = value
  grain_based = "num_threads" in config
  if grain_based:
    config.num_workers = args.child_workers
    # Threads only help where the work releases the GIL (decoding).
    config.num_threads = 4 if spec["name"] == "imagenet2012" and args.child_workers == 0 else 1
  else:
    config.num_workers = max(1, args.child_workers)
  config.prefetch = 2
  dataset = data.create_dataset(
      config, seed=0, global_batch_size=spec["batch"], process_index=0, process_count=1
  )
  iterator = dataset.train_batches()
  # Batches that may already sit in a buffer when the consumer asks: the
  # prefetch buffer of each worker (or of the process) and one per thread.
  buffered = config.prefetch * max(1, args.child_workers) + getattr(config, "num_threads", 1)
  for _ in range(args.warmup + buffered):
    next(iterator)
  start = time.perf_counter()
  count = 0
  while count < args.batches or time.perf_counter() - start < args.seconds:
    batch = next(iterator)
    count += 1
  seconds = time.perf_counter() - start
  assert batch["image"].shape[0] == spec["batch"]
  if hasattr(iterator, "close"):
    iterator.close()
  print(
      json.dumps(
          {
              "images_per_sec": count * spec["batch"] / seconds,
              "srigl_jax": os.path.dirname(data.__file__),
          }
      ),
      flush=True,
  )


def _run_child(tree: str, pipeline: str, workers: int, args) -> dict:
  # Grain's spawned workers import the pipeline's modules by name: they find
  # the tree through PYTHONPATH once the editable finder is gone.
  env = {**os.environ, "PYTHONPATH": tree}
  command = [
      sys.executable,
      os.path.abspath(__file__),
      "--child",
      f"--tree={tree}",
      f"--pipeline={pipeline}",
      f"--child_workers={workers}",
      f"--data_dir={args.data_dir}",
      f"--batches={args.batches}",
      f"--seconds={args.seconds}",
      f"--warmup={args.warmup}",
  ]
  out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
  lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
  if out.returncode or not lines:
    raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
  result = json.loads(lines[-1])
  expected = os.path.join(os.path.abspath(tree), "srigl_jax", "data")
  if os.path.abspath(result["srigl_jax"]) != expected:
    raise RuntimeError(f"measured {result['srigl_jax']}, not {expected}: is {tree} a source tree?")
  return result


def _machine() -> dict:
  import grain  # pylint: disable=g-import-not-at-top

  from srigl_jax.benchmarks.condensed import cpu_model  # pylint: disable=g-import-not-at-top
  from srigl_jax.data import available_cpus  # pylint: disable=g-import-not-at-top

  return {
      "cpu": cpu_model(),
      "cpus_available": available_cpus(),
      "load_average_at_start": os.getloadavg()[0],
      "python": platform.python_version(),
      "grain": getattr(grain, "__version__", "?"),
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--before", default=None, help="source tree of the earlier pipeline")
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--pipelines", default="imagenet,cifar")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--batches", type=int, default=10, help="timed batches, at least")
  parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds, at least")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--num_images", type=int, default=768)
  parser.add_argument("--data_dir", default=None, help="default: a folder under /tmp, kept")
  parser.add_argument("--out", default="docs/benchmarks/input_cpu.json")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--pipeline", help=argparse.SUPPRESS)
  parser.add_argument("--tree", help=argparse.SUPPRESS)
  parser.add_argument("--child_workers", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    _child(args)
    return
  args.data_dir = args.data_dir or os.path.join(tempfile.gettempdir(), "srigl_jax_input_bench")
  here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  trees = {"after": here}
  if args.before:
    trees = {"before": os.path.abspath(args.before), **trees}
  workers = [int(w) for w in args.workers.split(",")]
  pipelines = args.pipelines.split(",")
  prepare_data(args.data_dir, args.num_images)
  machine = _machine()
  samples: dict[tuple[str, str, int], list[float]] = {}
  for r in range(args.rounds):
    for pipeline in pipelines:
      for impl, tree in trees.items():
        for w in workers:
          rate = _run_child(tree, pipeline, w, args)["images_per_sec"]
          samples.setdefault((pipeline, impl, w), []).append(rate)
          print(f"round {r + 1}: {pipeline:8s} {impl:6s} workers={w}: {rate:8.0f} images/s")
  rows = []
  for (pipeline, impl, w), rates in samples.items():
    rows.append(
        {
            "pipeline": pipeline,
            "impl": impl,
            "workers": w,
            "images_per_sec": statistics.median(rates),
            "samples": rates,
        }
    )
  print(f"\n{machine['cpu']}, {machine['cpus_available']} CPUs; median images/s")
  print(f"{'pipeline':9s} {'workers':>7s} " + " ".join(f"{i:>9s}" for i in trees))
  best = {}
  for pipeline in pipelines:
    for w in workers:
      rates = {i: statistics.median(samples[(pipeline, i, w)]) for i in trees}
      print(f"{pipeline:9s} {w:7d} " + " ".join(f"{rates[i]:9.0f}" for i in trees))
    for impl in trees:
      best[f"{pipeline}/{impl}"] = max(
          statistics.median(samples[(pipeline, impl, w)]) for w in workers
      )
  if args.before:
    for pipeline in pipelines:
      ratio = best[f"{pipeline}/after"] / best[f"{pipeline}/before"]
      print(f"{pipeline}: best after / best before = {ratio:.2f}x")
  result = {
      "machine": machine,
      "setup": {k: v for k, v in PIPELINES.items()},
      "rounds": args.rounds,
      "timed_at_least": {"batches": args.batches, "seconds": args.seconds},
      "trees": trees,
      "rows": rows,
      "best": best,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
