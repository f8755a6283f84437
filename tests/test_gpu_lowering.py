"""Every Pallas kernel lowers for CUDA with its default block sizes.

Checked from a CPU-only machine by cross-platform export: `jax.export` runs
the full Pallas -> Triton lowering for the "cuda" platform without a GPU, so
a kernel that only a GPU machine would reject (an unsupported op, a loop
option the Triton lowering lacks) fails here, in CI. The Triton custom call
itself is not a stable-export target, hence the disabled safety check.

To add a kernel, append one `pytest.param` to `KERNELS`: a function
``(dtype, index_dtype, batch) -> (fn, args)`` whose ``fn(*args)`` calls the
kernel with its default block sizes. The GPU benchmark's programs
(`srigl_jax.benchmarks.gpu`: chained calls of every registered impl, the
Pallas ones at the paper's 3072 -> 768 layer) are exported the same way, so
a kernel registered there is checked here without another line.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import srigl_jax.condensed as C
from srigl_jax import timing
from srigl_jax.benchmarks import condensed as condensed_bench
from srigl_jax.benchmarks import gpu as gpu_bench

TRITON_CALL = "__gpu$xla.gpu.triton"


def _dense_case(dtype, index_dtype, batch):
  """`condensed_matmul(impl="pallas")` on an awkward 300 -> 70 layer."""
  rng = np.random.default_rng(0)
  fan_in, out, k, n_active = 300, 70, 29, 61
  mask = np.zeros((fan_in, out), bool)
  for j in rng.choice(out, n_active, replace=False):
    mask[rng.choice(fan_in, k, replace=False), j] = True
  kernel = rng.standard_normal((fan_in, out)).astype(np.float32)
  layer = C.condense_dense(kernel, mask, rng.standard_normal(out).astype(np.float32))
  layer = layer.replace(
      values=layer.values.astype(dtype),
      indices=layer.indices.astype(index_dtype),
      bias=layer.bias.astype(dtype),
  )
  x = jnp.asarray(rng.standard_normal((batch, fan_in)), dtype)
  return (lambda x, layer: C.condensed_matmul(x, layer, impl="pallas")), (x, layer)


def _conv_case(kernel_size, strides, dtype, index_dtype, batch):
  """`condensed_conv(impl="pallas")` on a 15x15 SAME conv with 21 of 24 channels active."""
  rng = np.random.default_rng(0)
  kh, kw = kernel_size
  cin, cout, n_active = (3 if kh == 7 else 16), 24, 21
  fan = kh * kw * cin
  mask = np.zeros((fan, cout), bool)
  for j in rng.choice(cout, n_active, replace=False):
    mask[rng.choice(fan, max(1, fan // 10), replace=False), j] = True
  kernel = rng.standard_normal((kh, kw, cin, cout)).astype(np.float32)
  layer = C.condense_conv(
      kernel,
      mask.reshape(kernel.shape),
      rng.standard_normal(cout).astype(np.float32),
      strides=strides,
      padding="SAME",
      index_dtype=index_dtype,
  )
  layer = layer.replace(values=layer.values.astype(dtype), bias=layer.bias.astype(dtype))
  x = jnp.asarray(rng.standard_normal((batch, 15, 15, cin)), dtype)
  return (lambda x, layer: C.condensed_conv(x, layer, impl="pallas")), (x, layer)


def _grouped_mask(rng, fan_in, out, group_size, k, n_active_groups):
  gmask = np.zeros((fan_in, out // group_size), bool)
  for g in rng.choice(out // group_size, n_active_groups, replace=False):
    gmask[rng.choice(fan_in, k, replace=False), g] = True
  return np.repeat(gmask, group_size, axis=1)


def _grouped_dense_case(group_size, dtype, index_dtype, batch):
  """`condensed_matmul(impl="pallas")` on a grouped 300 -> 96 layer, k = 29."""
  rng = np.random.default_rng(0)
  fan_in, out = 300, 96
  mask = _grouped_mask(rng, fan_in, out, group_size, 29, out // group_size - 1)
  kernel = rng.standard_normal((fan_in, out)).astype(np.float32)
  layer = C.condense_grouped_dense(
      kernel, mask, rng.standard_normal(out).astype(np.float32), group_size=group_size
  )
  layer = layer.replace(
      values=layer.values.astype(dtype),
      indices=layer.indices.astype(index_dtype),
      bias=layer.bias.astype(dtype),
  )
  x = jnp.asarray(rng.standard_normal((batch, fan_in)), dtype)
  return (lambda x, layer: C.condensed_matmul(x, layer, impl="pallas")), (x, layer)


def _grouped_conv_case(kernel_size, strides, group_size, dtype, index_dtype, batch):
  """`condensed_conv(impl="pallas")` on a grouped 15x15 SAME conv, one group ablated."""
  rng = np.random.default_rng(0)
  kh, kw = kernel_size
  cin, cout = (3 if kh == 7 else 16), 32
  fan = kh * kw * cin
  mask = _grouped_mask(rng, fan, cout, group_size, max(1, fan // 10), cout // group_size - 1)
  kernel = rng.standard_normal((kh, kw, cin, cout)).astype(np.float32)
  layer = C.condense_grouped_conv(
      kernel,
      mask.reshape(kernel.shape),
      rng.standard_normal(cout).astype(np.float32),
      group_size=group_size,
      strides=strides,
      padding="SAME",
      index_dtype=index_dtype,
  )
  layer = layer.replace(values=layer.values.astype(dtype), bias=layer.bias.astype(dtype))
  x = jnp.asarray(rng.standard_normal((batch, 15, 15, cin)), dtype)
  return (lambda x, layer: C.condensed_conv(x, layer, impl="pallas")), (x, layer)


KERNELS = [
    pytest.param(_dense_case, id="dense"),
    pytest.param(functools.partial(_conv_case, (1, 1), (1, 1)), id="conv1x1"),
    pytest.param(functools.partial(_conv_case, (3, 3), (1, 1)), id="conv3x3s1"),
    pytest.param(functools.partial(_conv_case, (3, 3), (2, 2)), id="conv3x3s2"),
    pytest.param(functools.partial(_conv_case, (7, 7), (2, 2)), id="conv7x7s2"),
    pytest.param(functools.partial(_grouped_dense_case, 8), id="grouped_dense_g8"),
    pytest.param(functools.partial(_grouped_dense_case, 2), id="grouped_dense_g2"),
    pytest.param(
        functools.partial(_grouped_conv_case, (3, 3), (2, 2), 16), id="grouped_conv3x3s2_g16"
    ),
    pytest.param(functools.partial(_grouped_conv_case, (1, 1), (1, 1), 4), id="grouped_conv1x1_g4"),
]


def export_for_cuda(fn, *args):
  return jax.export.export(
      jax.jit(fn),
      platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)],
  )(*args)


@pytest.mark.parametrize("batch", [1, 2048])
@pytest.mark.parametrize("index_dtype", [jnp.int16, jnp.int32], ids=["int16", "int32"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", KERNELS)
def test_pallas_kernel_lowers_for_cuda(case, dtype, index_dtype, batch):
  fn, args = case(dtype, index_dtype, batch)
  exported = export_for_cuda(fn, *args)
  assert exported.platforms == ("cuda",)
  # The kernel really went through the Triton lowering, not an XLA fallback.
  assert TRITON_CALL in exported.mlir_module()
  out = jax.eval_shape(fn, *args)
  assert exported.out_avals[0].shape == out.shape
  assert exported.out_avals[0].dtype == out.dtype == dtype


# The group size grouped impls are exported with (a group-shared layer).
GROUP_SIZE = 4


@functools.cache
def _bench_layer(fan_in, out, sparsity, group_size=1):
  rng = np.random.default_rng(0)
  ablation = condensed_bench.DEFAULT_ABLATION[sparsity]
  return gpu_bench.group_shared_layer(rng, fan_in, out, sparsity, ablation, group_size)


def _export_bench_program(monkeypatch, name, shape, sparsity, batch):
  """The benchmark's two-call chained program of ``name``, exported for CUDA."""
  monkeypatch.setattr(gpu_bench, "PALLAS_INTERPRET", False)
  impl = gpu_bench.IMPLS[name]
  extra = {"group_size": GROUP_SIZE} if impl.grouped else {}
  layer = _bench_layer(*shape, sparsity, GROUP_SIZE if impl.grouped else 1)
  built = impl.build(*layer, jnp.dtype(impl.dtype), **extra)
  x = jnp.zeros((batch, layer[0].shape[0]), impl.dtype)
  return export_for_cuda(timing.chained_calls(built.fn, 2), (x, x), (built.params, built.params))


