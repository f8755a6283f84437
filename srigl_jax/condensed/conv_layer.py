"""Condensed storage of constant fan-in convolutions, and their plane layout.

A Conv kernel ``(kh, kw, cin, cout)`` trained with SRigL gives every active
output channel the same number ``k`` of non-zero taps over its flattened
``(kh, kw, cin)`` fan-in. `CondensedConv` stores::

    values     (n_active, k)   the non-zero weights of each active channel
    taps       (n_active, k)   their flat fan-in index t = (dy * kw + dx) * cin + c
                               (int16 when kh * kw * cin <= 32768)
    neuron_ids (n_active,)     which output channel each row feeds
    bias       (cout,) or None ablated channels output only this
    bias_map   (oh, ow, cout) or None
                               a per-position bias, set by the model converter
                               when it folds a constant input channel through
                               zero padding (exact for one input size only)

Every kernel computes the convolution in the same *plane layout*, which turns
each tap into one contiguous run of memory. The zero-padded input is split by
stride phase into ``sh * sw`` sub-images per channel (for stride 1, just the
padded image), and all of them are laid out as rows::

    planes[(ph * sw + pw) * cin + c, b * hq * wq + i * wq + j]
        = x_padded[b, i * sh + ph, j * sw + pw, c]

Output ``(b, oy, ox)`` then sits at column ``q = b * hq * wq + oy * wq + ox``
of an output grid of the same shape, and tap ``(dy, dx, c)`` adds
``value * planes_flat[src + q]`` with ``src = row * L + off``,
``row = ((dy % sh) * sw + dx % sw) * cin + c`` and
``off = (dy // sh) * wq + dx // sw``. So a tap is a run of ``b * hq * wq``
contiguous inputs times one broadcast weight, for every batch size and image
size: kernels vectorise over it without an im2col buffer. Grid columns with
``i >= oh`` or ``j >= ow`` are computed and discarded.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from srigl_jax.condensed.layer import CondensedLayer, condense_dense, index_dtype_for

__all__ = [
    "CondensedConv",
    "PlaneLayout",
    "condense_conv",
    "from_planes",
    "normalize_padding",
    "plane_layout",
    "tap_sources",
    "to_planes",
]

Padding = str | tuple[tuple[int, int], tuple[int, int]]


def normalize_padding(padding) -> Padding:
  """A hashable padding spec: 'SAME', 'VALID' or ((top, bottom), (left, right)).

  Args:
    padding: as `flax.linen.Conv` takes it: a string, an int, or a sequence
      of two ints or (low, high) pairs.

  Returns:
    The normalised spec.

  Raises:
    ValueError: a padding this module does not support (e.g. 'CIRCULAR').
  """
  if isinstance(padding, str):
    p = padding.upper()
    if p not in ("SAME", "VALID"):
      raise ValueError(
          f"condensed conv: padding {padding!r} is not supported; use 'SAME', "
          "'VALID' or explicit zero padding ((top, bottom), (left, right))."
      )
    return p
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  pads = tuple(padding)
  if len(pads) != 2:
    raise ValueError(
        f"condensed conv: padding {padding!r} must give two spatial dims "
        "(2-D convolutions only)."
    )
  out = []
  for p in pads:
    if isinstance(p, int):
      out.append((int(p), int(p)))
    else:
      lo, hi = p
      out.append((int(lo), int(hi)))
  return tuple(out)


@flax.struct.dataclass
class CondensedConv:
  """A constant fan-in sparse Conv layer in condensed form (a pytree).

  Attributes:
    values: ``(n_active, k)`` weights of the active output channels.
    taps: ``(n_active, k)`` int16/int32 flat ``(kh, kw, cin)`` index of each.
    neuron_ids: ``(n_active,)`` int32, sorted output channel of each row.
    bias: ``(cout,)`` or None.
    bias_map: ``(oh, ow, cout)`` per-position bias or None; only valid for
      inputs of spatial size ``input_hw``.
    kernel_size: ``(kh, kw)`` (static).
    in_channels: ``cin`` (static).
    out_channels: ``cout``, ablated channels included (static).
    strides: ``(sh, sw)`` (static).
    padding: normalised padding spec (static).
    input_hw: ``(h, w)`` the bias map was built for, else None (static).
  """

  values: Any
  taps: Any
  neuron_ids: Any
  bias: Any
  bias_map: Any = None
  kernel_size: tuple[int, int] = flax.struct.field(pytree_node=False, default=(1, 1))
  in_channels: int = flax.struct.field(pytree_node=False, default=1)
  out_channels: int = flax.struct.field(pytree_node=False, default=1)
  strides: tuple[int, int] = flax.struct.field(pytree_node=False, default=(1, 1))
  padding: Padding = flax.struct.field(pytree_node=False, default="VALID")
  input_hw: tuple[int, int] | None = flax.struct.field(pytree_node=False, default=None)

  @property
  def n_active(self) -> int:
    return int(self.values.shape[0])

  @property
  def fan_in(self) -> int:
    return int(self.values.shape[1])

  @property
  def is_compact(self) -> bool:
    """True when every output channel is active."""
    return self.n_active == self.out_channels

  @property
  def is_pointwise(self) -> bool:
    """A 1x1 convolution without padding: a Dense layer over pixels."""
    return self.kernel_size == (1, 1) and self.padding in ("VALID", "SAME", ((0, 0), (0, 0)))

  def bias_or_zeros(self, dtype=jnp.float32):
    """The full ``(cout,)`` bias, zeros when the layer has none."""
    if self.bias is None:
      return jnp.zeros((self.out_channels,), dtype)
    return jnp.asarray(self.bias, dtype)

  def as_dense_layer(self) -> CondensedLayer:
    """The same weights as a Dense layer over the flattened ``(kh, kw, cin)``
    fan-in (for a 1x1 conv: a Dense layer over pixels)."""
    kh, kw = self.kernel_size
    return CondensedLayer(
        values=self.values,
        indices=self.taps,
        neuron_ids=self.neuron_ids,
        bias=self.bias,
        in_features=kh * kw * self.in_channels,
        out_features=self.out_channels,
    )

  def to_dense(self) -> jnp.ndarray:
    """The equivalent masked kernel ``(kh, kw, cin, cout)``."""
    kh, kw = self.kernel_size
    kernel = self.as_dense_layer().to_dense()
    return kernel.reshape(kh, kw, self.in_channels, self.out_channels)

  def check_input(self, x_shape: Sequence[int], name: str = "condensed conv") -> None:
    """Raises a clear error for an input this layer cannot take."""
    if len(x_shape) != 4:
      raise ValueError(f"{name}: expects NHWC input of rank 4, got shape {tuple(x_shape)}.")
    if x_shape[-1] != self.in_channels:
      raise ValueError(
          f"{name}: input has {x_shape[-1]} channels but the layer expects " f"{self.in_channels}."
      )
    if self.bias_map is not None and tuple(x_shape[1:3]) != tuple(self.input_hw):
      raise ValueError(
          f"{name}: this layer folds constant channels through zero padding "
          f"with a per-position bias built for {self.input_hw[0]}x"
          f"{self.input_hw[1]} inputs, but got {x_shape[1]}x{x_shape[2]}. "
          "Feed inputs of the converted size, or convert the model again with "
          "a sample input of the new size."
      )


def condense_conv(
    kernel,
    mask,
    bias=None,
    *,
    strides: Sequence[int] = (1, 1),
    padding="SAME",
    name: str = "<layer>",
    allow_ragged: bool = False,
    index_dtype=None,
) -> CondensedConv:
  """Condenses one Conv kernel from its constant fan-in mask (on the host).

  Args:
    kernel: ``(kh, kw, cin, cout)`` weights (Flax NHWC layout).
    mask: bool array of the same shape; True where a weight is active.
    bias: optional ``(cout,)`` bias.
    strides: ``(sh, sw)`` of the convolution.
    padding: as `flax.linen.Conv` takes it.
    name: layer name used in error messages.
    allow_ragged: pad channels with fewer taps up to the largest count (tap
      0, value 0) instead of raising; used by the model converter after it
      removes taps on folded inputs.
    index_dtype: override the tap dtype (default `index_dtype_for(fan_in)`).

  Returns:
    The `CondensedConv`.

  Raises:
    ValueError: the kernel is not 4-D, shapes disagree, or active channels
      do not all have the same number of taps.
  """
  kernel = np.asarray(kernel)
  mask = np.asarray(mask)
  if kernel.ndim != 4:
    raise ValueError(
        f"condense_conv: layer '{name}' has a kernel of shape {kernel.shape}; "
        "a 2-D convolution kernel has shape (kh, kw, cin, cout)."
    )
  if mask.shape != kernel.shape:
    raise ValueError(
        f"condense_conv: layer '{name}' has mask shape {mask.shape} but kernel "
        f"shape {kernel.shape}; pass the mask that belongs to this kernel."
    )
  kh, kw, cin, cout = kernel.shape
  fan = kh * kw * cin
  flat = condense_dense(
      kernel.reshape(fan, cout),
      mask.reshape(fan, cout),
      bias,
      name=name,
      allow_ragged=allow_ragged,
      index_dtype=index_dtype or index_dtype_for(fan),
  )
  sh, sw = (int(s) for s in strides)
  return CondensedConv(
      values=flat.values,
      taps=flat.indices,
      neuron_ids=flat.neuron_ids,
      bias=flat.bias,
      bias_map=None,
      kernel_size=(int(kh), int(kw)),
      in_channels=int(cin),
      out_channels=int(cout),
      strides=(sh, sw),
      padding=normalize_padding(padding),
      input_hw=None,
  )


@dataclasses.dataclass(frozen=True)
class PlaneLayout:
  """Static geometry of one convolution call in the plane layout.

  Attributes:
    batch, height, width, cin: input shape.
    kh, kw, sh, sw: kernel size and strides.
    pads: ((top, bottom), (left, right)) zero padding.
    oh, ow: output spatial size.
    hq, wq: size of one stride-phase sub-image (the output grid).
    rows: ``sh * sw * cin`` plane rows.
    grid: ``batch * hq * wq`` output grid columns computed per channel.
    row_len: columns per plane row, ``grid`` plus a zero tail so that every
      tap's run ``src + [0, grid)`` stays inside the buffer.
  """

  batch: int
  height: int
  width: int
  cin: int
  kh: int
  kw: int
  sh: int
  sw: int
  pads: tuple[tuple[int, int], tuple[int, int]]
  oh: int
  ow: int
  hq: int
  wq: int
  rows: int
  grid: int
  row_len: int


def plane_layout(x_shape, kernel_size, strides, padding) -> PlaneLayout:
  """The `PlaneLayout` of a convolution of an NHWC input of shape ``x_shape``."""
  b, h, w, c = (int(d) for d in x_shape)
  kh, kw = (int(k) for k in kernel_size)
  sh, sw = (int(s) for s in strides)
  padding = normalize_padding(padding)
  if isinstance(padding, str):
    pads = tuple(
        tuple(int(p) for p in pair)
        for pair in jax.lax.padtype_to_pads((h, w), (kh, kw), (sh, sw), padding)
    )
  else:
    pads = padding
  if min(min(p) for p in pads) < 0:
    raise ValueError(f"condensed conv: negative padding {pads} is not supported.")
  hp, wp = h + pads[0][0] + pads[0][1], w + pads[1][0] + pads[1][1]
  if hp < kh or wp < kw:
    raise ValueError(f"condensed conv: a {kh}x{kw} kernel does not fit the padded {hp}x{wp} input.")
  oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
  hq, wq = -(-hp // sh), -(-wp // sw)
  grid = b * hq * wq
  tail = ((kh - 1) // sh) * wq + (kw - 1) // sw
  return PlaneLayout(
      batch=b,
      height=h,
      width=w,
      cin=c,
      kh=kh,
      kw=kw,
      sh=sh,
      sw=sw,
      pads=pads,
      oh=oh,
      ow=ow,
      hq=hq,
      wq=wq,
      rows=sh * sw * c,
      grid=grid,
      row_len=grid + tail,
  )


def to_planes(x: jax.Array, lo: PlaneLayout) -> jax.Array:
  """NHWC input -> ``(rows, row_len)`` planes (see the module docstring)."""
  (pt, pb), (pl, pr) = lo.pads
  # Pad to whole phase cells: hq * sh rows and wq * sw columns.
  extra_h = lo.hq * lo.sh - (lo.height + pt + pb)
  extra_w = lo.wq * lo.sw - (lo.width + pl + pr)
  xp = jnp.pad(x, ((0, 0), (pt, pb + extra_h), (pl, pr + extra_w), (0, 0)))
  if lo.sh == 1 and lo.sw == 1:
    planes = jnp.moveaxis(xp, 3, 0).reshape(lo.cin, lo.grid)
  else:
    xp = xp.reshape(lo.batch, lo.hq, lo.sh, lo.wq, lo.sw, lo.cin)
    # -> (ph, pw, c, b, i, j)
    planes = xp.transpose(2, 4, 5, 0, 1, 3).reshape(lo.rows, lo.grid)
  return jnp.pad(planes, ((0, 0), (0, lo.row_len - lo.grid)))


def tap_sources(taps: jax.Array, lo: PlaneLayout) -> jax.Array:
  """Flat start offset ``row * row_len + off`` of each tap's run (int32)."""
  t = taps.astype(jnp.int32)
  c = t % lo.cin
  dx = (t // lo.cin) % lo.kw
  dy = t // (lo.cin * lo.kw)
  row = ((dy % lo.sh) * lo.sw + dx % lo.sw) * lo.cin + c
  off = (dy // lo.sh) * lo.wq + dx // lo.sw
  return row * lo.row_len + off


def from_planes(y_grid: jax.Array, lo: PlaneLayout) -> jax.Array:
  """``(channels, grid)`` output grid -> NHWC ``(b, oh, ow, channels)``."""
  n = y_grid.shape[0]
  y = y_grid.reshape(n, lo.batch, lo.hq, lo.wq)[:, :, : lo.oh, : lo.ow]
  return y.transpose(1, 2, 3, 0)
