"""Reports of a run: summary.json and the plots, for the trainer and the sweep.

`write_summary_and_plots` writes a finished run's `summary.json`,
`accuracy.png` and `active_neurons.png`; `read_summary` reads a summary back and
`final_active_neurons_pct` takes the per-layer % of active neurons from it;
`plot_metrics` draws a run's plots from metrics.jsonl records.

For a sweep (many runs, aggregated over seeds into groups, see
`srigl_jax.sweep.aggregate`), `plot_accuracy_vs_sparsity` and
`plot_active_neurons_vs_sparsity` draw one config's results per method.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from absl import logging

from srigl_jax.training import metric_writers

SUMMARY_FILE = 'summary.json'


def read_summary(workdir: str) -> dict[str, Any] | None:
  """The summary.json of a finished run in `workdir`, or None if absent."""
  path = os.path.join(workdir, SUMMARY_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def layer_name(path: str) -> str:
  """A layer's display name: its parameter path without the '/kernel' suffix."""
  return path.removesuffix('/kernel')


def _active_pct(stats: Mapping[str, Any]) -> float:
  """% of a layer's neurons that are active (a neuron without weights is not)."""
  return 100.0 * stats['active_neurons'] / max(stats['neurons'], 1)


def final_active_neurons_pct(summary: Mapping[str, Any]) -> dict[str, float]:
  """The final % of active neurons per layer of a `read_summary` result.

  Uses the summary's `active_neurons_pct` and computes it from the neuron
  counts where a summary lacks it.

  Args:
    summary: a run's summary.

  Returns:
    {layer name (`layer_name`): %}, in the summary's (model) order.
  """
  active = {}
  for layer, st in (summary.get('layers') or {}).items():
    pct = st['active_neurons_pct'] if 'active_neurons_pct' in st else _active_pct(st)
    active[layer_name(layer)] = float(pct)
  return active


def layer_names(per_run: Iterable[Mapping[str, Any]]) -> list[str]:
  """Layer names of several runs' {layer: value} dicts, in model order.

  A layer that ERK keeps dense at low sparsity is missing from those runs, so
  the names come from the runs with the most layers first (their dicts are in
  model order) rather than from the first run seen.
  """
  names: list[str] = []
  for pct in sorted(per_run, key=len, reverse=True):
    names += [l for l in pct if l not in names]
  return names


def sparsity_label(sparsity: float) -> str:
  """A sparsity as a % without trailing zeros: 0.95 -> '95'."""
  return f'{100 * sparsity:g}'


def write_summary_and_plots(
    workdir,
    config,
    sparsity_scalars,
    final_eval,
    *,
    steps_per_sec,
    n_devices,
    num_params,
    call_order=None,
    inference=None,
):
  """Writes summary.json and (unless config.write_plots is False) the plots.

  Args:
    workdir: output directory.
    config: the run's config.
    sparsity_scalars: `sparsity_metrics` of the final state, as floats.
    final_eval: {'eval_accuracy', 'eval_loss'} of the final state.
    steps_per_sec: measured training throughput (None if unknown).
    n_devices: devices of the mesh.
    num_params: total number of parameters.
    call_order: module path -> call index, to order the layers input first.
    inference: the export report (`srigl_jax.export.export_model`), or None
      when the run was not exported; summary.json keeps its accuracies and
      latencies.
  """
  layers = {}
  for key, value in sparsity_scalars.items():
    if '/' in key:
      path, field = key.rsplit('/', 1)
      layers.setdefault(path, {})[field] = value
  order = call_order or {}
  layers = dict(
      sorted(layers.items(), key=lambda kv: (order.get(kv[0].rsplit('/', 1)[0], len(order)), kv[0]))
  )
  for s in layers.values():
    s['active_neurons_pct'] = _active_pct(s)
  global_sparsity = sparsity_scalars['global_sparsity']
  summary = {
      'final_step': int(config.num_train_steps),
      'eval_accuracy': final_eval.get('eval_accuracy'),
      'eval_loss': final_eval.get('eval_loss'),
      'steps_per_sec': steps_per_sec,
      'devices': n_devices,
      'global_batch_size': int(config.batch_size),
      'model': config.model.name,
      'dataset': config.input.name,
      'method': config.sparsity.method,
      'target_sparsity': float(config.sparsity.sparsity),
      'global_sparsity': global_sparsity,
      'num_params': num_params,
      'num_nonzero_params': int(round(num_params * (1.0 - global_sparsity))),
      'layers': layers,
  }
  if inference is not None:
    summary['inference'] = {
        key: inference.get(key)
        for key in ('path', 'kind', 'masked_accuracy', 'condensed_accuracy', 'max_abs_logit_diff')
    }
    summary['inference']['latency'] = [
        {key: r[key] for key in ('batch', 'dense_us', 'structured_us', 'condensed_us') if key in r}
        for r in inference.get('latency', [])
    ]
  with open(os.path.join(workdir, SUMMARY_FILE), 'w', encoding='utf-8') as f:
    json.dump(summary, f, indent=2)
  if config.write_plots:
    records = metric_writers.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
    plot_metrics(records, list(layers), workdir)
  logging.info(
      'Final eval accuracy %.4f, global sparsity %.4f, %s steps/s. ' 'Summary: %s',
      summary['eval_accuracy'] or float('nan'),
      summary['global_sparsity'],
      f'{steps_per_sec:.2f}' if steps_per_sec else '?',
      os.path.join(workdir, SUMMARY_FILE),
  )