@pytest.mark.parametrize("name", [n for n, i in gpu_bench.IMPLS.items() if "gpu" in i.platforms])
def test_every_gpu_benchmark_program_lowers_for_cuda(monkeypatch, name):
  """Each registered impl's chained program, on a small layer of the benchmark's kind."""
  exported = _export_bench_program(monkeypatch, name, (384, 96), 0.9, 16)
  assert exported.platforms == ("cuda",)
  assert len(exported.out_avals) == 2
  assert (TRITON_CALL in exported.mlir_module()) == ("pallas" in name)
  assert exported.out_avals[0].shape == (16, 96)


@pytest.mark.parametrize("batch", [1, 2048])
@pytest.mark.parametrize("sparsity", [0.9, 0.99])
@pytest.mark.parametrize("name", [n for n in gpu_bench.IMPLS if "pallas" in n])
def test_benchmark_pallas_kernels_lower_at_the_paper_layer(monkeypatch, name, sparsity, batch):
  """The Pallas kernels at the sizes the GPU run times: 3072 -> 768, batch 1 and 2048."""
  exported = _export_bench_program(monkeypatch, name, (3072, 768), sparsity, batch)
  # (The two calls share one lowered function.)
  assert TRITON_CALL in exported.mlir_module()
  assert [a.shape for a in exported.out_avals] == [(batch, 768)] * 2
