"""The benchmark CLIs run end to end on tiny sizes and write what they promise."""

import json

import numpy as np

import srigl_jax.condensed as C
from srigl_jax.benchmarks import condensed as bench


def test_condensed_benchmark_writes_json_and_plot(tmp_path, capsys):
  out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
  impls = ["dense", "bcsr", "structured", "condensed_xla", "condensed_native", "condensed_pallas"]
  rc = bench.main([
      "--in-features", "96", "--out-features", "40", "--sparsities", "0.9,0.99",
      "--batch-sizes", "1,3", "--impls", ",".join(impls), "--repeats", "3", "--budget", "0",
      "--json", str(out_json), "--plot", str(out_png)])
  assert rc == 0
  records = json.loads(out_json.read_text())
  ran = {"dense", "bcsr", "structured", "condensed_xla"}
  if C.native_available():
    ran.add("condensed_native")
  assert {r["impl"] for r in records} == ran  # Pallas needs a GPU: skipped, said so.
  assert "skipping condensed_pallas" in capsys.readouterr().err
  assert len(records) == len(ran) * 2 * 2
  for r in records:
    assert {"impl", "sparsity", "batch", "median_us", "device", "dtype"} <= set(r)
    assert r["median_us"] > 0 and r["repeats"] == 3 and r["device"].startswith("cpu")
    assert r["x_vs_dense_paired"] > 0 and r["x_vs_bcsr_paired"] > 0
    assert r["n_active"] * r["fan_in"] <= 0.1 * 96 * 40 + 1e-9
  dense = [r for r in records if r["impl"] == "dense"]
  assert all(r["x_vs_dense_paired"] == 1.0 for r in dense)
  assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_ratio_compares_calls_of_one_repeat():
  # b is twice as fast as a in two repeats of three; a load spike slowed b in
  # the other. The paired ratio says 2x; the ratio of medians would say 0.5x.
  a = [10.0, 1.0, 2.0]
  b = [5.0, 4.0, 1.0]
  res = {"a": (0, 3, a), "b": (0, 3, b)}
  assert bench.paired_ratio(res, "a", "b") == 2.0
  assert np.median(a) / np.median(b) == 0.5
