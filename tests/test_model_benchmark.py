"""The whole-model benchmark CLI writes what it promises, and its impls agree."""

import json

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
    assert r["median_us"] > 0
  assert records[0]["folded_batchnorms"] > 0 and records[0]["condensed_layers"] > 0
