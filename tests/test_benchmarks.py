"""The benchmark CLIs run end to end on tiny sizes and write what they promise."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from absl import flags

import srigl_jax.condensed as C
from srigl_jax import timing
from srigl_jax.benchmarks import condensed as bench


def test_condensed_benchmark_writes_json_and_plot(tmp_path, capsys):
  out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
  impls = ["dense", "bcsr", "structured", "condensed_xla", "condensed_native", "condensed_pallas"]
  argv = "--in-features 96 --out-features 40 --sparsities 0.9,0.99 --batch-sizes 1,3"
  argv += " --repeats 3 --budget 0 --cache-bytes 65536"
  rc = bench.main(
      argv.split() + ["--impls", ",".join(impls), "--json", str(out_json), "--plot", str(out_png)]
  )
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
    assert r["repeats"] == 3 == len(r["round_us"]) and r["device"].startswith("cpu")
    # Medians and paired ratios recomputed from the rounds the record keeps.
    np.testing.assert_allclose(r["median_us"], np.median(r["round_us"]))
    for ref in ("dense", "bcsr"):
      (other,) = [
          o
          for o in records
          if o["impl"] == ref and o["sparsity"] == r["sparsity"] and o["batch"] == r["batch"]
      ]
      want = np.median(np.asarray(other["round_us"]) / np.asarray(r["round_us"]))
      np.testing.assert_allclose(r[f"x_vs_{ref}_paired"], want)
    assert r["n_active"] * r["fan_in"] <= 0.1 * 96 * 40 + 1e-9
    # Cold by default: every impl cycles through copies that exceed the cache.
    assert r["cache"] == "cold" and r["copies"] >= 2 and r["cpu"]
    nnz = r["n_active"] * r["fan_in"]
    np.testing.assert_allclose(r["useful_gflop_s"], 2 * nnz * r["batch"] / r["median_us"] * 1e-3)
    np.testing.assert_allclose(r["bandwidth_gb_s"], r["bytes_moved"] / r["median_us"] * 1e-3)
    assert (r["native_isa"] is not None) == (r["impl"] == "condensed_native")
  dense = [r for r in records if r["impl"] == "dense"]
  assert all(r["x_vs_dense_paired"] == 1.0 for r in dense)
  # Dense reads the whole fp32 weight, input and output once at least.
  assert all(r["bytes_moved"] >= (96 * 40 + 40 + r["batch"] * (96 + 40)) * 4 for r in dense)
  assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_condensed_benchmark_warm_cache_and_forced_isa(tmp_path):
  out_json = tmp_path / "r.json"
  isas = [i for i in ("generic", "avx2", "avx512") if i in C.native_isas()]
  impls = ["dense"] + [f"condensed_native_{i}" for i in isas]
  if C.native_available():
    impls.append("condensed_native_bf16w")
  argv = "--in-features=64 --out-features=24 --sparsities=0.9 --batch-sizes=2 --repeats=3"
  argv += " --budget=0 --cache=warm --model"
  rc = bench.main(argv.split() + [f"--impls={','.join(impls)}", f"--json={out_json}"])
  assert rc == 0
  records = json.loads(out_json.read_text())
  # --model adds a converted ViT MLP block against the masked dense one.
  model = [r for r in records if r["impl"].startswith("model_")]
  assert {(r["impl"], r["batch"]) for r in model} == {
      (i, b) for i in ("model_dense", "model_condensed") for b in (1, 256)
  }
  records = [r for r in records if not r["impl"].startswith("model_")]
  assert {r["impl"] for r in records} == set(impls)
  for r in records:
    assert r["cache"] == "warm" and r["copies"] == 1
    if r["impl"] == "condensed_native_bf16w":
      assert r["native_isa"] == C.native_isas()["auto"]
      assert r["bytes_moved"] < next(
          q["bytes_moved"] for q in records if q["impl"] == "condensed_native_avx2"
      )
    elif r["impl"] != "dense":
      assert r["native_isa"] == r["impl"].rsplit("_", 1)[1]


def test_condensed_benchmark_group_sizes(tmp_path):
  out_json = tmp_path / "r.json"
  impls = ["dense", "condensed_xla"] + (["condensed_native"] if C.native_available() else [])
  argv = "--in-features=96 --out-features=48 --sparsities=0.9 --batch-sizes=1,5 --repeats=3"
  argv += " --budget=0 --cache=warm --group-size=1,8,16"
  rc = bench.main(argv.split() + [f"--impls={','.join(impls)}", f"--json={out_json}"])
  assert rc == 0
  records = json.loads(out_json.read_text())
  cond = [i for i in impls if i != "dense"]
  # The baseline runs once; every condensed impl once per group size.
  want = {("dense", 1)} | {(i, g) for i in cond for g in (1, 8, 16)}
  assert {(r["impl"], r["group_size"]) for r in records} == want
  assert len(records) == 2 * len(want)
  for r in records:
    g = r["group_size"]
    assert r["name"] == (r["impl"] if g == 1 else f"{r['impl']}@g{g}")
    # Whole groups are active, and the budget of 10% is kept.
    assert r["n_active"] % g == 0 and 0 < r["n_active"] * r["fan_in"] <= 0.1 * 96 * 48
    assert r["x_vs_dense_paired"] > 0


def test_grouped_benchmark_layer_shares_inputs_per_group():
  rng = np.random.default_rng(0)
  kernel, mask, bias = bench.make_layer(rng, 64, 32, 0.9, 0.25, np.float32, group_size=8)
  cols = mask.reshape(64, 4, 8)
  assert (cols == cols[:, :, :1]).all()  # a group's neurons share one mask column
  assert (cols.any(axis=(0, 2))).sum() == 3  # one group of four ablated
  assert set(mask.sum(axis=0)) == {0, int(64 * 32 * 0.1) // 24}
  fns, _, _, layer = bench.build_impls(
      ["dense", "condensed_xla"], kernel, mask, bias, np.float32, group_size=8
  )
  assert isinstance(layer, C.GroupedCondensedLayer) and layer.values.shape[-1] == 8
  x = rng.standard_normal((3, 64)).astype(np.float32)
  np.testing.assert_allclose(fns["condensed_xla"](x), fns["dense"](x), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="does not divide"):
    bench.make_layer(rng, 64, 30, 0.9, 0.25, np.float32, group_size=8)


def test_cold_cache_copies_exceed_the_cache():
  rng = np.random.default_rng(0)
  kernel, mask, bias = bench.make_layer(rng, 64, 32, 0.9, 0.1, np.float32)
  fns, nbytes, copies, _ = bench.build_impls(
      ["dense", "condensed_xla"], kernel, mask, bias, np.float32, cache="cold", cache_bytes=100_000
  )
  for impl in fns:
    assert copies[impl] * nbytes[impl] >= 2 * 100_000
  assert nbytes["dense"] == (64 * 32 + 32) * 4
  assert bench.llc_bytes() > 0


def test_paired_ratio_compares_calls_of_one_repeat():
  # b is twice as fast as a in two repeats of three; a load spike slowed b in
  # the other. The paired ratio says 2x; the ratio of medians would say 0.5x.
  a = [10.0, 1.0, 2.0]
  b = [5.0, 4.0, 1.0]
  res = timing.Timings({"a": a, "b": b})
  assert res.paired_ratio("a", "b") == 2.0
  assert res.median_us("a") / res.median_us("b") == 0.5


def test_benchmark_flags_keep_their_names(tmp_path):
  """The flags README.md and scripts/gpu_check.sh use parse; a bad impl is refused."""
  from srigl_jax.benchmarks import conv as conv_bench
  from srigl_jax.benchmarks import model as model_bench
  from srigl_jax.benchmarks import sparse_update

  fv = sparse_update.define_flags(flags.FlagValues())
  fv(["sparse_update", "--train_batch", "8", "--json", "s.json", "--skip_resnet50"])
  assert (fv.train_batch, fv.json, fv.skip_resnet50) == (8, "s.json", True)
  fv = model_bench.define_flags(flags.FlagValues())
  fv(["model", "--model=resnet50,vit_s16", "--sparsity=0.9", "--batch-sizes=1,64", "--workdir=w"])
  assert (fv.model, fv["batch-sizes"].value, fv.workdir) == (
      ["resnet50", "vit_s16"],
      ["1", "64"],
      "w",
  )
  fv = bench.define_flags(flags.FlagValues())
  fv(["condensed", "--json", "b.json", "--plot", "b.png", "--model", "--cache", "warm"])
  assert (fv.json, fv.plot, fv.model, fv.cache) == ("b.json", "b.png", True, "warm")
  with pytest.raises(flags.IllegalFlagValueError, match="unknown impls"):
    bench.main(["--impls", "dense,fast"])
  out = tmp_path / "conv.json"
  conv_bench.main(
      [
          "--layers=c18_32_3x3",
          "--sparsities=0.9",
          "--batches=1",
          "--impls=dense,structured,condensed_xla",
          "--repeats=2",
          "--budget=0",
          f"--json={out}",
      ]
  )
  result = json.loads(out.read_text())
  assert result["meta"]["cpu"] and result["meta"]["native_isa"]
  (rec,) = result["records"]
  assert set(rec["us"]) == {"dense", "structured", "condensed_xla"}
  for impl, rounds in rec["round_us"].items():
    assert len(rounds) == 2
    np.testing.assert_allclose(rec["us"][impl], np.median(rounds), atol=0.05)
    want = np.median(rec["round_us"]["dense"]) / np.median(rounds)
    np.testing.assert_allclose(rec["speedup_vs_dense"][impl], want, atol=0.005)


def test_gpu_check_script_runs_on_cpu(tmp_path):
  """scripts/gpu_check.sh without a GPU: toy kernel benchmark, model stage, train.json.

  The profile and training stages are srigl_jax.benchmarks.train_step (its
  parts are tested in test_gpu_bench.py) and take minutes here, so a
  profile, two finished runs and a trace are faked in the scratch folder.
  """
  script = pathlib.Path(__file__).parents[1] / "scripts" / "gpu_check.sh"
  subprocess.run(["bash", "-n", str(script)], check=True)
  out, work = tmp_path / "out", tmp_path / "work"
  for name, rate in (("train_vit_tiny_dense", 12.5), ("train_vit_tiny_srigl_d10", 12.0)):
    (work / "runs" / name).mkdir(parents=True)
    (work / "runs" / name / "summary.json").write_text(
        json.dumps({"steps_per_sec": rate, "final_step": 30, "model": "vit_tiny_test"})
    )
  profile = {"dense": {"no_update_ms": 10.0}, "srigl": {"no_update_ms": 10.2, "update_ms": 30.0}}
  (work / "profile.json").write_text(
      json.dumps({"platform": "cpu", "models": {"vit_tiny": profile}})
  )
  (work / "trace" / "plugins").mkdir(parents=True)
  (work / "trace" / "plugins" / "host.xplane.pb").write_bytes(b"x")
  env = dict(
      os.environ,
      PYTHON=sys.executable,
      GPU_CHECK_STAGES="preflight bench grouped model",
      GPU_CHECK_WORK=str(work),
      JAX_PLATFORMS="cpu",
  )
  proc = subprocess.run(
      ["bash", str(script), str(out)], env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "tiny=1" in proc.stdout
  # At most 8 files come back from a device call.
  assert sorted(p.name for p in out.iterdir()) == [
      "gpu_bench.json",
      "gpu_bench_grouped.json",
      "gpu_check.log",
      "logs.tar.gz",
      "model.json",
      "status.json",
      "trace.tar.gz",
      "train.json",
  ]
  status = json.loads((out / "status.json").read_text())
  assert status == {"preflight": 0, "bench": 0, "grouped": 0, "model": 0, "collect": 0}
  grouped = json.loads((out / "gpu_bench_grouped.json").read_text())["records"]
  assert {r["impl"] for r in grouped} == {
      "dense_fp32_highest",
      "grouped_xla_fp32",
      "grouped_pallas_bf16",
  }
  assert all(r["group_size"] == 4 for r in grouped if r["impl"].startswith("grouped_"))
  assert all(r["rel_err"] <= r["rel_err_bound"] for r in grouped)
  records = json.loads((out / "gpu_bench.json").read_text())["records"]
  assert {r["impl"] for r in records} == {
      "dense_fp32_highest",
      "structured_fp32_highest",
      "bcsr_fp32",
      "condensed_xla_fp32",
      "condensed_pallas_bf16",
  }
  assert all(r["in_features"] == 96 and r["rel_err"] <= r["rel_err_bound"] for r in records)
  model = json.loads((out / "model.json").read_text())
  assert {r["impl"] for r in model} == {"dense", "structured", "condensed"}
  assert all(r["max_rel_err"] <= 1e-4 for r in model)
  train = json.loads((out / "train.json").read_text())
  assert train["runs"]["train_vit_tiny_srigl_d10"]["steps_per_sec"] == 12.0
  target = train["srigl_vs_dense"]["models"]["vit_tiny"]
  # Runs 12.5 / 12 steps/s; profile (9 * 10.2 + 30) / 10 ms against 10 ms.
  assert target["run_ratio"] == pytest.approx(12.5 / 12.0)
  assert target["profile_ratio"] == pytest.approx(12.18 / 10.0)
  with tarfile.open(out / "logs.tar.gz") as tar:
    names = set(tar.getnames())
  assert {"./gpu_bench.log", "./profile.json", "./runs/train_vit_tiny_dense/summary.json"} <= names
  # The tables come last, then the status line.
  assert proc.stdout.index("device time per call (us), float32") < proc.stdout.index(
      "SRigL / dense step time, vit_tiny"
  )
  assert proc.stdout.rstrip().splitlines()[-1].startswith("gpu_check: status")


def test_input_benchmark_measures_both_pipelines(tmp_path, capsys):
  script = pathlib.Path(__file__).parents[1] / "scripts" / "input_benchmark.py"
  spec = importlib.util.spec_from_file_location("input_benchmark", script)
  input_bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(input_bench)

  out = tmp_path / "input.json"
  input_bench.main(
      [
          f"--out={out}",
          f'--data_dir={tmp_path / "data"}',
          "--num_images=40",
          "--rounds=1",
          "--workers=0",
          "--batches=1",
          "--seconds=0",
          "--warmup=0",
      ]
  )
  result = json.loads(out.read_text())
  rows = {(r["pipeline"], r["workers"]): r for r in result["rows"]}
  assert set(rows) == {("imagenet", 0), ("cifar", 0)}
  assert all(r["images_per_sec"] > 0 and len(r["samples"]) == 1 for r in rows.values())
  assert set(result["best"]) == {"imagenet", "cifar"}
  assert "avx" in result["machine"]["cpu"] or "(-)" in result["machine"]["cpu"]
  assert "images/s" in capsys.readouterr().out
