"""The export report (an artefact's report.json) as text.

`format_report` is the table `python -m srigl_jax.export` prints;
`summary_line` is the line a training run ends with. Plain string formatting:
the trainer and the sweep import it without loading the export.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def format_report(report: Mapping[str, Any]) -> str:
  """The report as a short text table."""
  lines = [
      f"{report['kind']} model from step {report['source_step']}: " f"{report['path']}",
      f"  eval examples      {report['eval_examples']}",
      f"  masked accuracy    {100 * report['masked_accuracy']:.2f}%",
      f"  {report['kind']:9s} accuracy " f"{100 * report['condensed_accuracy']:.2f}%",
      f"  max |logit diff|   {report['max_abs_logit_diff']:.3g}",
      '  batch   dense (us)   ' + f"{report['kind']} (us)".ljust(16) + 'speed-up',
  ]
  for r in report.get('latency', []):
    lines.append(
        f"  {r['batch']:5d}   {r['dense_us']:10.1f}   "
        f"{r['condensed_us']:14.1f}   {r['speedup']:7.2f}x"
    )
  return '\n'.join(lines)


def summary_line(report: Mapping[str, Any]) -> str:
  """One line for the end of training: accuracy and speed-up at batch 1."""
  acc_c = 100 * report['condensed_accuracy']
  acc_m = 100 * report['masked_accuracy']
  same = (
      'same as masked'
      if report['condensed_accuracy'] == report['masked_accuracy']
      else f'masked {acc_m:.2f}%'
  )
  b1 = next((r for r in report.get('latency', []) if r['batch'] == 1), None)
  speed = f", {b1['speedup']:.1f}x faster than dense at batch 1" if b1 else ''
  if report['kind'] == 'dense':
    return f'dense model (nothing to condense): {acc_c:.2f}%, exported to ' f"{report['path']}"
  return f'condensed model: {acc_c:.2f}% ({same}){speed}'
