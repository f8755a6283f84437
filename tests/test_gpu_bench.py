"""The GPU benchmarks (srigl_jax.benchmarks.gpu, .train_step) on a CPU, and their arithmetic.

The timing formula, the call planning, the FLOP and byte counts and the floor
are checked against numbers computed by hand; the chained-call program
against what XLA compiles; a run of ``--tiny`` for its JSON: every registered
kernel present with its precision label and within its error bound. For the
training stage: the step time at a delta, the order of the runs, the merge
of profile and runs into the SRigL-vs-dense target, and that pinning the
optimizer's count decides whether the mask update runs.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import srigl_jax.condensed as C
from srigl_jax import timing
from srigl_jax.benchmarks import gpu, train_step
from srigl_jax.sparsity import transform as sparse_transform


def test_per_call_seconds_is_the_difference_over_the_extra_calls():
  # 100 calls in 10.5 ms, the empty program 0.5 ms: 0.1 ms per call.
  assert timing.per_call_seconds(10.5e-3, 0.5e-3, 100, 0) == pytest.approx(1e-4)
  # Against a 1-call program of 0.6 ms: 9.9 ms over 99 calls.
  assert timing.per_call_seconds(10.5e-3, 0.6e-3, 100, 1) == pytest.approx(1e-4)
  with pytest.raises(ValueError, match="more calls"):
    timing.per_call_seconds(1.0, 1.0, 1, 1)


def test_chained_calls_make_every_call_behind_a_barrier():
  fn = lambda x, p: jnp.sin(x) * p
  xs = tuple(jnp.arange(4.0) + 10 * i for i in range(5))
  ps = tuple(jnp.float32(i + 2) for i in range(5))
  program = timing.chained_calls(fn, 5)
  outs = program(xs, ps)
  assert len(outs) == 5
  for x, p, out in zip(xs, ps, outs):
    np.testing.assert_allclose(out, np.sin(np.asarray(x)) * float(p), rtol=1e-6)
  # Each call's arguments, with the previous output, pass one barrier.
  text = program.lower(xs, ps).as_text()
  assert text.count("stablehlo.optimization_barrier") == 5, text
  # Every call is compiled; none dropped or merged.
  assert program.lower(xs, ps).compile().as_text().count(" sine(") == 5
  # The empty program takes the same arguments (none pruned).
  empty = timing.chained_calls(fn, 0)
  assert empty.lower(xs, ps).compile().as_text().count(" parameter(") == 10


def test_device_busy_counts_overlap_once():
  # [0, 10) and [5, 15) overlap by 5; [20, 25) stands alone.
  assert timing.device_busy([(20, 25), (0, 10), (5, 15)]) == (20, 25, 25)
  assert timing.device_busy([(0, 4), (4, 8)]) == (8, 8, 8)
  assert timing.device_busy([]) == (0, 0, 0)


def test_plan_calls():
  # 50 us per call and a 5 ms target want 100 calls: capped at 64.
  assert gpu.plan_calls(50e-6, 10**7, 10**8, 5e-3, 8, 64) == 64
  # A slow call (10 ms) still gets the 10 sets of 10 MB a 100 MB cache needs.
  assert gpu.plan_calls(10e-3, 10**7, 10**8, 5e-3, 8, 64) == 10
  # Otherwise at least min_calls.
  assert gpu.plan_calls(10e-3, 10**9, 10**8, 5e-3, 8, 64) == 8
  # Tiny sets: as many as the calls allow.
  assert gpu.plan_calls(1e-3, 1000, 10**8, 5e-3, 8, 64) == 64


def _tiny_layer():
  """8 -> 4, neurons 0-2 with fan-in 2, neuron 3 ablated."""
  mask = np.zeros((8, 4), bool)
  mask[[0, 5], 0] = mask[[1, 2], 1] = mask[[3, 7], 2] = True
  rng = np.random.default_rng(0)
  kernel = rng.standard_normal((8, 4)).astype(np.float32)
  bias = rng.standard_normal(4).astype(np.float32)
  return kernel, mask, bias


def test_counts_of_a_tiny_layer_by_hand():
  kernel, mask, bias = _tiny_layer()
  f32 = jnp.float32
  batch = 2
  # Input 2 x 8 x 4 B = 64 B, output 2 x 4 x 4 B = 32 B.
  io = 64 + 32
  layer = C.condense_dense(np.where(mask, kernel, 0), mask, bias)
  # Condensed: values 3x2 f32 (24 B), indices 3x2 int16 (12 B), neuron ids
  # 3 int32 (12 B), bias 4 f32 (16 B); 6 MACs per row.
  assert gpu.case_counts("nnz", mask, layer, batch, f32) == (2 * 6 * 2, 24 + 12 + 12 + 16 + io)
  # Dense: 8x4 f32 kernel (128 B) and bias (16 B); 32 MACs per row.
  dense = {"w": jnp.zeros((8, 4), f32), "b": jnp.zeros(4, f32)}
  assert gpu.case_counts("dense", mask, dense, batch, f32) == (2 * 32 * 2, 128 + 16 + io)
  # Structured: the 3 active neurons' 8x3 kernel (96 B), ids (12 B), bias; 24 MACs.
  s = C.structured_from_mask(np.where(mask, kernel, 0), mask, bias)
  params = {"kernel": s.kernel, "ids": s.neuron_ids, "bias": s.bias}
  assert gpu.case_counts("active", mask, params, batch, f32) == (2 * 24 * 2, 96 + 12 + 16 + io)
  # bf16 halves the input and output.
  assert gpu.case_counts("dense", mask, {}, 1, jnp.bfloat16) == (64, 8 * 2 + 4 * 2)
  # 24 FLOPs at 1 kFLOP/s is 24 ms; 160 B at 100 B/s is 1.6 s: bytes bound.
  assert gpu.floor_seconds(24, 160, 1e3, 1e2) == (pytest.approx(1.6), "bytes")
  assert gpu.floor_seconds(24, 160, 10.0, 1e3) == (pytest.approx(2.4), "flops")


def test_rel_err_and_the_precision_it_points_to():
  ref = np.array([[3.0, 4.0]])
  assert gpu.rel_err(jnp.asarray(ref, jnp.float32), ref) == 0.0
  assert gpu.rel_err(jnp.array([[3.0, 4.0 + 5e-3]]), ref) == pytest.approx(1e-3, rel=1e-3)
  assert gpu.rel_err(jnp.array([[np.nan, 4.0]]), ref) == float("inf")
  assert gpu.rel_err(jnp.array([3.0, 4.0]), ref) == float("inf")  # wrong shape
  seen = [gpu.precision_seen(e) for e in (1e-7, 3e-4, 4e-3, 0.1, float("inf"))]
  assert seen == ["fp32", "tf32", "bf16", "wrong", "wrong"]


def test_check_fails_a_kernel_that_leaves_outputs_unwritten():
  kernel, mask, bias = _tiny_layer()
  good = gpu.IMPLS["condensed_xla_fp32"].build(kernel, mask, bias, jnp.float32)
  rng = np.random.default_rng(1)
  assert gpu.check(jax.jit(good.fn), good, 3, jnp.float32, rng) < 1e-6
  # Column 2 never written: it holds whatever was there (here the poison or zero).
  lazy = lambda x, l: good.fn(x, l).at[:, 2].set(jnp.nan)
  assert gpu.check(jax.jit(lazy), good, 3, jnp.float32, rng) == float("inf")
  half = lambda x, l: good.fn(x, l).at[:, 2].set(0.0)
  assert gpu.check(jax.jit(half), good, 3, jnp.float32, rng) > 1e-2


def _records(path):
  result = json.loads(path.read_text())
  return result["meta"], result["records"]


def test_tiny_run_writes_every_impl_checked_and_floored(tmp_path):
  out = tmp_path / "gpu.json"
  assert gpu.main(["--tiny", f"--json={out}"]) == 0
  meta, records = _records(out)
  assert meta["platform"] == "cpu" and meta["jax_version"] == jax.__version__
  used = meta["ceilings"]["used"]
  assert used["bandwidth"] > 0 and set(used["rates"]) == {"fp32", "bf16"}
  plain = {name for name, impl in gpu.IMPLS.items() if not impl.grouped}
  assert {r["impl"] for r in records} == plain
  for name in set(gpu.IMPLS) - plain:
    assert meta["skipped_impls"][name] == "needs --group-size > 1"
  for r in records:
    impl = gpu.IMPLS[r["impl"]]
    # Off GPUs the default-precision dot is plain fp32 (TF32 only on GPUs).
    want = {"fp32_default": "fp32"}.get(impl.precision, impl.precision)
    assert r["precision"] == want and r["dtype"] == impl.dtype, r
    assert r["rel_err"] <= r["rel_err_bound"] == gpu.REL_ERR_BOUNDS[want], r
    assert r["device_kind"] and r["jax_version"] == jax.__version__
    assert r["sparsity"] == (None if impl.work == "dense" else 0.9)
    # The floor is the larger of the two times, at the rates the meta records.
    t_flops = r["flops"] / used["rates"][r["unit"]]
    t_bytes = r["bytes"] / used["bandwidth"]
    assert r["floor_us"] == pytest.approx(max(t_flops, t_bytes) * 1e6)
    assert r["floor_kind"] == ("flops" if t_flops >= t_bytes else "bytes")
    if r["device_time_us"] > 0:
      assert r["fraction_of_floor"] == pytest.approx(r["floor_us"] / r["device_time_us"])
    assert r["e2e_us"] > 0 and r["calls"] >= 2
    # No device plane in a CPU trace: the profiler's fields are there, empty.
    assert r["profiler_busy_us"] is None and r["profiler_overlap"] is None
  # Hand count for one record: condensed, 96 -> 40 at 90%, 4 ablated neurons.
  (rec,) = [r for r in records if r["impl"] == "condensed_pallas_fp32"]
  nnz = rec["n_active"] * rec["fan_in"]
  assert (rec["n_active"], rec["fan_in"]) == (36, 10)
  assert rec["flops"] == 2 * nnz * 3
  assert rec["bytes"] == nnz * (4 + 2) + 36 * 4 + 40 * 4 + 3 * (96 + 40) * 4


def test_a_registered_impl_is_benchmarked(tmp_path, monkeypatch):
  """A new kernel is one `register` call; a grouped one runs on a group-shared layer."""
  monkeypatch.setattr(gpu, "IMPLS", dict(gpu.IMPLS))
  base = gpu.IMPLS["condensed_xla_fp32"]
  gpu.register(dataclasses.replace(base, name="my_kernel_fp32"))
  with pytest.raises(ValueError, match="already"):
    gpu.register(base)
  seen = []

  def build_grouped(kernel, mask, bias, dtype, *, group_size):
    seen.append((group_size, mask))
    return base.build(kernel, mask, bias, dtype)

  gpu.register(dataclasses.replace(base, name="my_grouped_fp32", build=build_grouped, grouped=True))
  out = tmp_path / "gpu.json"
  # No table entry for the CPU: the ceilings must be measured there.
  with pytest.raises(ValueError, match="no ceilings"):
    gpu.main(["--tiny", "--nomeasure-ceilings", "--impls=my_kernel_fp32"])
  args = ["--tiny", "--profile=none", f"--json={out}"]
  assert gpu.main([*args, "--impls=dense_bf16,my_kernel_fp32,my_grouped_fp32"]) == 0
  meta, records = _records(out)
  assert [r["impl"] for r in records] == ["dense_bf16", "my_kernel_fp32"]
  assert meta["skipped_impls"] == {"my_grouped_fp32": "needs --group-size > 1"}
  assert gpu.main([*args, "--group-size=4", "--impls=my_grouped_fp32,my_kernel_fp32"]) == 0
  _, records = _records(out)
  assert [(r["impl"], r["group_size"]) for r in records] == [
      ("my_grouped_fp32", 4),
      ("my_kernel_fp32", 4),
  ]
  # The builder got G and a mask whose 4 consecutive columns share their inputs.
  ((g, mask),) = seen
  assert g == 4 and (mask.reshape(96, 10, 4) == mask[:, ::4, None]).all()
  assert records[0]["rel_err"] <= records[0]["rel_err_bound"]


def test_group_shared_layer():
  rng = np.random.default_rng(0)
  kernel, mask, bias = gpu.group_shared_layer(rng, 64, 32, 0.9, 0.25, 4)
  assert kernel.shape == mask.shape == (64, 32) and bias.shape == (32,)
  groups = mask.reshape(64, 8, 4)
  assert (groups == groups[:, :, :1]).all()  # one index set per group
  fan_in = mask.sum(axis=0)
  assert set(fan_in) == {0, int(fan_in.max())}  # constant fan-in, whole groups ablated
  assert (fan_in == 0).sum() == 8  # round(8 * 0.25) = 2 groups of 4
  with pytest.raises(ValueError, match="does not divide"):
    gpu.group_shared_layer(rng, 64, 30, 0.9, 0.25, 4)


# ------------------------------------------------------------ train_step


def test_step_time_at_a_delta_and_against_dense():
  # 99 steps of 10 ms and one of 110 ms: 11 ms a step; at delta 20, 15 ms.
  assert train_step.step_time_at(100, 10.0, 110.0) == pytest.approx(11.0)
  assert train_step.step_time_at(20, 10.0, 110.0) == pytest.approx(15.0)
  profile = {
      "m": {
          "dense": {"no_update_ms": 10.0},
          "srigl": {"no_update_ms": 10.0, "update_ms": 110.0},
      }
  }
  derived = train_step.derive(profile, [100, 20])["m"]
  assert derived["dense"] == {"step_ms": 10.0, "steps_per_sec": 100.0, "vs_dense": 1.0}
  assert derived["srigl_d100"]["vs_dense"] == pytest.approx(1.1)
  assert derived["srigl_d20"]["steps_per_sec"] == pytest.approx(1e3 / 15.0)


def test_run_order_puts_the_target_first():
  order = train_step.run_order(["a", "b"], ["dense", "srigl", "rigl"], [100, 20])
  assert order == [
      ("a", "dense", None),
      ("a", "srigl", 100),
      ("b", "dense", None),
      ("b", "srigl", 100),
      ("a", "rigl", 100),
      ("b", "rigl", 100),
      ("a", "srigl", 20),
      ("a", "rigl", 20),
      ("b", "srigl", 20),
      ("b", "rigl", 20),
  ]
  assert train_step.run_name("vit_s16", "srigl", 20) == "train_vit_s16_srigl_d20"
  assert train_step.run_name("vit_s16", "dense", None) == "train_vit_s16_dense"


def test_collect_merges_the_profile_and_the_runs(tmp_path):
  for name, rate in (("train_vit_s16_dense", 50.0), ("train_vit_s16_srigl_d100", 49.0)):
    (tmp_path / name).mkdir()
    (tmp_path / name / "summary.json").write_text(
        json.dumps({"steps_per_sec": rate, "final_step": 300})
    )
  profile = {
      "models": {
          "vit_s16": {
              "dense": {"no_update_ms": 20.0},
              "srigl": {"no_update_ms": 21.0, "update_ms": 120.0},
          }
      }
  }
  result = train_step.collect(str(tmp_path), profile, ["vit_s16"], [100, 20])
  assert result["runs"]["train_vit_s16_dense"]["steps_per_sec"] == 50.0
  target = result["srigl_vs_dense"]
  assert target["delta"] == 100 and target["target"] == 1.05
  # Profile: (99 * 21 + 120) / 100 = 21.99 ms against 20; runs: 50 / 49.
  (t,) = target["models"].values()
  assert t["profile_ratio"] == pytest.approx(21.99 / 20)
  assert t["run_ratio"] == pytest.approx(50 / 49)
  assert t["within_5pct"] is False
  assert train_step.collect(None, None, ["vit_s16"], [100])["srigl_vs_dense"]["models"] == {}


def test_pinned_count_decides_whether_the_mask_update_runs():
  params = {"Dense_0": {"kernel": jnp.ones((16, 8)), "bias": jnp.zeros(8)}}
  tx = sparse_transform.srigl(
      optax.sgd(0.1), sparsity=0.5, key=jax.random.key(0), stop_step=100, update_every=5
  )
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx)
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape) * 10, params)
  masks = lambda s: sparse_transform.get_masks(s.opt_state)["Dense_0"]["kernel"]

  def step(count):
    pinned = train_step._pin_count(state, count)
    assert int(sparse_transform.find_sparse_state(pinned.opt_state).count) == count
    return pinned.apply_gradients(grads=grads)

  # count 4: step 5 is an update step, the masks move; count 1: they stay.
  assert (masks(step(4)) != masks(state)).any()
  assert (masks(step(1)) == masks(state)).all()


def test_command_buffers_are_serialised_before_the_backend_starts():
  """The flag is known to this XLA (an unknown one would abort the run on the GPU)."""
  code = (
      "import os, jax\n"
      "from srigl_jax.benchmarks import gpu\n"
      "print(gpu.serialize_command_buffers(), os.environ['XLA_FLAGS'])\n"
      "jax.devices()\n"
      "print(gpu.serialize_command_buffers())\n"
  )
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(
      [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
  ).stdout.split("\n")
  assert out[0] == f"set {gpu.SERIALIZE_FLAG}"
  assert out[1] == "already set"


def test_tiny_run_of_the_grouped_impls(tmp_path):
  out = tmp_path / "gpu.json"
  grouped = [name for name, impl in gpu.IMPLS.items() if impl.grouped]
  assert grouped, "the grouped kernels are registered"
  impls = ",".join(["dense_fp32_highest", *grouped])
  assert gpu.main(["--tiny", "--group-size=4", f"--impls={impls}", f"--json={out}"]) == 0
  _, records = _records(out)
  assert {r["impl"] for r in records} == {"dense_fp32_highest", *grouped}
  for r in records:
    if r["impl"] in grouped:
      assert r["group_size"] == 4
      # Checked against the float64 product of the same group-shared layer.
      assert r["rel_err"] < (1e-2 if r["dtype"] == "bfloat16" else 1e-5), r
