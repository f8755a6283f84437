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
``value * planes_flat[src + q]`` with ``src = row * row_len + off``,
``row = ((dy % sh) * sw + dx % sw) * cin + c`` and
``off = (dy // sh) * wq + dx // sw``. So a tap is a run of ``b * hq * wq``
contiguous inputs times one broadcast weight, for every batch size and image
size: kernels vectorise over it without an im2col buffer. Grid columns with
``i >= oh`` or ``j >= ow`` are computed and discarded.

With group-shared fan-in (`srigl(..., group_size=G)`), G consecutive output
channels share one set of taps. `GroupedCondensedConv` stores the taps once
per group, ``taps (n_groups, k)``, the G channels' own weights side by side,
``values (n_groups, k, G)``, and the sorted ``group_ids`` of the active groups
(group g feeds channels g * G .. g * G + G - 1); in the plane layout a tap is
then one run of inputs feeding G channels.

The per-image part of this layout (pads, output size, phase grid) is a
`ConvGeometry`, computed once per input size: by `condense_conv` when it is
given the input size, else by `CondensedConv.for_input` at the first call of
`condensed_conv` for that size (and cached). A call's layout is that geometry
and its batch size.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from srigl_jax.condensed._groups import condense_groups, validate_group_size
from srigl_jax.condensed._outputs import CondensedRows, check_grouped_rows, check_rows
from srigl_jax.condensed.dense.format import (
    CondensedLayer,
    GroupedCondensedLayer,
    condense_dense,
    index_dtype_for,
)

__all__ = [
    "CondensedConv",
    "ConvGeometry",
    "GroupedCondensedConv",
    "apply_planes",
    "condense_conv",
    "condense_grouped_conv",
    "conv_geometry",
    "from_planes",
    "normalize_padding",
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


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
  """The plane layout of one input size (see the module docstring).

  Attributes:
    height, width, cin: input size and channels.
    kh, kw, sh, sw: kernel size and strides.
    pads: ((top, bottom), (left, right)) zero padding.
    oh, ow: output spatial size.
    hq, wq: size of one stride-phase sub-image (the output grid of one image).
  """

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

  @property
  def hw(self) -> tuple[int, int]:
    return (self.height, self.width)

  @property
  def rows(self) -> int:
    """Plane rows: one per stride phase and input channel."""
    return self.sh * self.sw * self.cin

  @property
  def is_pointwise(self) -> bool:
    """A 1x1 convolution without padding: a Dense layer over (subsampled) pixels."""
    return (self.kh, self.kw) == (1, 1) and self.pads == ((0, 0), (0, 0))

  def grid(self, batch: int) -> int:
    """Output-grid columns computed per channel for a batch."""
    return batch * self.hq * self.wq

  def row_len(self, batch: int) -> int:
    """Columns per plane row: the grid plus a zero tail that keeps every
    tap's run ``src + [0, grid)`` inside the buffer."""
    tail = ((self.kh - 1) // self.sh) * self.wq + (self.kw - 1) // self.sw
    return self.grid(batch) + tail


@functools.lru_cache(maxsize=4096)
def conv_geometry(
    hw: tuple[int, int],
    cin: int,
    kernel_size: tuple[int, int],
    strides: tuple[int, int],
    padding: Padding,
) -> ConvGeometry:
  """The `ConvGeometry` of a convolution of ``hw``-sized inputs (cached).

  Args:
    hw: input ``(h, w)``.
    cin: input channels.
    kernel_size: ``(kh, kw)``.
    strides: ``(sh, sw)``.
    padding: a `normalize_padding` spec.

  Returns:
    The geometry.

  Raises:
    ValueError: negative padding, or a kernel larger than the padded input.
  """
  h, w = (int(d) for d in hw)
  kh, kw = (int(k) for k in kernel_size)
  sh, sw = (int(s) for s in strides)
  if isinstance(padding, str):
    pads = jax.lax.padtype_to_pads((h, w), (kh, kw), (sh, sw), padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  else:
    pads = padding
  if min(min(p) for p in pads) < 0:
    raise ValueError(f"condensed conv: negative padding {pads} is not supported.")
  hp, wp = h + pads[0][0] + pads[0][1], w + pads[1][0] + pads[1][1]
  if hp < kh or wp < kw:
    raise ValueError(f"condensed conv: a {kh}x{kw} kernel does not fit the padded {hp}x{wp} input.")
  out = ((hp - kh) // sh + 1, (wp - kw) // sw + 1)
  phase_grid = (-(-hp // sh), -(-wp // sw))
  return ConvGeometry(h, w, int(cin), kh, kw, sh, sw, pads, *out, *phase_grid)


class ConvLayout:
  """What the condensed conv formats share: the layout of the convolution.

  A subclass is a flax dataclass with the fields ``kernel_size``,
  ``in_channels``, ``out_channels``, ``strides``, ``padding``, ``geometry``
  and ``bias_map`` (see `CondensedConv`), and an ``as_dense_layer()``.
  """

  @property
  def n_outputs(self) -> int:
    return self.out_channels

  @property
  def input_hw(self) -> tuple[int, int] | None:
    """The input ``(h, w)`` the layer is set up for, or None."""
    return None if self.geometry is None else self.geometry.hw

  def to_dense(self) -> jnp.ndarray:
    """The equivalent masked kernel ``(kh, kw, cin, cout)``."""
    kh, kw = self.kernel_size
    kernel = self.as_dense_layer().to_dense()
    return kernel.reshape(kh, kw, self.in_channels, self.out_channels)

  def validate(self, name: str = "condensed conv"):
    """Checks the arrays and geometry on the host before a kernel reads through them.

    `condense_conv` and `condense_grouped_conv` build valid layers; call
    this on layers read from elsewhere (`convert_model` and
    `srigl_jax.serving`'s loader check the converted variables the same
    way).

    Args:
      name: what the error message names (e.g. "layer 'conv_0'").

    Returns:
      This layer.

    Raises:
      ValueError: a kernel size or stride below 1, negative padding, shapes
        that disagree, a tap outside ``[0, kh * kw * in_channels)``,
        ``neuron_ids`` (``group_ids`` of a grouped conv) not strictly
        increasing within ``[0, out_channels)`` (``[0, out_channels / G)``),
        or a bias map of another shape than the geometry's output.
    """
    kh, kw = self.kernel_size
    if min(kh, kw, *self.strides, self.in_channels) < 1:
      raise ValueError(
          f"{name}: kernel size {self.kernel_size}, strides {self.strides} and in_channels "
          f"{self.in_channels} must all be at least 1."
      )
    if not isinstance(self.padding, str) and min(min(p) for p in self.padding) < 0:
      raise ValueError(f"{name}: negative padding {self.padding}.")
    self._check_rows(name, kh * kw * self.in_channels)
    if self.bias_map is not None and self.geometry is not None:
      want = (self.geometry.oh, self.geometry.ow, self.out_channels)
      if np.shape(self.bias_map) != want:
        raise ValueError(
            f"{name}: bias_map has shape {np.shape(self.bias_map)} but the output of its "
            f"{self.geometry.height}x{self.geometry.width} input is {want}."
        )
    return self

  def geometry_for(self, x_shape: Sequence[int]) -> ConvGeometry:
    """The geometry of a call on ``x_shape``: the stored one, else computed (cached).

    Kernels use this; it does not check ``x_shape`` (`for_input` does).
    """
    if self.geometry is not None:
      return self.geometry
    return self._geometry_of((int(x_shape[1]), int(x_shape[2])))

  def _geometry_of(self, hw: tuple[int, int]) -> ConvGeometry:
    return conv_geometry(hw, self.in_channels, self.kernel_size, self.strides, self.padding)

  def for_input(self, x_shape: Sequence[int], name: str = "condensed_conv"):
    """Checks that this layer takes inputs of shape ``x_shape``; returns it set up for them.

    Args:
      x_shape: ``(b, h, w, cin)``.
      name: what the error message names.

    Returns:
      This layer when its geometry is for ``(h, w)``, else a copy whose
      geometry is.

    Raises:
      ValueError: the input is not NHWC with ``in_channels`` channels, the
        layer has a bias map built for another size, or the kernel does not
        fit the padded input.
    """
    if len(x_shape) != 4:
      raise ValueError(f"{name}: expects NHWC input of rank 4, got shape {tuple(x_shape)}.")
    if x_shape[-1] != self.in_channels:
      raise ValueError(
          f"{name}: input has {x_shape[-1]} channels but the layer expects {self.in_channels}."
      )
    hw = (int(x_shape[1]), int(x_shape[2]))
    if self.input_hw == hw:
      return self
    if self.bias_map is not None:
      built = "an unknown size" if self.input_hw is None else "{}x{}".format(*self.input_hw)
      raise ValueError(
          f"{name}: this layer folds constant channels through zero padding "
          f"with a per-position bias built for {built} inputs, but got "
          f"{hw[0]}x{hw[1]}. Feed inputs of the converted size, or convert the "
          "model again with a sample input of the new size."
      )
    return self.replace(geometry=self._geometry_of(hw))


@flax.struct.dataclass
class CondensedConv(ConvLayout, CondensedRows):
  """A constant fan-in sparse Conv layer in condensed form (a pytree).

  Attributes:
    values: ``(n_active, k)`` weights of the active output channels.
    taps: ``(n_active, k)`` int16/int32 flat ``(kh, kw, cin)`` index of each.
    neuron_ids: ``(n_active,)`` int32, sorted output channel of each row.
    bias: ``(cout,)`` or None.
    bias_map: ``(oh, ow, cout)`` per-position bias or None; only valid for
      inputs of the size ``geometry`` was built for.
    kernel_size: ``(kh, kw)`` (static).
    in_channels: ``cin`` (static).
    out_channels: ``cout``, ablated channels included (static).
    strides: ``(sh, sw)`` (static).
    padding: normalised padding spec (static).
    geometry: the `ConvGeometry` of the input size the layer is set up for,
      or None when no size is known yet (static; `for_input` sets it).
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
  geometry: ConvGeometry | None = flax.struct.field(pytree_node=False, default=None)

  def _check_rows(self, name: str, fan_in: int) -> None:
    check_rows(
        name,
        values=self.values,
        indices=self.taps,
        neuron_ids=self.neuron_ids,
        bias=self.bias,
        fan_in=fan_in,
        n_outputs=self.out_channels,
        index_name="taps",
    )

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


@flax.struct.dataclass
class GroupedCondensedConv(ConvLayout, CondensedRows):
  """A group-shared constant fan-in Conv layer in condensed form (a pytree).

  Attributes:
    values: ``(n_groups, k, G)`` weights of the active groups' channels.
    taps: ``(n_groups, k)`` int16/int32 flat ``(kh, kw, cin)`` taps shared by
      each group.
    group_ids: ``(n_groups,)`` int32, sorted ids of the active groups.
    bias, bias_map, kernel_size, in_channels, strides, padding, geometry: as
      in `CondensedConv`.
    out_channels: ``cout``, ablated groups included (static); a multiple of
      ``group_size``.
    group_size: G, output channels per group (static).
  """

  values: Any
  taps: Any
  group_ids: Any
  bias: Any
  bias_map: Any = None
  kernel_size: tuple[int, int] = flax.struct.field(pytree_node=False, default=(1, 1))
  in_channels: int = flax.struct.field(pytree_node=False, default=1)
  out_channels: int = flax.struct.field(pytree_node=False, default=1)
  strides: tuple[int, int] = flax.struct.field(pytree_node=False, default=(1, 1))
  padding: Padding = flax.struct.field(pytree_node=False, default="VALID")
  geometry: ConvGeometry | None = flax.struct.field(pytree_node=False, default=None)
  group_size: int = flax.struct.field(pytree_node=False, default=1)

  def _check_rows(self, name: str, fan_in: int) -> None:
    check_grouped_rows(
        name,
        values=self.values,
        indices=self.taps,
        group_ids=self.group_ids,
        bias=self.bias,
        fan_in=fan_in,
        n_outputs=self.out_channels,
        group_size=self.group_size,
        index_name="taps",
    )

  def as_dense_layer(self) -> GroupedCondensedLayer:
    """The same weights as a grouped Dense layer over the flattened
    ``(kh, kw, cin)`` fan-in (for a 1x1 conv: a Dense layer over pixels)."""
    kh, kw = self.kernel_size
    return GroupedCondensedLayer(
        values=self.values,
        indices=self.taps,
        group_ids=self.group_ids,
        bias=self.bias,
        in_features=kh * kw * self.in_channels,
        out_features=self.out_channels,
        group_size=self.group_size,
    )

  @property
  def n_groups(self) -> int:
    """Active groups."""
    return int(self.values.shape[0])

  @property
  def n_active(self) -> int:
    """Active output channels: G per active group."""
    return self.n_groups * self.group_size

  @property
  def neuron_ids(self) -> jax.Array:
    """``(n_groups * G,)`` sorted output channel of every active channel."""
    return self.as_dense_layer().neuron_ids


def apply_planes(x: jax.Array, layer: CondensedConv | GroupedCondensedConv, grid_sums) -> jax.Array:
  """Runs a kernel that computes the active channels' sums in the plane layout.

  Calls ``grid_sums(x, geometry)``, with ``x`` in the promoted dtype of x and
  the values, for the ``(n_active, grid)`` sums of the active channels (skipped when there is
  nothing to sum), and returns the finished ``(b, oh, ow, cout)`` output.
  """
  geo = layer.geometry_for(x.shape)
  batch = x.shape[0]
  dtype = jnp.result_type(x.dtype, layer.values.dtype)
  if 0 in (batch, *layer.values.shape):
    return layer.finish(jnp.zeros((batch, geo.oh, geo.ow, layer.n_active), dtype))
  return layer.finish(from_planes(grid_sums(x.astype(dtype), geo), geo, batch))


def condense_conv(
    kernel,
    mask,
    bias=None,
    *,
    strides: Sequence[int] = (1, 1),
    padding="SAME",
    input_hw: Sequence[int] | None = None,
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
    input_hw: the served input ``(h, w)``, when known: its `ConvGeometry` is
      computed here. Without it the layer works for any size, and
      `condensed_conv` computes the geometry of each new size (cached).
    name: layer name used in error messages.
    allow_ragged: pad channels with fewer taps up to the largest count (tap
      0, value 0) instead of raising; used by the model converter after it
      removes taps on folded inputs.
    index_dtype: override the tap dtype (default `index_dtype_for(fan_in)`).

  Returns:
    The `CondensedConv`.

  Raises:
    ValueError: the kernel is not 4-D, shapes disagree, active channels do
      not all have the same number of taps, or the padding is unsupported.
  """
  kernel, mask = _check_conv_arrays(kernel, mask, name, "condense_conv")
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
  layer = CondensedConv(
      values=flat.values,
      taps=flat.indices,
      neuron_ids=flat.neuron_ids,
      bias=flat.bias,
      kernel_size=(int(kh), int(kw)),
      in_channels=int(cin),
      out_channels=int(cout),
      strides=tuple(int(s) for s in strides),
      padding=normalize_padding(padding),
  )
  if input_hw is None:
    return layer
  return layer.for_input((1, *input_hw, cin), name=f"condense_conv: layer '{name}'")


def condense_grouped_conv(
    kernel,
    mask,
    bias=None,
    *,
    group_size: int,
    strides: Sequence[int] = (1, 1),
    padding="SAME",
    input_hw: Sequence[int] | None = None,
    name: str = "<layer>",
    allow_ragged: bool = False,
    index_dtype=None,
) -> GroupedCondensedConv:
  """Condenses one Conv kernel from its group-shared constant fan-in mask (on the host).

  Args:
    kernel: ``(kh, kw, cin, cout)`` weights (Flax NHWC layout).
    mask: bool array of the same shape; the masks of the G output channels of
      every group must be identical.
    bias: optional ``(cout,)`` bias.
    group_size: G, consecutive output channels sharing one set of taps; must
      divide ``cout``.
    strides, padding, input_hw, name: as in `condense_conv`.
    allow_ragged: pad groups with fewer taps up to the largest count (tap 0,
      value 0) instead of raising; used by the model converter.
    index_dtype: override the tap dtype (default `index_dtype_for(fan_in)`).

  Returns:
    The `GroupedCondensedConv`.

  Raises:
    ValueError: the kernel is not 4-D, shapes disagree, G does not divide
      ``cout``, a group's masks differ, active groups do not all have the
      same number of taps, or the padding is unsupported.
  """
  what = "condense_grouped_conv"
  group_size = validate_group_size(group_size, what)
  kernel, mask = _check_conv_arrays(kernel, mask, name, what)
  kh, kw, cin, cout = kernel.shape
  fan = kh * kw * cin
  values, taps, group_ids = condense_groups(
      kernel.reshape(fan, cout),
      mask.reshape(fan, cout),
      group_size,
      name=name,
      what=what,
      allow_ragged=allow_ragged,
      index_dtype=np.dtype(index_dtype or index_dtype_for(fan)),
  )
  layer = GroupedCondensedConv(
      values=jnp.asarray(values),
      taps=jnp.asarray(taps),
      group_ids=jnp.asarray(group_ids),
      bias=None if bias is None else jnp.asarray(bias),
      kernel_size=(int(kh), int(kw)),
      in_channels=int(cin),
      out_channels=int(cout),
      strides=tuple(int(s) for s in strides),
      padding=normalize_padding(padding),
      group_size=group_size,
  )
  if input_hw is None:
    return layer
  return layer.for_input((1, *input_hw, cin), name=f"{what}: layer '{name}'")


def _check_conv_arrays(kernel, mask, name: str, what: str) -> tuple[np.ndarray, np.ndarray]:
  """The kernel and mask as numpy arrays; raises unless both are 4-D of one shape."""
  kernel = np.asarray(kernel)
  mask = np.asarray(mask)
  if kernel.ndim != 4:
    raise ValueError(
        f"{what}: layer '{name}' has a kernel of shape {kernel.shape}; "
        "a 2-D convolution kernel has shape (kh, kw, cin, cout)."
    )
  if mask.shape != kernel.shape:
    raise ValueError(
        f"{what}: layer '{name}' has mask shape {mask.shape} but kernel "
        f"shape {kernel.shape}; pass the mask that belongs to this kernel."
    )
  return kernel, mask


def to_planes(x: jax.Array, geo: ConvGeometry) -> jax.Array:
  """NHWC input -> ``(rows, row_len)`` planes (see the module docstring)."""
  batch = x.shape[0]
  (pt, pb), (pl, pr) = geo.pads
  # Pad to whole phase cells: hq * sh rows and wq * sw columns.
  extra_h = geo.hq * geo.sh - (geo.height + pt + pb)
  extra_w = geo.wq * geo.sw - (geo.width + pl + pr)
  xp = jnp.pad(x, ((0, 0), (pt, pb + extra_h), (pl, pr + extra_w), (0, 0)))
  grid = geo.grid(batch)
  if geo.sh == 1 and geo.sw == 1:
    planes = jnp.moveaxis(xp, 3, 0).reshape(geo.cin, grid)
  else:
    xp = xp.reshape(batch, geo.hq, geo.sh, geo.wq, geo.sw, geo.cin)
    # -> (ph, pw, c, b, i, j)
    planes = xp.transpose(2, 4, 5, 0, 1, 3).reshape(geo.rows, grid)
  return jnp.pad(planes, ((0, 0), (0, geo.row_len(batch) - grid)))


def tap_sources(taps: jax.Array, geo: ConvGeometry, batch: int) -> jax.Array:
  """Flat start offset ``row * row_len + off`` of each tap's run (int32)."""
  t = taps.astype(jnp.int32)
  c = t % geo.cin
  dx = (t // geo.cin) % geo.kw
  dy = t // (geo.cin * geo.kw)
  row = ((dy % geo.sh) * geo.sw + dx % geo.sw) * geo.cin + c
  off = (dy // geo.sh) * geo.wq + dx // geo.sw
  return row * geo.row_len(batch) + off


def from_planes(y_grid: jax.Array, geo: ConvGeometry, batch: int) -> jax.Array:
  """``(channels, grid)`` output grid -> NHWC ``(b, oh, ow, channels)``."""
  n = y_grid.shape[0]
  y = y_grid.reshape(n, batch, geo.hq, geo.wq)[:, :, : geo.oh, : geo.ow]
  return y.transpose(1, 2, 3, 0)
