"""What the converter reads from a model's jaxpr.

*Tracing* (`trace`) records the eval forward pass once with a method
interceptor: the jaxpr ties every kernel to the ``conv_general_dilated`` /
``dot_general`` that consumes it, and the recorded module calls tie each
module's input and output variables to its path.

*Constant analysis* (`eval_abstract`) evaluates the jaxpr with the input
marked unknown and the real weights, so everything that does not depend on
the input (an ablated neuron's zero output through BatchNorm, activations,
pooling, flattening, residual sums) comes out as a known number.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.extend.core as jcore
import jax.numpy as jnp
import numpy as np

__all__ = ["LINEAR", "Call", "eval_abstract", "module_path", "trace", "use_counts"]

# The bilinear primitives that consume kernels.
LINEAR = ("conv_general_dilated", "dot_general")


def module_path(module: nn.Module) -> str:
  """A module's path in the variables tree, '/'-joined."""
  return "/".join(str(p) for p in module.scope.path)


# ---------------------------------------------------------------------------
# Tracing: which eqn consumes which kernel, which BatchNorm follows which layer.


@dataclasses.dataclass
class Call:
  """One recorded ``__call__`` of a module: its path, and its input and output variables."""

  path: str
  module: nn.Module
  in_var: Any
  out_var: Any


def _var(t):
  v = getattr(t, "val", None)
  return v if isinstance(v, jcore.Var) else None


