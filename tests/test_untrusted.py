"""Condensed layers whose arrays are wrong: refused with a message, never read out of range.

The native kernels are called on crafted arrays (indices and taps past the
end or negative, neuron ids out of range, unsorted or repeated, shapes that
disagree, geometry attributes out of range) in a child process, so that a
crash fails its case instead of ending the test run. The same arrays are
refused by ``validate()`` on the host, which `convert_model` and the serving
loader run for every kernel. A layer called after another request returns
what it returns on a first call, bit for bit; an empty batch returns an
empty result.
"""

import json
import os
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from srigl_jax import condensed as C
from srigl_jax.condensed import _native_lib, dispatch

NATIVE = C.native_available() and jax.default_backend() == "cpu"
needs_native = pytest.mark.skipif(not NATIVE, reason=f"no native kernels: {C.native_error()}")

# Dense: 40 inputs, 12 outputs of which 9 active, 5 inputs each.
IN, OUT, K, ACTIVE = 40, 12, 5, 9
# Conv: 3x3 over 4 channels (36 taps), 20 output channels of which 15 active.
KH, KW, CIN, COUT, TAPS, ACTIVE_C = 3, 3, 4, 20, 7, 15
FAN = KH * KW * CIN


def dense_layer(index_dtype=np.int16, **replace):
  """The Dense test layer, with arrays in `replace` swapped in (as numpy)."""
  rng = np.random.default_rng(0)
  mask = np.zeros((IN, OUT), bool)
  for j in rng.choice(OUT, ACTIVE, replace=False):
    mask[rng.choice(IN, K, replace=False), j] = True
  kernel = rng.standard_normal((IN, OUT)).astype(np.float32)
  bias = rng.standard_normal(OUT).astype(np.float32)
  layer = C.condense_dense(kernel, mask, bias, index_dtype=index_dtype)
  return layer.replace(**{k: jnp.asarray(v) for k, v in replace.items()})


def conv_layer(index_dtype=np.int16, **replace):
  """The conv test layer (SAME padding), with arrays in `replace` swapped in."""
  rng = np.random.default_rng(1)
  mask = np.zeros((FAN, COUT), bool)
  for j in rng.choice(COUT, ACTIVE_C, replace=False):
    mask[rng.choice(FAN, TAPS, replace=False), j] = True
  kernel = rng.standard_normal((KH, KW, CIN, COUT)).astype(np.float32)
  bias = rng.standard_normal(COUT).astype(np.float32)
  layer = C.condense_conv(
      kernel, mask.reshape(KH, KW, CIN, COUT), bias, padding="SAME", index_dtype=index_dtype
  )
  return layer.replace(**{k: jnp.asarray(v) for k, v in replace.items()})


def edited(array, pos, value, dtype=None):
  a = np.array(array, dtype=dtype)
  a[pos] = value
  return a


def dense_indices(pos, value, dtype=np.int16):
  return {"indices": edited(dense_layer(dtype).indices, pos, value)}


def x_dense(batch, features=IN):
  return jnp.asarray(np.random.default_rng(2).standard_normal((batch, features)), jnp.float32)


def x_conv(batch, hw=6, cin=CIN):
  return jnp.asarray(np.random.default_rng(3).standard_normal((batch, hw, hw, cin)), jnp.float32)


def conv_call(layer, x, out_shape=None, **attrs):
  """The native conv FFI call with geometry attributes given directly."""
  # The geometry of an input with the layer's channels, whatever x has.
  geo = layer.for_input((*x.shape[:3], layer.in_channels)).geometry
  (pt, pb), (pl, pr) = geo.pads
  args = dict(kh=KH, kw=KW, sh=1, sw=1, pad_top=pt, pad_bottom=pb, pad_left=pl, pad_right=pr)
  args.update(attrs)
  out_shape = out_shape or (x.shape[0], geo.oh, geo.ow, layer.out_channels)
  return _native_lib.ffi_call(
      "conv", out_shape, x, layer.taps, layer, max_threads=0, isa="auto", **args
  )


def dense_call(layer, x, out_shape=None):
  out_shape = out_shape or (x.shape[0], layer.out_features)
  return _native_lib.ffi_call(
      "dense", out_shape, x, layer.indices, layer, max_threads=0, isa="auto"
  )


