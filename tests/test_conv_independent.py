"""Condensed conv kernels against `lax.conv_general_dilated`, padded independently.

The kernel tests in test_conv_*.py compare against `condensed_conv_reference`,
which takes its padding from the package's own `plane_layout(...).pads`; a
wrong SAME padding there (top and bottom swapped, say) would move every kernel
and its reference together. Here the expected output is XLA's convolution of
the masked dense kernel plus the bias, padded by lax itself from the string
('SAME', 'VALID') or by pads written in the case, so the package's padding
code is not involved. The cases include odd sizes and strides where SAME pads
unevenly (one more row or column at the bottom/right, as lax and TensorFlow
do), so a swap shows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import srigl_jax
from srigl_jax import condensed as C

# (kh, kw, cin, cout, k, n_active, strides, padding, (h, w), batch). The
# comment gives the SAME pads ((top, bottom), (left, right)) worked out by
# hand: total = max((out - 1) * s + k - in, 0), top = total // 2.
CASES = {
    # out 4x4; rows: 3*2+3-8 = 1 -> (0, 1); cols: 3*2+3-7 = 2 -> (1, 1).
    '3x3_s2_same_uneven_rows': (3, 3, 3, 5, 6, 4, (2, 2), 'SAME', (8, 7), 2),
    # rows and cols: total 1 -> (0, 1).
    '2x2_s1_same': (2, 2, 4, 6, 5, 6, (1, 1), 'SAME', (5, 6), 1),
    # rows: (1, 1); cols, stride 2: out 4, 3*2+3-8 = 1 -> (0, 1).
    '3x3_s12_same': (3, 3, 2, 4, 4, 3, (1, 2), 'SAME', (7, 8), 3),
    # rows: out 5, 4*2+4-9 = 3 -> (1, 2); cols: 4*2+4-10 = 2 -> (1, 1).
    '4x4_s2_same': (4, 4, 2, 3, 8, 3, (2, 2), 'SAME', (9, 10), 1),
    '1x1_s2_same': (1, 1, 6, 7, 3, 5, (2, 2), 'SAME', (7, 6), 2),
    '5x3_s21_valid': (5, 3, 3, 4, 7, 4, (2, 1), 'VALID', (11, 6), 2),
    '3x3_s1_valid_odd': (3, 3, 3, 5, 6, 5, (1, 1), 'VALID', (5, 7), 1),
    '3x2_s2_explicit': (3, 2, 2, 5, 4, 4, (2, 2), ((2, 0), (0, 1)), (7, 6), 2),
    '7x7_s2_stem': (7, 7, 3, 4, 20, 4, (2, 2), ((3, 3), (3, 3)), (15, 13), 1),
    '3x3_k1_explicit': (3, 3, 4, 4, 1, 4, (1, 1), ((0, 2), (1, 0)), (6, 5), 2),
}
IMPLS = ['reference', 'xla', 'native', 'pallas']


def _case(name):
  kh, kw, cin, cout, k, n_active, strides, padding, hw, batch = CASES[name]
  rng = np.random.default_rng(sum(map(ord, name)))
  fan = kh * kw * cin
  mask = np.zeros((fan, cout), bool)
  for j in rng.choice(cout, n_active, replace=False):
    mask[rng.choice(fan, k, replace=False), j] = True
  mask = mask.reshape(kh, kw, cin, cout)
  # The kernel holds values at masked positions too: condense_conv must drop
  # them, and the expected output uses the masked kernel only.
  kernel = rng.standard_normal(mask.shape).astype(np.float32)
  bias = rng.standard_normal(cout).astype(np.float32)
  x = rng.standard_normal((batch, *hw, cin)).astype(np.float32)
  if isinstance(padding, str):
    lax_padding = padding  # lax pads the string itself
  else:
    lax_padding = [tuple(p) for p in padding]
  want = jax.lax.conv_general_dilated(
      jnp.asarray(x),
      jnp.asarray(kernel * mask),
      window_strides=strides,
      padding=lax_padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST,
  ) + jnp.asarray(bias)
  layer = srigl_jax.condense_conv(
      kernel * mask, mask, bias, strides=strides, padding=padding, name=name
  )
  return jnp.asarray(x), layer, np.asarray(want)


def _run(impl, x, layer):
  if impl == 'pallas' and jax.default_backend() != 'gpu':
    # As test_conv_pallas.py: on CPU the Pallas kernel runs in its interpreter.
    return C.condensed_conv_pallas(x, layer, interpret=True)
  return srigl_jax.condensed_conv(x, layer, impl=impl)


@pytest.mark.parametrize('name', list(CASES))
def test_kernels_match_lax_conv(name):
  x, layer, want = _case(name)
  for impl in IMPLS:
    if impl == 'native' and not C.native_available():
      continue
    got = np.asarray(_run(impl, x, layer))
    assert got.shape == want.shape, (impl, got.shape, want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4, err_msg=impl)


def test_same_padding_pads_bottom_right_first():
  # A 2x2 kernel of ones on a 3x3 ramp, stride 1, SAME: output (i, j) sums
  # input rows i, i + 1 and cols j, j + 1, the extra row and column of zero
  # padding being at the bottom and right. Written out by hand.
  x = jnp.arange(1.0, 10.0).reshape(1, 3, 3, 1)  # [[1,2,3],[4,5,6],[7,8,9]]
  kernel = np.ones((2, 2, 1, 1), np.float32)
  layer = srigl_jax.condense_conv(kernel, kernel > 0, None, strides=(1, 1), padding='SAME')
  want = np.array([[12, 16, 9], [24, 28, 15], [15, 17, 9]], np.float32)
  for impl in IMPLS:
    if impl == 'native' and not C.native_available():
      continue
    got = np.asarray(_run(impl, x, layer))[0, :, :, 0]
    np.testing.assert_array_equal(got, want, err_msg=impl)
