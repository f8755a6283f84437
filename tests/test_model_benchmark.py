"""The whole-model benchmark CLI writes what it promises, and its impls agree."""

import json

import numpy as np

from srigl_jax.benchmarks import model as bench


def test_model_benchmark_writes_json_and_plot(tmp_path):
  out, png = tmp_path / "m.json", tmp_path / "m.png"
  # A narrow ResNet-18 at its CIFAR size: BatchNorm folds, padding, residuals.
  bench.main(
      [
          "--model=resnet18",
          "--sparsity=0.9",
          "--batch-sizes=1,3",
          "--repeats=2",
          "--budget-s=1",
          '--model-kwargs={"width": 4, "stage_sizes": [1, 1]}',
          "--json",
          str(out),
          "--plot",
          str(png),
      ]
  )
  records = json.loads(out.read_text())
  assert png.stat().st_size > 0
  keys = {(r["model"], r["batch"], r["impl"]) for r in records}
  assert keys == {("resnet18", b, i) for b in (1, 3) for i in ("dense", "structured", "condensed")}
  for r in records:
    for field in (
        "model",
        "sparsity",
        "batch",
        "impl",
        "median_us",
        "max_rel_err",
        "cpu",
        "native_isa",
        "ablation",
    ):
      assert field in r, field
    assert r["max_rel_err"] <= 1e-4, r
    np.testing.assert_allclose(r["median_us"], np.median(r["round_us"]))
    if r["impl"] != "dense":
      (dense,) = [
          d
          for d in records
          if d["impl"] == "dense" and d["batch"] == r["batch"] and d["model"] == r["model"]
      ]
      want = np.median(np.asarray(dense["round_us"]) / np.asarray(r["round_us"]))
      np.testing.assert_allclose(r["paired_speedup_vs_dense"], want)
  assert records[0]["folded_batchnorms"] > 0 and records[0]["condensed_layers"] > 0
