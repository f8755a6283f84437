"""The whole-model benchmark CLI writes what it promises, and its impls agree."""

import json

import jax
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


def test_model_benchmark_group_sizes(tmp_path):
  out = tmp_path / "m.json"
  bench.main(
      [
          "--model=resnet18",
          "--sparsity=0.9",
          "--batch-sizes=2",
          "--repeats=2",
          "--budget-s=1",
          "--impls=dense,condensed",
          "--group-size=1,4",
          '--model-kwargs={"width": 4, "stage_sizes": [1, 1]}',
          "--json",
          str(out),
      ]
  )
  records = json.loads(out.read_text())
  assert {(r["impl"], r["group_size"]) for r in records} == {
      ("dense", 1),
      ("condensed", 1),
      ("condensed@g4", 4),
  }
  for r in records:
    # Each variant against the masked dense model of its own masks.
    assert r["max_rel_err"] <= 1e-4, r
  by_impl = {r["impl"]: r for r in records}
  assert by_impl["condensed"]["grouped_layers"] == 0
  assert by_impl["condensed@g4"]["grouped_layers"] > 0


def test_synthetic_grouped_masks_share_inputs_per_group():
  kwargs = dict(width=16, stage_sizes=[1, 1])
  _, _, masks, _ = bench.synthetic_model("resnet18", 0.9, 0.25, group_size=4, **kwargs)
  _, _, plain, _ = bench.synthetic_model("resnet18", 0.9, 0.25, **kwargs)
  grouped = 0
  for path, m in jax.tree_util.tree_flatten_with_path(masks)[0]:
    (q,) = [q for p, q in jax.tree_util.tree_flatten_with_path(plain)[0] if p == path]
    m2 = np.asarray(m).reshape(-1, m.shape[-1])
    # The optimizer's density, G or not (up to rounding k down per unit).
    assert abs(m2.mean() - np.mean(q)) <= 0.15 * np.mean(q), path
    if m2.shape[1] % 4 == 0 and "head" not in jax.tree_util.keystr(path):
      cols = m2.reshape(m2.shape[0], -1, 4)
      assert (cols == cols[:, :, :1]).all(), path
      grouped += 1
      # Whole groups ablated; the active ones share one fan-in.
      active = cols[:, :, 0].any(axis=0)
      assert active.sum() == cols.shape[1] - int(cols.shape[1] * 0.25)
      assert len(set(cols[:, active, 0].sum(axis=0))) == 1
  assert grouped >= 4
