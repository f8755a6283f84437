"""Exact top-n selection with a traced n, without sorting.

The mask update needs "the n largest scores" where n is only known at run time
(it depends on the current mask and the ablation). `lax.top_k` needs a static k
and a full sort is slow on CPU (about 0.8 s for a 2.4M-weight layer with
XLA:CPU). Instead we find the n-th largest key by radix selection: a few
histogram passes over the digits of 31-bit integer keys, each a scatter-add
into a small histogram (about 2 ms per pass for 2.4M keys on CPU), followed by
an elementwise comparison. The result is exact, and ties are broken towards
the lower flat index so that selections are deterministic.

Keys are non-negative int32; key 0 marks an element that may never be selected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_MAX_KEY = (1 << 31) - 2


def magnitude_keys(x: jax.Array) -> jax.Array:
  """Order-preserving int32 keys >= 1 for |x|.

  The bit pattern of a non-negative float is monotone in its value, so the
  int32 view of |x| orders like |x|; +1 keeps 0 free for 'ineligible'.
  """
  a = jnp.abs(x.astype(jnp.float32))
  bits = lax.bitcast_convert_type(a, jnp.int32)
  return jnp.minimum(bits, _MAX_KEY) + 1


def random_keys(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Uniformly random int32 keys >= 1 (for random growth and random masks)."""
  bits = jax.random.bits(key, shape, jnp.uint32)
  return lax.convert_element_type(bits >> 1, jnp.int32) | 1


def _radix_passes(bits: int) -> int:
  # Keys are non-negative int32, so 32 bits cover them (the top bit is 0).
  return -(-32 // bits)


def top_n(keys: jax.Array, n: jax.Array) -> jax.Array:
  """Selects the min(n, #eligible) largest keys of the whole array.

  Args:
    keys: int32 array, >= 0; 0 = ineligible.
    n: int32 scalar (traced is fine).

  Returns:
    bool array of keys.shape.
  """
  flat = keys.reshape(-1)
  n = jnp.minimum(jnp.asarray(n, jnp.int32), jnp.sum(flat > 0, dtype=jnp.int32))
  # Two passes of 16-bit digits: a scatter-add into 65536 bins costs about the
  # same per key as into 256 bins on CPU, so fewer, wider passes win.
  bits = 16 if flat.size >= 4096 else 8
  nb = 1 << bits

  # One radix digit per iteration, most significant first. A loop rather than
  # unrolled passes keeps the HLO (and the compile time) small.
  def one_pass(i, carry):
    prefix, remaining = carry
    shift = 32 - bits * (i + 1)
    # Two shifts: a single shift by 32 would be out of range on the first pass.
    match = ((flat >> shift) >> bits) == prefix
    digit = (flat >> shift) & (nb - 1)
    hist = jnp.zeros(nb, jnp.int32).at[jnp.where(match, digit, nb)].add(1, mode="drop")
    # at_or_above[b]: matching keys whose digit is >= b (non-increasing in b).
    at_or_above = jnp.cumsum(hist[::-1])[::-1]
    b = jnp.maximum(jnp.sum(at_or_above >= remaining, dtype=jnp.int32) - 1, 0)
    remaining = remaining - (at_or_above[b] - hist[b])
    return (prefix << bits) | b, remaining

  prefix, remaining = lax.fori_loop(0, _radix_passes(bits), one_pass, (jnp.int32(0), n))
  # prefix is now the n-th largest key; take `remaining` of the keys equal to it.
  greater = flat > prefix
  equal = flat == prefix

  def tie_break():
    rank = jnp.cumsum(equal, dtype=jnp.int32)
    return greater | (equal & (rank <= remaining))

  sel = lax.cond(jnp.sum(equal, dtype=jnp.int32) > remaining, tie_break, lambda: greater | equal)
  return (sel & (n > 0)).reshape(keys.shape)


def top_n_per_column(keys: jax.Array, n: jax.Array) -> jax.Array:
  """Selects, in every column j of a (D, N) array, the n[j] largest keys.

  Columns are neurons (fan-in along axis 0), so this is the per-neuron
  selection of the mask update, vectorised over neurons.

  Args:
    keys: int32 (D, N), >= 0; 0 = ineligible.
    n: int32 (N,).

  Returns:
    bool (D, N).
  """
  d, ncols = keys.shape
  n = jnp.minimum(n.astype(jnp.int32), jnp.sum(keys > 0, axis=0, dtype=jnp.int32))
  # Narrow digits for short columns keep the (N, bins) histogram about the
  # size of the data.
  bits = 8 if d >= 128 else 4
  nb = 1 << bits
  col_base = jnp.arange(ncols, dtype=jnp.int32)

  def one_pass(i, carry):
    prefix, remaining = carry
    shift = 32 - bits * (i + 1)
    match = ((keys >> shift) >> bits) == prefix[None, :]
    digit = (keys >> shift) & (nb - 1)
    idx = jnp.where(match, col_base[None, :] * nb + digit, ncols * nb)
    hist = (
        jnp.zeros((ncols * nb,), jnp.int32)
        .at[idx.reshape(-1)]
        .add(1, mode="drop")
        .reshape(ncols, nb)
    )
    at_or_above = jnp.cumsum(hist[:, ::-1], axis=1)[:, ::-1]
    b = jnp.maximum(jnp.sum(at_or_above >= remaining[:, None], axis=1, dtype=jnp.int32) - 1, 0)
    take = lambda a: jnp.take_along_axis(a, b[:, None], axis=1)[:, 0]
    remaining = remaining - (take(at_or_above) - take(hist))
    return (prefix << bits) | b, remaining

  prefix, remaining = lax.fori_loop(
      0,
      _radix_passes(bits),
      one_pass,
      (jnp.zeros((ncols,), jnp.int32), n),
  )
  greater = keys > prefix[None, :]
  equal = keys == prefix[None, :]

  def tie_break():
    rank = jnp.cumsum(equal, axis=0, dtype=jnp.int32)
    return greater | (equal & (rank <= remaining[None, :]))

  sel = lax.cond(
      jnp.any(jnp.sum(equal, axis=0, dtype=jnp.int32) > remaining),
      tie_break,
      lambda: greater | equal,
  )
  return sel & (n > 0)[None, :]
