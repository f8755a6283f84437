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
  ]
  latency = report.get('latency', [])
  has_structured = any('structured_us' in r for r in latency)
  header = '  batch   dense (us)   '
  if has_structured:
    header += 'structured (us)   '
  header += f"{report['kind']} (us)".ljust(16) + 'speed-up'
  if has_structured:
    header += '   vs structured'
  lines.append(header)
  for r in latency:
    line = f"  {r['batch']:5d}   {r['dense_us']:10.1f}   "
    if has_structured:
      line += f"{r.get('structured_us', float('nan')):15.1f}   "
    line += f"{r['condensed_us']:14.1f}   {r['speedup']:7.2f}x"
    if has_structured:
      line += f"   {r.get('speedup_vs_structured', float('nan')):14.2f}x"
    lines.append(line)
  return '\n'.join(lines)


def summary_line(report: Mapping[str, Any]) -> str:
  """One line for the end of training: accuracy and speed-up at batch 1.

  The speed-up is against masked dense, and against structured (ablated
  neurons removed, dense kernels) where the report has it.
  """
  acc_c = 100 * report['condensed_accuracy']
  acc_m = 100 * report['masked_accuracy']
  same = (
      'same as masked'
      if report['condensed_accuracy'] == report['masked_accuracy']
      else f'masked {acc_m:.2f}%'
  )
  b1 = next((r for r in report.get('latency', []) if r['batch'] == 1), None)
  speed = f", {b1['speedup']:.1f}x faster than dense at batch 1" if b1 else ''
  if b1 and 'speedup_vs_structured' in b1:
    speed += f" ({b1['speedup_vs_structured']:.1f}x vs structured)"
  if report['kind'] == 'dense':
    return f'dense model (nothing to condense): {acc_c:.2f}%, exported to ' f"{report['path']}"
  return f'condensed model: {acc_c:.2f}% ({same}){speed}'
