"""Block-size sweep of the Pallas condensed kernels on a GPU (JSON to argv[1]).

Times each configuration warm, as the mean of back-to-back calls (the GPU is
the bottleneck, so dispatch overlaps), next to XLA's dense matmul / conv on
the same shapes, at 90% sparsity: the 3072 -> 768 layer at batch 256 and 1,
and a ResNet 3x3 conv (28x28x128 -> 128) at batch 64.
"""

import dataclasses
import itertools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from srigl_jax import condensed as C


def mean_us(f, *args, n=50):
  jax.block_until_ready(f(*args))
  jax.block_until_ready(f(*args))
  t = time.perf_counter()
  for _ in range(n):
    y = f(*args)
  jax.block_until_ready(y)
  return (time.perf_counter() - t) / n * 1e6


def constant_fan_in(rng, fan, out, k, n_active):
  m = np.zeros((fan, out), bool)
  for j in rng.choice(out, n_active, replace=False):
    m[rng.choice(fan, k, replace=False), j] = True
  return m


def main(out_path):
  rng = np.random.default_rng(0)
  records = []
  # Dense layer 3072 -> 768, 90%, 10% ablated.
  fan, out = 3072, 768
  mask = constant_fan_in(rng, fan, out, int(fan * out * 0.1) // 691, 691)
  w = (rng.standard_normal((fan, out)) * mask).astype(np.float32)
  layer = C.condense_dense(w, mask, np.zeros(out, np.float32))
  for batch, dtype in itertools.product((256, 1), (jnp.float32, jnp.bfloat16)):
    x = jnp.asarray(rng.standard_normal((batch, fan)), dtype)
    lay = layer.replace(values=layer.values.astype(dtype))
    wd = jnp.asarray(w, dtype)
    dense = mean_us(jax.jit(lambda x, w: x @ w), x, wd)
    for bn, bb, nw, un in itertools.product((16, 32, 64, 128), (16, 64, 128), (4, 8), (1, 4)):
      if batch == 1 and bb != 16:
        continue
      bs = C.BlockSizes(block_neurons=bn, block_batch=bb, num_warps=nw, unroll=un)
      try:
        us = mean_us(
            jax.jit(lambda x, l, bs=bs: C.condensed_matmul_pallas(x, l, block_sizes=bs)), x, lay
        )
      except Exception as e:  # pylint: disable=broad-except
        us = None
        print("failed", bs, type(e).__name__, str(e)[:100])
      records.append(
          dict(
              kernel="dense",
              batch=batch,
              dtype=jnp.dtype(dtype).name,
              dense_us=dense,
              pallas_us=us,
              **dataclasses.asdict(bs),
          )
      )
    best = min(
        (
            r
            for r in records
            if r["kernel"] == "dense"
            and r["batch"] == batch
            and r["dtype"] == jnp.dtype(dtype).name
            and r["pallas_us"]
        ),
        key=lambda r: r["pallas_us"],
    )
    print(
        f"dense layer b={batch} {jnp.dtype(dtype).name}: XLA dense {dense:.1f} us, best pallas "
        f"{best['pallas_us']:.1f} us ({dense / best['pallas_us']:.2f}x) with {best}"
    )
  # Conv 3x3 28x28x128 -> 128, 90%.
  cin = cout = 128
  fan = 9 * cin
  mask = constant_fan_in(rng, fan, cout, int(fan * cout * 0.1) // 115, 115).reshape(3, 3, cin, cout)
  w = (rng.standard_normal(mask.shape) * mask).astype(np.float32)
  conv = C.condense_conv(w, mask, None, strides=(1, 1), padding="SAME", input_hw=(28, 28))
  x = jnp.asarray(rng.standard_normal((64, 28, 28, cin)), jnp.float32)
  dense = mean_us(
      jax.jit(
          lambda x, w: jax.lax.conv_general_dilated(
              x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
          )
      ),
      x,
      jnp.asarray(w),
  )
  for bn, bc, nw in itertools.product((16, 32, 64), (64, 128, 256), (4, 8)):
    bs = C.ConvBlockSizes(block_neurons=bn, block_cols=bc, num_warps=nw)
    try:
      us = mean_us(
          jax.jit(lambda x, l, bs=bs: C.condensed_conv_pallas(x, l, block_sizes=bs)), x, conv
      )
    except Exception as e:  # pylint: disable=broad-except
      us = None
      print("failed", bs, type(e).__name__, str(e)[:100])
    records.append(
        dict(
            kernel="conv3x3",
            batch=64,
            dtype="float32",
            dense_us=dense,
            pallas_us=us,
            **dataclasses.asdict(bs),
        )
    )
  best = min(
      (r for r in records if r["kernel"] == "conv3x3" and r["pallas_us"]),
      key=lambda r: r["pallas_us"],
  )
  print(
      f"conv 3x3 b=64: XLA dense {dense:.1f} us, best pallas {best['pallas_us']:.1f} us "
      f"({dense / best['pallas_us']:.2f}x) with {best}"
  )
  with open(out_path, "w") as f:
    json.dump({"device": str(jax.devices()[0]), "records": records}, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1])
