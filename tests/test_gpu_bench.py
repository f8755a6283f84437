"""The GPU benchmark (srigl_jax.benchmarks.gpu) in its tiny CPU mode, and its arithmetic.

The timing formula, the call planning, the FLOP and byte counts and the floor
are checked against numbers computed by hand; the chained-call program
against what XLA compiles; a run of ``--tiny`` for its JSON: every registered
kernel present with its precision label and within its error bound.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import srigl_jax.condensed as C
from srigl_jax import timing
from srigl_jax.benchmarks import gpu


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
  assert gpu.device_busy([(20, 25), (0, 10), (5, 15)]) == (20, 25, 25)
  assert gpu.device_busy([(0, 4), (4, 8)]) == (8, 8, 8)
  assert gpu.device_busy([]) == (0, 0, 0)


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
  assert {r["impl"] for r in records} == set(gpu.IMPLS)
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
  """A new kernel is one `register` call (as the grouped kernels will be)."""
  monkeypatch.setattr(gpu, "IMPLS", dict(gpu.IMPLS))
  base = gpu.IMPLS["dense_fp32_highest"]
  gpu.register(dataclasses.replace(base, name="my_kernel_fp32", work="nnz", baseline=False))
  with pytest.raises(ValueError, match="already"):
    gpu.register(base)
  out = tmp_path / "gpu.json"
  # No table entry for the CPU: the ceilings must be measured there.
  with pytest.raises(ValueError, match="no ceilings"):
    gpu.main(["--tiny", "--nomeasure-ceilings", "--impls=my_kernel_fp32"])
  assert gpu.main(["--tiny", "--impls=dense_bf16,my_kernel_fp32", f"--json={out}"]) == 0
  _, records = _records(out)
  assert [r["impl"] for r in records] == ["dense_bf16", "my_kernel_fp32"]
  assert records[1]["sparsity"] == 0.9 and records[1]["precision"] == "fp32"
