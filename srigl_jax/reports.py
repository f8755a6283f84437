"""Reports of a run: summary.json and the plots, for the trainer and the sweep.

`write_summary_and_plots` writes a finished run's `summary.json`,
`accuracy.png` and `active_neurons.png`; `read_summary` reads a summary back;
`plot_metrics` draws the plots from metrics.jsonl records.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging

from srigl_jax import export as export_lib
from srigl_jax import metric_writers

SUMMARY_FILE = 'summary.json'


def read_summary(workdir: str) -> dict[str, Any] | None:
  """The summary.json of a finished run in `workdir`, or None if absent."""
  path = os.path.join(workdir, SUMMARY_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)


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
      when the run was not exported.
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
    s['active_neurons_pct'] = 100.0 * s['active_neurons'] / max(s['neurons'], 1)
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
        {key: r[key] for key in ('batch', 'dense_us', 'condensed_us')}
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
  if inference is not None:
    logging.info('%s', export_lib.summary_line(inference))


def plot_metrics(records: list[dict[str, Any]], layer_paths: list[str], out_dir: str) -> list[str]:
  """Writes accuracy.png and active_neurons.png from metrics.jsonl records.

  Args:
    records: the parsed lines of metrics.jsonl.
    layer_paths: sparse layer paths, input side first.
    out_dir: where to write the PNG files.

  Returns:
    The paths written.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

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
    ax2.set_xticklabels(
        [p.removesuffix('/kernel') for p in layer_paths], rotation=60, ha='right', fontsize=6
    )
  fig.tight_layout()
  path = os.path.join(out_dir, 'active_neurons.png')
  fig.savefig(path, dpi=120)
  plt.close(fig)
  written.append(path)
  return written