def _ids(kind, edit):
  ids = np.array((dense_layer() if kind == "dense" else conv_layer()).neuron_ids)
  return edit(ids)


def _swap(ids):
  ids[[2, 3]] = ids[[3, 2]]
  return ids


def _dup(ids):
  ids[4] = ids[3]
  return ids


M = "srigl condensed matmul: "
CV = "srigl condensed conv: "
TAPS_NOTE = f" (kh * kw * cin = {KH} * {KW} * {CIN})"

# name -> (a function of no arguments that calls a native kernel, the start
# of the message it must fail with, or None when it must succeed). The layer
# arrays are built inside the child process.
NATIVE_CASES = {
    # Dense indices, through every entry point, at batch 1 (one gather per
    # neuron) and batch 20 (transposed batch tiles).
    **{
        f"dense index {what} b{batch} {entry}": (
            lambda pos=pos, v=v, dt=dt, batch=batch, entry=entry: {
                "native": C.condensed_matmul_native,
                "dispatch": lambda x, l: C.condensed_matmul(x, l, impl="native"),
            }[entry](x_dense(batch), dense_layer(dt, **dense_indices(pos, v, dt))),
            f"{M}indices[{pos[0]}, {pos[1]}] = {v} is outside [0, {IN})",
        )
        for what, pos, v, dt in [
            ("just past", (3, 2), IN, np.int16),
            ("far past", (8, 4), 30000, np.int16),
            ("negative int16", (0, 0), -1, np.int16),
            ("just past int32", (5, 1), IN, np.int32),
            ("far past int32", (2, 3), 2**31 - 1, np.int32),
            ("negative int32", (6, 0), -(2**31), np.int32),
        ]
        for batch in (1, 20)
        for entry in ("native", "dispatch")
    },
    # x narrower than the layer: the indices are checked against what x has.
    "dense x narrower than the indices": (
        lambda: C.condensed_matmul_native(
            x_dense(1, 30),
            dense_layer(indices=edited(np.minimum(dense_layer().indices, 29), (1, 1), 35)),
        ),
        f"{M}indices[1, 1] = 35 is outside [0, 30)",
    ),
    "dense neuron id past the end": (
        lambda: C.condensed_matmul_native(
            x_dense(1), dense_layer(neuron_ids=_ids("dense", lambda i: edited(i, -1, OUT)))
        ),
        f"{M}neuron_ids[{ACTIVE - 1}] = {OUT} is outside [0, {OUT})",
    ),
    "dense neuron id far past the end": (
        lambda: C.condensed_matmul_native(
            x_dense(20), dense_layer(neuron_ids=_ids("dense", lambda i: edited(i, 4, 10**9)))
        ),
        f"{M}neuron_ids[4] = 1000000000 is outside [0, {OUT})",
    ),
    "dense negative neuron id": (
        lambda: C.condensed_matmul_native(
            x_dense(1), dense_layer(neuron_ids=_ids("dense", lambda i: edited(i, 0, -3)))
        ),
        f"{M}neuron_ids[0] = -3 is outside [0, {OUT})",
    ),
    "dense unsorted neuron ids": (
        lambda: C.condensed_matmul_native(x_dense(1), dense_layer(neuron_ids=_ids("dense", _swap))),
        f"{M}neuron_ids must be strictly increasing (sorted, distinct): neuron_ids[3]",
    ),
    "dense repeated neuron id": (
        lambda: C.condensed_matmul_native(x_dense(20), dense_layer(neuron_ids=_ids("dense", _dup))),
        f"{M}neuron_ids must be strictly increasing (sorted, distinct): neuron_ids[4]",
    ),
    "dense indices and values differ in shape": (
        lambda: C.condensed_matmul_native(
            x_dense(1), dense_layer(indices=np.array(dense_layer().indices)[:, :4])
        ),
        f"{M}indices has shape ({ACTIVE}, 4) but values has shape ({ACTIVE}, {K})",
    ),
    "dense one neuron id short": (
        lambda: C.condensed_matmul_native(
            x_dense(1), dense_layer(neuron_ids=np.array(dense_layer().neuron_ids)[:-1])
        ),
        f"{M}neuron_ids has shape ({ACTIVE - 1},) but values has {ACTIVE} rows",
    ),
    "dense bias too short": (
        lambda: dense_call(dense_layer(bias=np.zeros(OUT - 1, np.float32)), x_dense(1)),
        f"{M}bias has shape ({OUT - 1},) but y's last dim is {OUT}",
    ),
    "dense y of another batch": (
        lambda: dense_call(dense_layer(), x_dense(1), out_shape=(2, OUT)),
        f"{M}y has shape (2, {OUT}) but x has shape (1, {IN})",
    ),
    "dense batch 0": (lambda: dense_call(dense_layer(), x_dense(0)), None),
    # Conv taps, int16 and int32, at batch 1 and 3 and through the 1x1 path.
    **{
        f"conv tap {what} b{batch}": (
            lambda pos=pos, v=v, dt=dt, batch=batch: C.condensed_conv_native(
                x_conv(batch), conv_layer(dt, taps=edited(conv_layer(dt).taps, pos, v))
            ),
            f"{CV}taps[{pos[0]}, {pos[1]}] = {v} is outside [0, {FAN}){TAPS_NOTE}",
        )
        for what, pos, v, dt in [
            ("just past", (2, 3), FAN, np.int16),
            ("far past", (14, 6), 30000, np.int16),
            ("negative int16", (0, 0), -5, np.int16),
            ("just past int32", (7, 0), FAN, np.int32),
            ("far past int32", (1, 1), 2**31 - 1, np.int32),
            ("negative int32", (9, 2), -(2**31), np.int32),
        ]
        for batch in (1, 3)
    },
    "conv x with fewer channels than the taps": (
        lambda: C.condensed_conv_native(
            x_conv(1, cin=3),
            conv_layer(taps=edited(np.minimum(conv_layer().taps, 26), (0, 0), FAN - 1)),
        ),
        f"{CV}taps[0, 0] = {FAN - 1} is outside [0, 27) (kh * kw * cin = 3 * 3 * 3)",
    ),
    "conv neuron id past the end": (
        lambda: C.condensed_conv_native(
            x_conv(1), conv_layer(neuron_ids=_ids("conv", lambda i: edited(i, -1, COUT)))
        ),
        f"{CV}neuron_ids[{ACTIVE_C - 1}] = {COUT} is outside [0, {COUT})",
    ),
    "conv unsorted neuron ids": (
        lambda: C.condensed_conv_native(x_conv(1), conv_layer(neuron_ids=_ids("conv", _swap))),
        f"{CV}neuron_ids must be strictly increasing (sorted, distinct): neuron_ids[3]",
    ),
    "conv repeated neuron id": (
        lambda: C.condensed_conv_native(x_conv(3), conv_layer(neuron_ids=_ids("conv", _dup))),
        f"{CV}neuron_ids must be strictly increasing (sorted, distinct): neuron_ids[4]",
    ),
    "conv taps and values differ in shape": (
        lambda: C.condensed_conv_native(
            x_conv(1), conv_layer(taps=np.array(conv_layer().taps)[:-1])
        ),
        f"{CV}taps has shape ({ACTIVE_C - 1}, {TAPS}) but values has shape ({ACTIVE_C}, {TAPS})",
    ),
    "conv kernel height 0": (
        lambda: conv_call(conv_layer(), x_conv(1), kh=0),
        f"{CV}kh = 0 is outside [1, 2147483648)",
    ),
    "conv stride 0": (
        lambda: conv_call(conv_layer(), x_conv(1), sw=0),
        f"{CV}sw = 0 is outside [1, 2147483648)",
    ),
    "conv negative padding": (
        lambda: conv_call(conv_layer(), x_conv(1), pad_left=-1),
        f"{CV}pad_left = -1 is outside [0, 2147483648)",
    ),
    "conv huge padding": (
        lambda: conv_call(conv_layer(), x_conv(1), pad_bottom=2**40),
        f"{CV}pad_bottom = 1099511627776 is outside [0, 2147483648)",
    ),
    "conv kernel larger than the padded input": (
        lambda: conv_call(conv_layer(), x_conv(1), kh=9, pad_top=0, pad_bottom=0),
        f"{CV}a 9x3 kernel with strides (1, 1) and padding ((0, 0), (1, 1)) does not fit x",
    ),
    "conv kernel larger than its taps say": (
        # A 5x5 kernel makes every tap valid but changes the output size.
        lambda: conv_call(conv_layer(), x_conv(1), kh=5, kw=5),
        f"{CV}y has shape (1, 6, 6, {COUT}) but a 5x5 kernel",
    ),
    "conv huge kernel and padding, tiny output": (
        # The padded input just fits the kernel: a 1x1 output whose planes
        # would need 2^62 floats.
        lambda: conv_call(
            conv_layer(),
            x_conv(1),
            out_shape=(1, 1, 1, COUT),
            kh=2**31 - 1,
            kw=2**31 - 1,
            pad_top=2**30,
            pad_bottom=2**30 - 7,
            pad_left=2**30,
            pad_right=2**30 - 7,
        ),
        f"{CV}a 2147483647x2147483647 kernel",
    ),
    "conv bias too long": (
        lambda: conv_call(conv_layer(bias=np.zeros(COUT + 1, np.float32)), x_conv(1)),
        f"{CV}bias has shape ({COUT + 1},) but y's last dim is {COUT}",
    ),
    "conv x without channels": (
        lambda: conv_call(conv_layer(), x_conv(1, cin=0)),
        f"{CV}x has shape (1, 6, 6, 0): no input channels",
    ),
    "conv batch 0": (lambda: conv_call(conv_layer(), x_conv(0)), None),
}