def trace(model, variables, x1):
  """``(closed jaxpr, [Call])`` of ``model.apply(variables, x1)``."""
  calls: list[Call] = []

  def recorder(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and args:
      calls.append(Call(module_path(context.module), context.module, _var(args[0]), _var(out)))
    return out

  def forward(v, x):
    with nn.intercept_methods(recorder):
      return model.apply(v, x)

  closed = jax.make_jaxpr(forward)(variables, x1)
  return closed, calls


def use_counts(jaxpr) -> dict:
  """How many times each variable of a jaxpr is read (outputs included)."""
  counts: dict = {}
  for eqn in jaxpr.eqns:
    for v in eqn.invars:
      if isinstance(v, jcore.Var):
        counts[v] = counts.get(v, 0) + 1
  for v in jaxpr.outvars:
    if isinstance(v, jcore.Var):
      counts[v] = counts.get(v, 0) + 1
  return counts


# ---------------------------------------------------------------------------
# Constant analysis: which values do not depend on the input, and their value.
#
# Every variable is a pair (value, unknown): a concrete array for batch 1 and
# a bool array marking the entries that depend on the input. Rules by kind of
# primitive keep the marks exact: elementwise ops OR their operands' marks,
# structural ops move the marks as they move the data, reductions and pooling
# mark an output that reads any marked input, and linear ops mark an output
# iff a non-zero weight meets a marked input. Anything else is wholly marked
# once any operand is.

_STRUCTURAL = frozenset(
    {
        "reshape",
        "transpose",
        "broadcast_in_dim",
        "squeeze",
        "expand_dims",
        "slice",
        "concatenate",
        "pad",
        "rev",
        "copy",
        "copy_p",
    }
)
_REDUCTIONS = frozenset(
    {
        "reduce_sum",
        "reduce_max",
        "reduce_min",
        "reduce_prod",
        "reduce_and",
        "reduce_or",
        "argmax",
        "argmin",
    }
)
_WINDOWS = frozenset({"reduce_window_sum", "reduce_window_max", "reduce_window_min"})


def _fill(val, unk):
  return np.where(unk, np.zeros((), val.dtype), val)


def _linear_eval(eqn, a, b):
  """Partial evaluation of a bilinear op (conv or dot) on marked operands."""
  prim = eqn.primitive
  out_dtype = eqn.outvars[0].aval.dtype

  def run(u, v):
    return np.asarray(prim.bind(jnp.asarray(u), jnp.asarray(v), **eqn.params))

  (av, au), (bv, bu) = a, b
  av, bv = _fill(av, au), _fill(bv, bu)
  val = run(av, bv).astype(out_dtype)
  if not au.any() and not bu.any():
    return val, np.zeros(val.shape, bool)
  f = lambda m: m.astype(np.float32)
  params = dict(eqn.params)
  params.pop("preferred_element_type", None)
  touch_a, touch_b = f(au | (av != 0)), f(bu | (bv != 0))
  ind = lambda u, v: np.asarray(
      prim.bind(jnp.asarray(u), jnp.asarray(v), **{**params, "preferred_element_type": jnp.float32})
  )
  unk = (ind(f(au), touch_b) + ind(touch_a, f(bu))) > 0
  return val, unk


def _sub_jaxpr(eqn):
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    j = eqn.params.get(key)
    if isinstance(j, jcore.ClosedJaxpr):
      return j
  return None


def _marks(eqn, ins, outs):
  """The unknown marks of an eqn's outputs (see the section comment)."""
  name = eqn.primitive.name
  unks = [u for _, u in ins]
  if not any(u.any() for u in unks):
    return [np.zeros(np.shape(o), bool) for o in outs]
  shapes = [np.shape(o) for o in outs]
  if name in _STRUCTURAL:
    moved = eqn.primitive.bind(
        *[jnp.asarray(u) for u in unks], **{k: v for k, v in eqn.params.items()}
    )
    moved = moved if eqn.primitive.multiple_results else [moved]
    return [np.asarray(m).astype(bool) for m in moved]
  if name in _REDUCTIONS:
    axes = tuple(eqn.params["axes"])
    return [np.asarray(unks[0].any(axis=axes)).reshape(shapes[0])]
  if name in _WINDOWS:
    p = eqn.params
    m = jax.lax.reduce_window(
        jnp.asarray(unks[0], jnp.float32),
        0.0,
        jax.lax.max,
        p["window_dimensions"],
        p["window_strides"],
        p["padding"],
        p["base_dilation"],
        p["window_dilation"],
    )
    return [np.asarray(m) > 0]
  if len(outs) == 1 and _broadcasts_to([np.shape(u) for u in unks], shapes[0]):
    out = np.zeros(shapes[0], bool)
    for u in unks:
      out = out | u  # size-1 axes broadcast, as jaxpr elementwise ops allow
    return [out]
  return [np.ones(s, bool) for s in shapes]


def _broadcasts_to(shapes, out) -> bool:
  try:
    return np.broadcast_shapes(*shapes, out) == tuple(out)
  except ValueError:
    return False


def eval_abstract(jaxpr, consts, args, record=None):
  """Evaluates a jaxpr on ``(value, unknown)`` pairs (see the section comment).

  Args:
    jaxpr: the jaxpr.
    consts: its constants (known).
    args: a ``(value, unknown marks)`` pair per input.
    record: if a dict, receives the first operand's pair of every linear eqn.

  Returns:
    A ``(value, unknown marks)`` pair per output.
  """
  env: dict = {}

  def read(v):
    if isinstance(v, jcore.Literal):
      val = np.asarray(v.val)
      return val, np.zeros(val.shape, bool)
    return env[v]

  for v, c in zip(jaxpr.constvars, consts):
    c = np.asarray(c)
    env[v] = (c, np.zeros(c.shape, bool))
  for v, a in zip(jaxpr.invars, args):
    env[v] = a
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    if eqn.primitive.name in LINEAR:
      outs = [_linear_eval(eqn, ins[0], ins[1])]
      if record is not None:
        record[eqn] = ins[0]
    elif (sub := _sub_jaxpr(eqn)) is not None:
      outs = eval_abstract(sub.jaxpr, sub.consts, ins)
    else:
      res = eqn.primitive.bind(*[jnp.asarray(_fill(v, u)) for v, u in ins], **eqn.params)
      res = [np.asarray(r) for r in (res if eqn.primitive.multiple_results else [res])]
      outs = list(zip(res, _marks(eqn, ins, res)))
    for v, o in zip(eqn.outvars, outs):
      if not isinstance(v, jcore.DropVar):
        env[v] = o
  return [read(v) for v in jaxpr.outvars]