def _pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  return plt


def plot_metrics(records: list[dict[str, Any]], layer_paths: list[str], out_dir: str) -> list[str]:
  """Writes accuracy.png and active_neurons.png from metrics.jsonl records.

  Args:
    records: the parsed lines of metrics.jsonl.
    layer_paths: sparse layer paths, input side first.
    out_dir: where to write the PNG files.

  Returns:
    The paths written.
  """
  plt = _pyplot()

  def series(key):
    pts = [(r['step'], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]

  written = []
  fig, ax = plt.subplots(figsize=(6, 4))
  for key, label in (('train_accuracy', 'train (batch)'), ('eval_accuracy', 'eval')):
    xs, ys = series(key)
    if xs:
      ax.plot(
          xs,
          [100 * y for y in ys],
          marker='o' if key.startswith('eval') else None,
          markersize=3,
          label=label,
      )
  ax.set_xlabel('step')
  ax.set_ylabel('accuracy (%)')
  ax.set_title('Accuracy')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  path = os.path.join(out_dir, 'accuracy.png')
  fig.savefig(path, dpi=120)
  plt.close(fig)
  written.append(path)

  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  cmap = plt.get_cmap('viridis')
  final_pct = []
  for i, path_ in enumerate(layer_paths):
    xs, active = series(f'{path_}/active_neurons')
    _, total = series(f'{path_}/neurons')
    pct = [100.0 * a / max(t, 1) for a, t in zip(active, total)]
    color = cmap(i / max(1, len(layer_paths) - 1))
    if xs:
      ax1.plot(xs, pct, color=color, label=path_ if len(layer_paths) <= 12 else None)
    final_pct.append(pct[-1] if pct else 100.0)
  ax1.set_xlabel('step')
  ax1.set_ylabel('active neurons (% of layer)')
  ax1.set_title('Active neurons per layer during training')
  ax1.set_ylim(0, 105)
  ax1.grid(alpha=0.3)
  if 0 < len(layer_paths) <= 12:
    ax1.legend(fontsize=7)
  ax2.bar(
      range(len(final_pct)),
      final_pct,
      color=[cmap(i / max(1, len(final_pct) - 1)) for i in range(len(final_pct))],
  )
  ax2.set_xlabel('layer (input side first)')
  ax2.set_ylabel('active neurons (% of layer)')
  ax2.set_title('Active neurons per layer at the end')
  ax2.set_ylim(0, 105)
  if len(layer_paths) <= 24:
    ax2.set_xticks(range(len(layer_paths)))
    ax2.set_xticklabels([layer_name(p) for p in layer_paths], rotation=60, ha='right', fontsize=6)
  fig.tight_layout()
  path = os.path.join(out_dir, 'active_neurons.png')
  fig.savefig(path, dpi=120)
  plt.close(fig)
  written.append(path)
  return written


def _sparsity_axis(groups: Sequence[Mapping[str, Any]]) -> tuple[dict[float, int], list[str]]:
  """x positions and tick labels of the sparsities of the non-dense groups.

  Sparsities sit at equal spacing (0.8 ... 0.99 would crowd the high end on a
  linear axis, where the methods differ most).
  """
  sps = sorted({g['sparsity'] for g in groups if g['method'] != 'dense'})
  return {sp: i for i, sp in enumerate(sps)}, [sparsity_label(sp) for sp in sps]


def _sparsity_figure(groups: Sequence[Mapping[str, Any]], panels: int, panel_size: tuple):
  """pyplot, a figure of `panels` axes side by side, and the sparsity axis of `groups`.

  Returns:
    (pyplot, the figure, its axes, sparsity -> x position, tick labels).
  """
  plt = _pyplot()
  xpos, labels = _sparsity_axis(groups)
  width, height = panel_size
  fig, axes = plt.subplots(1, panels, figsize=(width * panels, height), squeeze=False)
  return plt, fig, axes[0], xpos, labels


def _std(value: float) -> float:
  """An error bar: a standard deviation, 0 where it is NaN (a single seed)."""
  return 0.0 if math.isnan(value) else value


def plot_accuracy_vs_sparsity(
    groups: Sequence[Mapping[str, Any]], methods: Sequence[str], path: str, title: str
) -> str:
  """Plots the test accuracy vs sparsity of each method of one config.

  Args:
    groups: one config's aggregated results, one per method x sparsity, with
      'method', 'sparsity', 'acc_mean' and 'acc_std' (%, NaN for one seed); see
      `srigl_jax.sweep.aggregate`. Sparsities on the x axis are those of all
      non-dense groups.
    methods: the methods to plot, in legend order; 'dense' is drawn as a
      horizontal line (with a ± std band), the others as error bars.
    path: the PNG file to write.
    title: the axes title.

  Returns:
    `path`.
  """
  plt, fig, (ax,), xpos, labels = _sparsity_figure(groups, 1, (7, 4.5))
  for m in methods:
    mg = [g for g in groups if g['method'] == m]
    if m == 'dense':
      g = mg[0]
      ax.axhline(g['acc_mean'], color='k', ls='--', lw=1, label='dense')
      if not math.isnan(g['acc_std']):
        ax.axhspan(g['acc_mean'] - g['acc_std'], g['acc_mean'] + g['acc_std'], color='k', alpha=0.1)
      continue
    mg.sort(key=lambda g: g['sparsity'])
    _errorbar(ax, xpos, mg, lambda g: (g['acc_mean'], g['acc_std']), label=m, size=4)
  _label_axes(ax, labels, 'test accuracy (%)', title)
  ax.legend(fontsize=8)
  return _save(plt, fig, path)


def plot_active_neurons_vs_sparsity(
    groups: Sequence[Mapping[str, Any]], methods: Sequence[str], path: str, title: str
) -> str:
  """Plots the final % of active neurons per layer vs sparsity, one panel per method.

  Args:
    groups: one config's aggregated results, one per method x sparsity, with
      'method', 'sparsity', 'active_pct' {layer: mean %} and 'active_pct_std'
      {layer: std}; see `srigl_jax.sweep.aggregate`. Sparsities on the x axis
      are those of all non-dense groups.
    methods: the methods to plot, one panel each, left to right.
    path: the PNG file to write.
    title: the figure title.

  Returns:
    `path`.
  """
  plt, fig, axes, xpos, labels = _sparsity_figure(groups, len(methods), (4.5, 4))
  for ax, m in zip(axes, methods):
    mg = sorted((g for g in groups if g['method'] == m), key=lambda g: g['sparsity'])
    layers = layer_names(g['active_pct'] for g in mg)
    for layer in layers:
      pts = [g for g in mg if layer in g['active_pct']]
      _errorbar(
          ax,
          xpos,
          pts,
          lambda g, l=layer: (g['active_pct'][l], g['active_pct_std'][l]),
          label=layer,
          size=3,
      )
    ax.set_ylim(0, 105)
    _label_axes(ax, labels, 'active neurons (% of layer)', m)
    if len(layers) <= 12:
      ax.legend(fontsize=7)
  fig.suptitle(title)
  return _save(plt, fig, path)


def _errorbar(
    ax,
    xpos: Mapping[float, int],
    groups: Sequence[Mapping[str, Any]],
    mean_std: Callable[[Mapping[str, Any]], tuple[float, float]],
    label: str,
    size: int,
) -> None:
  """One series of error bars over the sparsity axis: (mean, std) of each group.

  Args:
    ax: the axes.
    xpos: sparsity -> x position (`_sparsity_axis`).
    groups: the series' groups, sorted by sparsity.
    mean_std: a group's mean and standard deviation (NaN: no bar).
    label: the legend entry.
    size: the marker size; the caps are one point smaller.
  """
  values = [mean_std(g) for g in groups]
  ax.errorbar(
      [xpos[g['sparsity']] for g in groups],
      [mean for mean, _ in values],
      yerr=[_std(std) for _, std in values],
      marker='o',
      ms=size,
      capsize=size - 1,
      label=label,
  )


def _label_axes(ax, sparsity_labels: Sequence[str], ylabel: str, title: str) -> None:
  """The sparsity x axis (one tick per sparsity), the y label, the title and a light grid."""
  ax.set_xticks(range(len(sparsity_labels)))
  ax.set_xticklabels(sparsity_labels)
  ax.set_xlabel('sparsity (%)')
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)


def _save(plt, fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