def _run_child(names):
  """Runs cases in this file as a script; returns (results by name, exit code, stderr)."""
  out = subprocess.run(
      [sys.executable, os.path.abspath(__file__), *names],
      capture_output=True,
      text=True,
      timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  results = {}
  for line in out.stdout.splitlines():
    if line.startswith("{"):
      r = json.loads(line)
      results[r["name"]] = r
  return results, out.returncode, out.stderr


@pytest.fixture(scope="module")
def native_results():
  """Every case's outcome; a case that kills its child is recorded as a crash and
  the remaining cases run in a fresh child."""
  todo = list(NATIVE_CASES)
  results = {}
  while todo:
    got, rc, stderr = _run_child(todo)
    results.update(got)
    todo = [n for n in todo if n not in results]
    if todo:
      results[todo[0]] = {"crash": f"exit code {rc}", "stderr": stderr[-2000:]}
      todo = todo[1:]
  return results


@needs_native
@pytest.mark.parametrize("name", list(NATIVE_CASES))
def test_native_kernel_refuses_bad_arrays(native_results, name):
  r = native_results[name]
  assert "crash" not in r, f"{name}: the child process died ({r['crash']}):\n{r['stderr']}"
  want = NATIVE_CASES[name][1]
  if want is None:
    assert r["error"] is None, r["error"]
    return
  assert r["error"] is not None, f"{name}: no error; returned an array of shape {r['shape']}"
  assert want in r["error"], r["error"]


def _child(names):
  for name in names:
    fn, _ = NATIVE_CASES[name]
    try:
      y = np.asarray(jax.block_until_ready(fn()))
      result = {"name": name, "error": None, "shape": list(y.shape)}
    except Exception as e:  # pylint: disable=broad-except
      result = {"name": name, "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result), flush=True)


# ------------------------------------------------- the same arrays on the host


HOST_CASES = [
    ("dense", {"indices": ("idx", (3, 2), IN)}, "indices[3, 2] = 40 is outside [0, 40)"),
    ("dense", {"indices": ("idx", (0, 0), -1)}, "indices[0, 0] = -1 is outside [0, 40)"),
    ("dense", {"neuron_ids": ("ids", -1, OUT)}, f"neuron_ids[8] = {OUT} is outside [0, {OUT})"),
    ("dense", {"neuron_ids": ("swap",)}, "neuron_ids[3] = "),
    ("dense", {"neuron_ids": ("dup",)}, "neuron_ids[4] = "),
    ("dense", {"indices": ("cut",)}, f"indices has shape ({ACTIVE}, 4) but values"),
    ("dense", {"bias": ("short",)}, f"bias has shape ({OUT - 1},)"),
    ("conv", {"taps": ("idx", (2, 3), FAN)}, f"taps[2, 3] = {FAN} is outside [0, {FAN})"),
    ("conv", {"taps": ("idx", (1, 1), 2**31 - 1)}, "taps[1, 1] = 2147483647 is outside"),
    ("conv", {"neuron_ids": ("ids", 0, -2)}, f"neuron_ids[0] = -2 is outside [0, {COUT})"),
    ("conv", {"neuron_ids": ("dup",)}, "strictly increasing"),
]


def _host_layer(kind, edit):
  dt = np.int32 if any(e[0] == "idx" and e[2] > 2**15 for e in edit.values()) else np.int16
  layer = (dense_layer if kind == "dense" else conv_layer)(dt)
  replace = {}
  for field, (op, *args) in edit.items():
    a = np.array(getattr(layer, field))
    if op in ("idx", "ids"):
      a = edited(a, args[0], args[1])
    elif op == "swap":
      a = _swap(a)
    elif op == "dup":
      a = _dup(a)
    elif op == "cut":
      a = a[:, :-1]
    elif op == "short":
      a = a[:-1]
    replace[field] = a
  return layer.replace(**replace)


@pytest.mark.parametrize("kind, edit, want", HOST_CASES)
def test_validate_refuses_bad_arrays_naming_the_layer(kind, edit, want):
  layer = _host_layer(kind, edit)
  with pytest.raises(ValueError, match=r"^layer 'l1': ") as e:
    layer.validate("layer 'l1'")
  assert want in str(e.value)


def test_validate_accepts_condensed_layers_and_refuses_bad_conv_geometry():
  assert dense_layer().validate() is not None
  good = conv_layer()
  assert good.validate() is good
  narrow = good.replace(in_channels=3, taps=jnp.asarray(edited(good.taps, (0, 0), 27)))
  sized = good.for_input((1, 6, 6, CIN))
  for bad, want in [
      (good.replace(kernel_size=(0, 3)), "kernel size (0, 3)"),
      (good.replace(strides=(1, 0)), "strides (1, 0)"),
      (good.replace(padding=((1, 1), (-1, 1))), "negative padding"),
      (narrow, "taps[0, 0] = 27 is outside [0, 27)"),
      (
          sized.replace(bias_map=jnp.zeros((5, 6, COUT))),
          f"bias_map has shape (5, 6, {COUT}) but the output of its 6x6 input is (6, 6, {COUT})",
      ),
  ]:
    with pytest.raises(ValueError, match=r"^layer 'c': ") as e:
      bad.validate("layer 'c'")
    assert want in str(e.value)


def test_converted_model_is_validated():
  # pylint: disable-next=g-import-not-at-top
  from test_convert import trained_like

  model, variables, masks, x = trained_like("cnn")
  converted = C.convert_model(model, variables, masks, x, impl="xla")
  assert converted.validate() is converted
  layers = converted.plan["layers"]
  conv_path = next(p for p, e in layers.items() if e["kind"] == "conv")
  dense_path = next(p for p, e in layers.items() if e["kind"] == "dense")

  def with_param(path, key, edit):
    params = jax.tree.map(np.array, converted.variables["params"])
    node = params
    for k in path.split("/"):
      node = node[k]
    node[key] = edit(node[key])
    return C.ConvertedModel(model, {**converted.variables, "params": params}, converted.plan)

  fan = layers[conv_path]["dense_fan_in"]
  bad = with_param(conv_path, "taps", lambda t: edited(t, (0, 0), fan))
  with pytest.raises(ValueError, match=rf"layer '{conv_path}': taps\[0, 0\] = {fan} is outside"):
    bad.validate()
  n = layers[dense_path]["neurons"]
  bad = with_param(dense_path, "neuron_ids", lambda i: edited(i, 0, n + 5))
  with pytest.raises(ValueError, match=rf"layer '{dense_path}': neuron_ids\[0\] = {n + 5}"):
    bad.validate()
  bad = with_param(dense_path, "indices", lambda i: i[:, :-1])
  with pytest.raises(ValueError, match=rf"layer '{dense_path}': indices has shape"):
    bad.validate()


# ------------------------------------------------- no state from call to call


def _stale_scratch_child():
  """Prints, per ISA and case, whether an all-zero request after request A
  equals the first call's all-zero output (and the bias) bit for bit."""
  out = {}
  isas = [i for i in ("generic", "avx2", "avx512") if i in C.native_isas()]
  rng = np.random.default_rng(4)
  kernel = rng.standard_normal((300, 70)).astype(np.float32)
  mask = np.zeros((300, 70), bool)
  for j in rng.choice(70, 61, replace=False):
    mask[rng.choice(300, 29, replace=False), j] = True
  dense = C.condense_dense(kernel, mask, rng.standard_normal(70).astype(np.float32))
  ck = rng.standard_normal((3, 3, 8, 20)).astype(np.float32)
  cmask = np.zeros((72, 20), bool)
  for j in rng.choice(20, 17, replace=False):
    cmask[rng.choice(72, 9, replace=False), j] = True
  conv = C.condense_conv(ck, cmask.reshape(3, 3, 8, 20), rng.standard_normal(20).astype(np.float32))
  for isa in isas:
    for batch in (1, 40):
      f = jax.jit(lambda x, isa=isa: C.condensed_matmul_native(x, dense, isa=isa))
      zeros = jnp.zeros((batch, 300), jnp.float32)
      first = np.asarray(f(zeros))
      f(jnp.asarray(rng.standard_normal((130, 300)) * 1e3, jnp.float32)).block_until_ready()
      f(jnp.asarray(rng.standard_normal((batch, 300)) * 1e3, jnp.float32)).block_until_ready()
      again = np.asarray(f(zeros))
      bias = np.broadcast_to(np.asarray(dense.bias), first.shape)
      out[f"dense {isa} b{batch}"] = bool(
          np.array_equal(first, again, equal_nan=False) and np.array_equal(first, bias)
      )
    for batch, hw in ((1, 7), (3, 12), (1, 30)):
      f = jax.jit(lambda x, isa=isa: C.condensed_conv_native(x, conv, isa=isa))
      zeros = jnp.zeros((batch, hw, hw, 8), jnp.float32)
      first = np.asarray(f(zeros))
      for b, s in ((8, 30), (2, 12), (batch, hw)):
        f(jnp.asarray(rng.standard_normal((b, s, s, 8)) * 1e3, jnp.float32)).block_until_ready()
      again = np.asarray(f(zeros))
      bias = np.broadcast_to(np.asarray(conv.bias), first.shape)
      out[f"conv {isa} b{batch} {hw}x{hw}"] = bool(
          np.array_equal(first, again) and np.array_equal(first, bias)
      )
  print(json.dumps(out), flush=True)


@needs_native
def test_no_state_survives_into_the_next_call():
  out = subprocess.run(
      [sys.executable, os.path.abspath(__file__), "--stale-scratch"],
      capture_output=True,
      text=True,
      timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  assert results, out.stdout
  assert all(results.values()), sorted(k for k, same in results.items() if not same)


# ------------------------------------------------- empty batches


def _impls():
  return ["xla", "reference", "pallas"] + (["native"] if NATIVE else [])


@pytest.mark.parametrize("impl", _impls())
def test_empty_batch_returns_an_empty_result_without_a_kernel(impl):
  dense, conv = dense_layer(), conv_layer()
  refuse = mock.Mock(side_effect=AssertionError("a kernel was called"))
  with (
      mock.patch.dict(dispatch._MATMUL, {impl: refuse}),
      mock.patch.dict(dispatch._CONV, {impl: refuse}),
  ):
    y = C.condensed_matmul(jnp.zeros((0, IN), jnp.bfloat16), dense, impl)
    assert (y.shape, y.dtype) == ((0, OUT), jnp.float32)
    y = C.condensed_matmul(jnp.zeros((2, 0, IN)), dense, impl)
    assert y.shape == (2, 0, OUT)
    y = C.condensed_conv(jnp.zeros((0, 6, 6, CIN)), conv, impl)
    assert (y.shape, y.dtype) == ((0, 6, 6, COUT), jnp.float32)
    strided = conv.replace(strides=(2, 2))
    y = C.condensed_conv(jnp.zeros((0, 7, 7, CIN)), strided, impl)
    assert y.shape == (0, 4, 4, COUT)
  refuse.assert_not_called()


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_converted_model_serves_an_empty_batch(name):
  # pylint: disable-next=g-import-not-at-top
  from test_convert import trained_like

  model, variables, masks, x = trained_like(name)
  converted = C.convert_model(model, variables, masks, x, impl="xla")
  for impl in ["xla"] + (["native"] if NATIVE else []):
    y = converted.apply(jnp.zeros((0, *x.shape[1:]), x.dtype), impl=impl)
    assert y.shape == (0, 10)


if __name__ == "__main__":
  if sys.argv[1:] == ["--stale-scratch"]:
    _stale_scratch_child()
  else:
    _child(sys.argv[1:])
