"""Serving a whole Flax model with condensed Dense layers.

`convert_model` rewrites a trained params tree: every sparse Dense layer
becomes the params of a `CondensedDense` (``values``, ``indices``,
``neuron_ids``, ``bias``); other sparse kernels are stored masked. For
declared producer -> consumer pairs (``Dense_0 -> act -> Dense_1``), the
producer's ablated neurons are removed outright: they only ever output
``act(bias)``, a constant whose contribution is added to the consumer's bias,
and the matching input rows of the consumer are dropped.

`condensed_apply` runs the *unchanged* model definition on those params: a
Flax method interceptor routes each converted ``nn.Dense`` call to the
condensed kernel, so input/output shapes and every other layer stay as they
were, without the model code knowing about sparsity.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from srigl_jax.condensed.dispatch import condensed_matmul
from srigl_jax.condensed.layer import CondensedLayer, condense_dense

__all__ = [
    "CondensedDense",
    "condensed_apply",
    "condensed_interceptor",
    "convert_model",
    "sequential_fold_pairs",
]

FoldPair = tuple[Any, Any, Callable[[jax.Array], jax.Array]]
_CONDENSED_KEYS = ("values", "indices", "neuron_ids", "bias")


def _path(p) -> tuple[str, ...]:
  if isinstance(p, str):
    return tuple(s for s in p.split("/") if s)
  return tuple(str(s) for s in p)


def _name(p) -> str:
  return "/".join(_path(p))


def _get(tree, path):
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return None
    tree = tree[key]
  return tree


def _layer_from_variables(p: Mapping[str, Any], in_features: int) -> CondensedLayer:
  return CondensedLayer(
      values=p["values"],
      indices=p["indices"],
      neuron_ids=p["neuron_ids"],
      bias=p["bias"],
      in_features=int(in_features),
      out_features=int(p["bias"].shape[0]),
  )


def _inference_only(*_):
  raise ValueError(
      "CondensedDense is inference-only: build its params with "
      "srigl_jax.condensed.convert_model(params, masks) instead of init()."
  )


class CondensedDense(nn.Module):
  """A Dense layer stored condensed (inference only).

  Its params are ``values (n, k)``, ``indices (n, k)``, ``neuron_ids (n,)``
  and ``bias (out,)``, as written by `convert_model`; ``out`` is ``n`` for a
  layer whose ablated neurons were folded away.

  Attributes:
    impl: kernel choice passed to `condensed_matmul`.
  """

  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = {key: self.param(key, _inference_only) for key in _CONDENSED_KEYS}
    return condensed_matmul(x, _layer_from_variables(p, x.shape[-1]), self.impl)


def condensed_interceptor(impl: str = "auto"):
  """A `flax.linen.intercept_methods` interceptor for converted params.

  Every ``nn.Dense`` whose params hold ``values`` (written by `convert_model`)
  runs as a `CondensedDense`; all other calls pass through untouched.

  Args:
    impl: kernel choice passed to `condensed_matmul`.

  Returns:
    The interceptor function.
  """

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (
        context.method_name != "__call__"
        or not isinstance(module, nn.Dense)
        or not module.has_variable("params", "values")
    ):
      return next_fun(*args, **kwargs)
    (x,) = args
    p = {key: module.get_variable("params", key) for key in _CONDENSED_KEYS}
    return condensed_matmul(x, _layer_from_variables(p, x.shape[-1]), impl)

  return interceptor


def condensed_apply(model: nn.Module, params, *args, impl: str = "auto", **kwargs):
  """``model.apply`` with the converted Dense layers running condensed.

  Args:
    model: the original Flax module (its definition is not modified).
    params: the tree returned by `convert_model`.
    *args: model inputs.
    impl: kernel choice passed to `condensed_matmul`.
    **kwargs: extra keyword arguments for ``model.apply`` (e.g. train=False).

  Returns:
    Whatever ``model.apply`` returns.
  """
  with nn.intercept_methods(condensed_interceptor(impl)):
    return model.apply({"params": params}, *args, **kwargs)


def sequential_fold_pairs(
    params, masks, activation: Callable[[jax.Array], jax.Array]
) -> list[FoldPair]:
  """Fold pairs ``(Dense_i, Dense_{i+1}, activation)`` inside each module.

  Matches the layout of a Flax MLP (``Dense_0 -> act -> Dense_1 -> ...``) and
  of a ViT ``MlpBlock`` (``Dense_0 -> gelu -> dropout -> Dense_1``): only
  modules whose children are all ``Dense_<i>`` layers are considered (a module
  that also holds norms or attention may not chain its Dense layers), and both
  layers must be sparse Dense kernels. Flax numbers ``Dense_<i>`` in creation
  order, which is call order in the usual ``x = nn.Dense(n)(x)`` style (not in
  ``nn.Dense(a)(nn.Dense(b)(x))``). This still trusts that the model
  applies only ``activation`` (and dropout) between the two layers; check the
  converted model against the masked one once, as the tests do.

  Args:
    params: the params tree.
    masks: the masks tree.
    activation: the elementwise activation between consecutive layers.

  Returns:
    A list of pairs in forward order.
  """
  pairs: list[FoldPair] = []

  def walk(node, mask_node, path):
    if not isinstance(node, Mapping) or not isinstance(mask_node, Mapping):
      return
    dense = {}
    for key, child in node.items():
      m = re.fullmatch(r"Dense_(\d+)", key)
      mk = mask_node.get(key)
      if (
          m
          and isinstance(child, Mapping)
          and isinstance(mk, Mapping)
          and mk.get("kernel") is not None
          and np.ndim(child.get("kernel")) == 2
      ):
        dense[int(m.group(1))] = path + (key,)
      walk(child, mk, path + (key,))
    if len(dense) != len(node):
      return
    for i in sorted(dense):
      if i + 1 in dense:
        pairs.append((dense[i], dense[i + 1], activation))

  walk(params, masks, ())
  return pairs


def convert_model(params, masks, *, fold: Iterable[FoldPair] = ()) -> dict:
  """Converts trained ``(params, masks)`` into inference params.

  Sparse Dense kernels become `CondensedDense` params (see the module
  docstring); other sparse leaves (attention, conv, embeddings) are stored
  masked; dense leaves are copied. For each ``(producer, consumer,
  activation)`` in ``fold`` the producer's ablated neurons are removed and
  ``activation(bias)`` of each is folded into the consumer's bias.

  Args:
    params: the params tree (nested dicts).
    masks: same structure; bool arrays for sparse leaves, None for dense.
    fold: pairs of layer paths (tuples or 'a/b' strings) in forward order,
      each with the elementwise activation between them; see
      `sequential_fold_pairs`.

  Returns:
    The params tree for `condensed_apply`.

  Raises:
    ValueError: a mask is not constant fan-in, a fold pair does not name two
      connected sparse Dense layers, or pairs are out of forward order.
  """
  state: dict[tuple[str, ...], dict[str, Any]] = {}

  def collect(node, mask_node, path):
    if not isinstance(node, Mapping) or not isinstance(mask_node, Mapping):
      return
    kmask = mask_node.get("kernel")
    if "kernel" in node and kmask is not None and np.ndim(node["kernel"]) == 2:
      kernel = np.asarray(node["kernel"])
      bias = node.get("bias")
      state[path] = {
          "kernel": kernel,
          "mask": np.asarray(kmask).astype(bool),
          "bias": np.zeros(kernel.shape[1], kernel.dtype) if bias is None else np.asarray(bias),
          "compact": False,
          "ragged": False,
      }
      return
    for key, child in node.items():
      collect(child, mask_node.get(key), path + (key,))

  collect(params, masks, ())

  for producer, consumer, activation in fold:
    pp, cp = _path(producer), _path(consumer)
    for p in (pp, cp):
      if p not in state:
        raise ValueError(
            f"convert_model: fold layer '{_name(p)}' is not a sparse Dense layer "
            "(rank-2 kernel with a mask); fold only pairs of sparse Dense layers."
        )
    sp, sc = state[pp], state[cp]
    if sp["kernel"].shape[1] != sc["kernel"].shape[0]:
      raise ValueError(
          f"convert_model: '{_name(pp)}' has {sp['kernel'].shape[1]} outputs but "
          f"'{_name(cp)}' has {sc['kernel'].shape[0]} inputs; they are not connected."
      )
    if sp["compact"] or sc["compact"]:
      raise ValueError(
          f"convert_model: fold pair ('{_name(pp)}', '{_name(cp)}') comes after a "
          "pair that already folded one of these layers; list each producer once, "
          "in forward order."
      )
    ablated = ~sp["mask"].any(axis=0)
    if ablated.any():
      const = np.asarray(activation(jnp.asarray(sp["bias"][ablated])), np.float64)
      w = np.where(sc["mask"], sc["kernel"], 0).astype(np.float64)
      sc["bias"] = (sc["bias"] + const @ w[ablated]).astype(sc["bias"].dtype)
    keep = ~ablated
    sc["kernel"], sc["mask"], sc["ragged"] = sc["kernel"][keep], sc["mask"][keep], True
    sp["kernel"], sp["mask"] = sp["kernel"][:, keep], sp["mask"][:, keep]
    sp["bias"], sp["compact"] = sp["bias"][keep], True

  def build(node, mask_node, path):
    if path in state:
      s = state[path]
      layer = condense_dense(
          s["kernel"], s["mask"], s["bias"], name=_name(path), allow_ragged=s["ragged"]
      )
      if s["compact"] and layer.n_active != layer.out_features:
        raise AssertionError("folded producer kept an ablated neuron")
      return {
          "values": layer.values,
          "indices": layer.indices,
          "neuron_ids": layer.neuron_ids,
          "bias": layer.bias,
      }
    if isinstance(node, Mapping):
      mask_node = mask_node if isinstance(mask_node, Mapping) else {}
      return {k: build(v, mask_node.get(k), path + (k,)) for k, v in node.items()}
    if mask_node is None:
      return node
    return jnp.asarray(np.where(np.asarray(mask_node), np.asarray(node), 0))

  return build(params, masks, ())
