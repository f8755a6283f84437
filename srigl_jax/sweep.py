r"""Runs a grid of experiments and collects their results into tables and plots.

  python -m srigl_jax.sweep --out=/tmp/sweep \
      --configs=configs/fashion_mnist.py:model=mlp \
      --configs=configs/fashion_mnist.py:model=cnn \
      --methods=dense,static,rigl,srigl_noablation,srigl,srigl@gamma_sal=0.95 \
      --sparsities=0.8,0.9,0.95,0.98,0.99 --seeds=0,1,2 \
      --overrides=num_train_steps=2000 --jobs=2

Before anything is trained, the config of every run is parsed from the same
flags its subprocess gets and built (`training.build`: every config check and
every layer's fan-in, no data read, nothing compiled): a grid holding a run
that cannot train stops here, naming the run and the config field. Each run
then trains in its own subprocess (`python -m srigl_jax.main`), so a crash
of one run does not stop the others, and writes to

  OUT/<config>/<method>/s<sparsity>/seed<k>/

`dense` runs once per seed (its directory is `s0`). A run whose summary.json
exists is skipped, so running the same command again resumes a stopped sweep;
a run stopped half-way resumes from its own checkpoint (the trainer's resume).

Specs:
  config  `PATH[:ARG][@KEY=VALUE;KEY=VALUE...]`: ARG is the config file's arg
          (e.g. `model=cnn`; method and sparsity are added by the sweep); the
          overrides after '@' are full config paths (`num_train_steps=1000`,
          `model.kwargs.hidden_size=128`) and apply to this config only. The
          directory name is the file's stem plus the arg
          (`fashion_mnist-model=cnn`).
  method  `NAME[@KEY=VALUE;...]`: NAME is one of `config_lib.RECIPES`; a key
          without a dot is a field of `config.sparsity`, so
          `srigl@gamma_sal=0.95` is SRigL with gamma_sal 0.95. The directory
          name is the spec itself.

Afterwards (or with --collect_only) every finished run's summary.json is read
and OUT gets results.md (Markdown tables: mean +- std over seeds of the final
test accuracy per config x method x sparsity, and the final % of active neurons
per layer), results.csv (the same, one row per config x method x sparsity),
runs.csv (one row per run), accuracy_<config>.png and
active_neurons_<config>.png (drawn by `srigl_jax.reports`).
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from srigl_jax import config_lib, reports
from srigl_jax.training import build as build_lib

# Repeated flags, not comma lists: config args and tuple values hold commas.
_CONFIGS = flags.DEFINE_multi_string(
    'configs',
    ['configs/fashion_mnist.py:model=mlp'],
    'Config spec PATH[:ARG][@KEY=VALUE;...] (see the module docstring); '
    'repeat the flag for several configs.',
)
_METHODS = flags.DEFINE_list(
    'methods',
    ['dense', 'static', 'set', 'rigl', 'srigl_noablation', 'srigl'],
    'Method specs NAME[@KEY=VALUE;...], e.g. srigl@gamma_sal=0.95.',
)
_SPARSITIES = flags.DEFINE_list(
    'sparsities',
    ['0.8', '0.9', '0.95', '0.98', '0.99'],
    'Sparsities of the sparse methods (dense ignores them).',
)
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds (config.seed).')
_OUT = flags.DEFINE_string('out', None, 'Output directory of the sweep.')
_OVERRIDES = flags.DEFINE_multi_string(
    'overrides',
    [],
    'Config overrides KEY=VALUE;KEY=VALUE applied to every run, e.g. '
    '"num_train_steps=2000;write_plots=False"; the flag may be repeated.',
)
_DRY_RUN = flags.DEFINE_bool(
    'dry_run', False, 'Check the configs, print the grid (and what is finished) and exit.'
)
_JOBS = flags.DEFINE_integer('jobs', 1, 'Runs trained in parallel processes.')
_COLLECT_ONLY = flags.DEFINE_bool(
    'collect_only', False, 'Do not train; only collect the finished runs.'
)

# Methods whose active neurons per layer are plotted (a spec 'srigl@...'
# counts as SRigL).
_NEURON_PLOT_METHODS = ('rigl', 'srigl')
_SUMMARY = reports.SUMMARY_FILE
_LOG = 'run.log'


# ------------------------------------------------------------------- grid


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of the grid.

  Attributes:
    config_name: directory name of the config spec.
    config_path: the config file.
    config_arg: the config file's arg, method and sparsity included.
    method: method spec as given (its directory name).
    sparsity: 0.0 for dense.
    seed: config.seed.
    overrides: KEY=VALUE config overrides, in order (later ones win).
    workdir: the run's directory.
  """

  config_name: str
  config_path: str
  config_arg: str
  method: str
  sparsity: float
  seed: int
  overrides: tuple[str, ...]
  workdir: str

  def command(self, python: str = sys.executable) -> list[str]:
    """The subprocess command line that trains this run."""
    config_file, *overrides = self.config_flags()
    return [python, '-m', 'srigl_jax.main', config_file, f'--workdir={self.workdir}', *overrides]

  def config_flags(self) -> list[str]:
    """The entry point's flags that give this run's config: file and arg, then overrides."""
    return [
        f'--config={self.config_path}:{self.config_arg}',
        f'--config.seed={self.seed}',
    ] + [f'--config.{o}' for o in self.overrides]

  @property
  def finished(self) -> bool:
    return os.path.exists(os.path.join(self.workdir, _SUMMARY))


def _parse_overrides(text: str, default_group: str | None, what: str) -> list[str]:
  """Parses 'k=v;k2=v2'; keys without a dot go to `default_group`."""
  out = []
  for item in text.split(';'):
    item = item.strip()
    if not item:
      continue
    if '=' not in item:
      raise ValueError(f'{what}: override {item!r} is not KEY=VALUE.')
    key, value = (s.strip() for s in item.split('=', 1))
    if default_group and '.' not in key:
      key = f'{default_group}.{key}'
    out.append(f'{key}={value}')
  return out


def parse_config_spec(spec: str) -> tuple[str, str, str, list[str]]:
  """Splits a config spec `PATH[:ARG][@KEY=VALUE;...]`.

  Args:
    spec: the spec.

  Returns:
    (directory name, path, arg, overrides).

  Raises:
    ValueError: a malformed spec.
  """
  body, _, extra = spec.partition('@')
  path, _, arg = body.partition(':')
  if not path.endswith('.py'):
    raise ValueError(f'Config spec {spec!r}: the path must name a .py file.')
  if re.search(r'(^|,)\s*(method|sparsity)\s*=', arg):
    raise ValueError(
        f'Config spec {spec!r}: method and sparsity come from '
        '--methods and --sparsities, not the config arg.'
    )
  name = os.path.splitext(os.path.basename(path))[0]
  if arg:
    name += '-' + '-'.join(a.strip() for a in arg.split(',') if a.strip())
  return name, path, arg, _parse_overrides(extra, None, spec)


def parse_method_spec(spec: str) -> tuple[str, list[str]]:
  """Splits a method spec `NAME[@KEY=VALUE;...]` into (name, overrides).

  Raises:
    ValueError: an unknown method or a malformed override.
  """
  name, _, extra = spec.partition('@')
  name = name.strip()
  if name not in config_lib.RECIPES:
    raise ValueError(
        f'Method spec {spec!r}: unknown method {name!r}; valid: ' f'{list(config_lib.RECIPES)}.'
    )
  return name, _parse_overrides(extra, 'sparsity', spec)


def _sparsity_dir(sparsity: float) -> str:
  return f's{sparsity:g}'


def expand_grid(
    configs: Sequence[str],
    methods: Sequence[str],
    sparsities: Sequence[float],
    seeds: Sequence[int],
    out: str,
    overrides: Sequence[str] = (),
) -> list[Run]:
  """All runs of the grid; dense once per seed, not per sparsity.

  Override precedence (later wins): the global `overrides`, then the config
  spec's, then the method spec's.

  Args:
    configs: config specs.
    methods: method specs.
    sparsities: sparsities of the sparse methods.
    seeds: seeds.
    out: the sweep's output directory.
    overrides: KEY=VALUE config overrides of every run.

  Returns:
    The runs, config-major, then method, sparsity, seed.

  Raises:
    ValueError: a malformed spec, or two specs with the same directory.
  """
  for s in sparsities:
    if not 0.0 < float(s) < 1.0:
      raise ValueError(f'Sparsities must be in (0, 1), got {s}.')
  global_overrides = _parse_overrides(';'.join(overrides), None, '--overrides')
  runs, seen = [], set()
  for cspec in configs:
    cname, cpath, carg, cover = parse_config_spec(cspec)
    for mspec in methods:
      mname, mover = parse_method_spec(mspec)
      sps = [0.0] if mname == 'dense' else [float(s) for s in sparsities]
      for sp in sps:
        for seed in seeds:
          arg = ','.join(a for a in (carg, f'method={mname}', f'sparsity={sp:g}') if a)
          workdir = os.path.join(out, cname, mspec.strip(), _sparsity_dir(sp), f'seed{int(seed)}')
          if workdir in seen:
            raise ValueError(
                f'Two grid entries share the directory {workdir}; '
                'make the config/method specs distinct.'
            )
          seen.add(workdir)
          runs.append(
              Run(
                  cname,
                  cpath,
                  arg,
                  mspec.strip(),
                  sp,
                  int(seed),
                  tuple(global_overrides + cover + mover),
                  workdir,
              )
          )
  return runs


# ------------------------------------------------------------------ check


def run_config(run: Run) -> ml_collections.ConfigDict:
  """The config `run.command()` trains, parsed from its flags as the entry point parses them."""
  argv = ['srigl_jax.main', *run.config_flags()]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file(
      'config', None, flag_values=flag_values, lock_config=True, sys_argv=argv
  )
  flag_values(argv)
  return flag_values.config


def check_grid(runs: Sequence[Run]) -> list[tuple[Run, Exception]]:
  """Builds the config of every run of the grid: no data read, nothing compiled.

  Runs that differ only in their seed share one check.

  Args:
    runs: the runs to check.

  Returns:
    (run, error) for every run that cannot train: a `config_lib.ConfigError`
    (whose `field` names the config field), or the error of its config file,
    arg or overrides.
  """
  failed, seen = [], set()
  for run in runs:
    key = (run.config_path, run.config_arg, run.overrides)
    if key in seen:
      continue
    seen.add(key)
    try:
      build_lib.build(run_config(run), open_dataset=False)
    except Exception as e:  # pylint: disable=broad-except
      failed.append((run, e))  # Whatever it is, the run's subprocess would fail on it.
  return failed


def _report_invalid(failed: Sequence[tuple[Run, Exception]]) -> None:
  print(f'{len(failed)} config(s) of the grid cannot train; nothing was started:', flush=True)
  for run, e in failed:
    field = getattr(e, 'field', None)
    print(
        f'  {subprocess.list2cmdline(run.command())}\n'
        f'    {type(e).__name__}{f" ({field})" if field else ""}: {e}',
        flush=True,
    )


# -------------------------------------------------------------------- run


def run_one(run: Run, python: str = sys.executable, env: dict[str, str] | None = None) -> int:
  """Trains one run in a subprocess, its output going to WORKDIR/run.log.

  Args:
    run: the run.
    python: the interpreter.
    env: the subprocess environment (default: this process's).

  Returns:
    The subprocess's exit code (0: finished).
  """
  os.makedirs(run.workdir, exist_ok=True)
  # Append: a resumed run keeps the log of its earlier attempts.
  with open(os.path.join(run.workdir, _LOG), 'a', encoding='utf-8') as log:
    log.write(
        f'\n# {time.strftime("%Y-%m-%d %H:%M:%S")} '
        f'{subprocess.list2cmdline(run.command(python))}\n'
    )
    log.flush()
    proc = subprocess.run(
        run.command(python), stdout=log, stderr=subprocess.STDOUT, env=env, check=False
    )
  return proc.returncode


def run_grid(
    runs: Sequence[Run],
    jobs: int = 1,
    python: str = sys.executable,
    env: dict[str, str] | None = None,
) -> dict[str, list[Run]]:
  """Trains the unfinished runs, `jobs` at a time.

  Args:
    runs: the grid.
    jobs: parallel subprocesses.
    python: the interpreter.
    env: the subprocess environment.

  Returns:
    {'skipped': [...], 'done': [...], 'failed': [...]}.
  """
  result = {'skipped': [r for r in runs if r.finished], 'done': [], 'failed': []}
  todo = [r for r in runs if not r.finished]
  print(
      f'{len(runs)} runs: {len(result["skipped"])} already finished, '
      f'{len(todo)} to train ({jobs} at a time).',
      flush=True,
  )
  start = time.time()

  def work(r):
    t0 = time.time()
    rc = run_one(r, python, env)
    return r, rc, time.time() - t0

  with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
    futures = [pool.submit(work, r) for r in todo]
    for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
      r, rc, secs = fut.result()
      ok = rc == 0 and r.finished
      result['done' if ok else 'failed'].append(r)
      print(
          f'[{i}/{len(todo)}] {"ok" if ok else f"FAILED (exit {rc})"} '
          f'{secs:.0f}s  {r.workdir}' + ('' if ok else f'  (see {os.path.join(r.workdir, _LOG)})'),
          flush=True,
      )
  if todo:
    print(
        f'Trained {len(result["done"])} runs in {time.time() - start:.0f}s; '
        f'{len(result["failed"])} failed.',
        flush=True,
    )
  return result


# ---------------------------------------------------------------- collect


def read_run(workdir: str) -> dict[str, Any] | None:
  """The results of one finished run, or None if it has no summary.json.

  The final test accuracy is summary.json's `eval_accuracy` (the trainer
  evaluates at the last step); the per-layer % of active neurons is computed
  from the final masks, where a neuron without any weight is inactive (RigL
  included).

  Returns:
    {'accuracy', 'global_sparsity', 'steps_per_sec', 'final_step',
    'active_pct': {layer: %}} with accuracy in %.
  """
  s = reports.read_summary(workdir)
  if s is None:
    return None
  acc = s.get('eval_accuracy')
  return {
      'accuracy': None if acc is None else 100.0 * float(acc),
      'global_sparsity': s.get('global_sparsity'),
      'steps_per_sec': s.get('steps_per_sec'),
      'final_step': s.get('final_step'),
      'active_pct': reports.final_active_neurons_pct(s),
  }


def _parse_sparsity_dir(name: str) -> float | None:
  m = re.fullmatch(r's([0-9.eE+-]+)', name)
  try:
    return float(m.group(1)) if m else None
  except ValueError:
    return None


def scan_runs(out: str) -> list[dict[str, Any]]:
  """Reads every run under OUT/<config>/<method>/s<sparsity>/seed<k>/.

  Returns:
    One dict per run directory (`read_run` fields plus 'config', 'method',
    'sparsity', 'seed', 'workdir', 'finished'), sorted.
  """
  rows = []
  if not os.path.isdir(out):
    return rows
  for cname in sorted(os.listdir(out)):
    cdir = os.path.join(out, cname)
    if not os.path.isdir(cdir):
      continue
    for method in sorted(os.listdir(cdir)):
      mdir = os.path.join(cdir, method)
      if not os.path.isdir(mdir):
        continue
      for sdir in os.listdir(mdir):
        sp = _parse_sparsity_dir(sdir)
        if sp is None:
          continue
        for seed_dir in os.listdir(os.path.join(mdir, sdir)):
          m = re.fullmatch(r'seed(\d+)', seed_dir)
          if not m:
            continue
          workdir = os.path.join(mdir, sdir, seed_dir)
          res = read_run(workdir)
          row = {
              'config': cname,
              'method': method,
              'sparsity': sp,
              'seed': int(m.group(1)),
              'workdir': workdir,
              'finished': res is not None,
          }
          row.update(res or {})
          rows.append(row)
  rows.sort(key=lambda r: (r['config'], _method_order(r['method']), r['sparsity'], r['seed']))
  return rows


def _method_order(method: str) -> tuple[int, str]:
  base = method.partition('@')[0]
  idx = config_lib.RECIPES.index(base) if base in config_lib.RECIPES else len(config_lib.RECIPES)
  return idx, method


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; NaN for a single value)."""
  n = len(values)
  if n == 0:
    return math.nan, math.nan
  mean = sum(values) / n
  if n == 1:
    return mean, math.nan
  var = sum((v - mean) ** 2 for v in values) / (n - 1)
  return mean, math.sqrt(var)


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Groups finished runs by config x method x sparsity; mean/std over seeds.

  Returns:
    One dict per group: 'config', 'method', 'sparsity', 'n', 'seeds',
    'acc_mean', 'acc_std', 'accs', 'global_sparsity', 'steps_per_sec',
    'active_pct' {layer: mean %}, 'active_pct_std' {layer: std}; layers in the
    runs' order (input side first).
  """
  groups: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
  for r in rows:
    if r.get('finished') and r.get('accuracy') is not None:
      groups.setdefault((r['config'], r['method'], r['sparsity']), []).append(r)
  out = []
  for (cname, method, sp), rs in groups.items():
    rs = sorted(rs, key=lambda r: r['seed'])
    accs = [r['accuracy'] for r in rs]
    mean, std = mean_std(accs)
    layers = reports.layer_names(r['active_pct'] for r in rs)
    active, active_std = {}, {}
    for layer in layers:
      vals = [r['active_pct'][layer] for r in rs if layer in r['active_pct']]
      active[layer], active_std[layer] = mean_std(vals)
    sps = [r['steps_per_sec'] for r in rs if r.get('steps_per_sec')]
    gs = [r['global_sparsity'] for r in rs if r.get('global_sparsity') is not None]
    out.append(
        {
            'config': cname,
            'method': method,
            'sparsity': sp,
            'n': len(rs),
            'seeds': [r['seed'] for r in rs],
            'acc_mean': mean,
            'acc_std': std,
            'accs': accs,
            'global_sparsity': mean_std(gs)[0] if gs else math.nan,
            'steps_per_sec': mean_std(sps)[0] if sps else math.nan,
            'active_pct': active,
            'active_pct_std': active_std,
        }
    )
  out.sort(key=lambda g: (g['config'], _method_order(g['method']), g['sparsity']))
  return out


def _fmt_acc(g: dict[str, Any] | None) -> str:
  if g is None:
    return '-'
  if math.isnan(g['acc_std']):
    return f'{g["acc_mean"]:.2f} (n=1)'
  return f'{g["acc_mean"]:.2f} ± {g["acc_std"]:.2f}'


def _is_neuron_method(method: str) -> bool:
  return method.partition('@')[0] in _NEURON_PLOT_METHODS


def accuracy_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
  """Mean of `a` minus mean of `b`, and the standard error of that difference.

  The standard error is sqrt(s_a^2 / n_a + s_b^2 / n_b) with sample standard
  deviations (0 for a single value).
  """
  var = lambda x: statistics.variance(x) if len(x) > 1 else 0.0
  diff = statistics.fmean(a) - statistics.fmean(b)
  return diff, math.sqrt(var(a) / len(a) + var(b) / len(b))


def differences_markdown(
    groups: Sequence[dict[str, Any]], pairs: Sequence[tuple[str, str]] | None = None
) -> str:
  """Per config, each pair's accuracy difference a - b ± its standard error at every sparsity.

  A '*' marks a difference larger than three standard errors. Pairs with a
  method the sweep lacks are left out.

  Args:
    groups: `aggregate` output.
    pairs: (a, b) method pairs; default: every method against RigL and
      against static, ablation against no ablation, and grouped SRigL
      (`srigl@group_size=G`) against SRigL.

  Returns:
    Markdown, one table per config.
  """
  lines = [
      '# Differences between methods',
      '',
      'Test accuracy of a minus b (points), mean over seeds ± the standard error of the',
      'difference; * = more than three standard errors. Sparsity in %.',
  ]
  for cname in sorted({g['config'] for g in groups}):
    accs = {(g['method'], g['sparsity']): g['accs'] for g in groups if g['config'] == cname}
    methods = sorted({m for m, _ in accs if m != 'dense'}, key=_method_order)
    sparsities = sorted({s for m, s in accs if m != 'dense'})
    wanted = pairs or (
        [(m, 'rigl') for m in methods if m not in ('rigl', 'static')]
        + [(m, 'srigl_noablation') for m in methods if m.startswith('srigl@') or m == 'srigl']
        + [(m, 'srigl') for m in methods if m.startswith('srigl@group_size=')]
        + [(m, 'static') for m in methods if m != 'static']
    )
    wanted = [(a, b) for a, b in wanted if a in methods and b in methods]
    if not wanted:
      continue
    lines += ['', f'## {cname}', '']
    lines.append('| a - b | ' + ' | '.join(reports.sparsity_label(s) for s in sparsities) + ' |')
    lines.append('|---|' + '---|' * len(sparsities))
    for a, b in wanted:
      cells = []
      for s in sparsities:
        if (a, s) not in accs or (b, s) not in accs:
          cells.append('-')
          continue
        d, se = accuracy_difference(accs[(a, s)], accs[(b, s)])
        cells.append(f'{d:+.2f} ± {se:.2f}{"*" if abs(d) > 3 * se else ""}')
      lines.append(f'| {a} - {b} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def results_markdown(groups: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]] = ()) -> str:
  """The Markdown page: per config an accuracy table and an active-neuron table.

  Args:
    groups: `aggregate` output.
    rows: `scan_runs` output, to list unfinished runs (optional).

  Returns:
    Markdown text.
  """
  lines = [
      '# Sweep results',
      '',
      'Final test accuracy (%), mean ± sample std over seeds (n seeds per '
      'cell as listed in results.csv). Sparsity in %.',
      '',
  ]
  for cname in sorted({g['config'] for g in groups}):
    cg = [g for g in groups if g['config'] == cname]
    methods = sorted({g['method'] for g in cg}, key=_method_order)
    sparse_methods = [m for m in methods if m.partition('@')[0] != 'dense']
    by = {(g['method'], g['sparsity']): g for g in cg}
    lines += [f'## {cname}', '']
    dense = [g for g in cg if g['method'] == 'dense']
    if dense:
      lines += [f'Dense: {_fmt_acc(dense[0])} (seeds {dense[0]["seeds"]}).', '']
    sps = sorted({g['sparsity'] for g in cg if g['method'] != 'dense'})
    if sparse_methods and sps:
      lines.append('| sparsity | ' + ' | '.join(sparse_methods) + ' |')
      lines.append('|---' * (len(sparse_methods) + 1) + '|')
      for sp in sps:
        lines.append(
            f'| {reports.sparsity_label(sp)} | '
            + ' | '.join(_fmt_acc(by.get((m, sp))) for m in sparse_methods)
            + ' |'
        )
      lines.append('')
    ng = [g for g in cg if g['method'] != 'dense' and g['active_pct']]
    if ng:
      layers = reports.layer_names(g['active_pct'] for g in ng)
      lines += [
          'Active neurons at the end (% of each layer, mean over seeds; '
          'a neuron without weights is inactive):',
          '',
      ]
      lines.append('| method | sparsity | ' + ' | '.join(layers) + ' |')
      lines.append('|---' * (len(layers) + 2) + '|')
      for g in ng:
        cells = [f'{g["active_pct"][l]:.1f}' if l in g['active_pct'] else '-' for l in layers]
        lines.append(
            f'| {g["method"]} | {reports.sparsity_label(g["sparsity"])} | '
            + ' | '.join(cells)
            + ' |'
        )
      lines.append('')
  unfinished = [r for r in rows if not r.get('finished')]
  if unfinished:
    lines += ['## Unfinished runs', '']
    lines += [f'- {r["workdir"]}' for r in unfinished]
    lines.append('')
  return '\n'.join(lines)


def _num(x: Any) -> str:
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return ''
  return f'{x:.6g}' if isinstance(x, float) else str(x)


# The columns that name a result, and their cells.
_KEY_COLUMNS = ('config', 'method', 'sparsity')


def _key_cells(record: dict[str, Any]) -> list[Any]:
  return [record['config'], record['method'], _num(record['sparsity'])]


def _write_csv(path: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
  with open(path, 'w', newline='', encoding='utf-8') as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)


def write_csv(groups: Sequence[dict[str, Any]], path: str) -> None:
  """One row per config x method x sparsity; one column per layer's active %."""
  layers = reports.layer_names(g['active_pct'] for g in groups)
  header = [*_KEY_COLUMNS, 'n_seeds', 'seeds', 'accuracy_mean', 'accuracy_std', 'accuracies']
  header += ['global_sparsity', 'steps_per_sec'] + [f'active_pct/{l}' for l in layers]
  _write_csv(
      path,
      header,
      (
          _key_cells(g)
          + [
              g['n'],
              ' '.join(map(str, g['seeds'])),
              _num(g['acc_mean']),
              _num(g['acc_std']),
              ' '.join(_num(a) for a in g['accs']),
              _num(g['global_sparsity']),
              _num(g['steps_per_sec']),
          ]
          + [_num(g['active_pct'].get(l)) for l in layers]
          for g in groups
      ),
  )


def write_runs_csv(rows: Sequence[dict[str, Any]], path: str) -> None:
  """One row per run directory (relative to the CSV's folder), finished or not."""
  base = os.path.dirname(os.path.abspath(path))
  header = [*_KEY_COLUMNS, 'seed', 'finished', 'accuracy', 'global_sparsity', 'steps_per_sec']
  header.append('workdir')
  _write_csv(
      path,
      header,
      (
          _key_cells(r)
          + [
              r['seed'],
              int(r['finished']),
              _num(r.get('accuracy')),
              _num(r.get('global_sparsity')),
              _num(r.get('steps_per_sec')),
              os.path.relpath(r['workdir'], base),
          ]
          for r in rows
      ),
  )


def write_plots(groups: Sequence[dict[str, Any]], out: str) -> list[str]:
  """accuracy_<config>.png and active_neurons_<config>.png per config.

  Drawn by `reports.plot_accuracy_vs_sparsity` (every method) and
  `reports.plot_active_neurons_vs_sparsity` (the RigL and SRigL methods; no
  file for a config without them).

  Returns:
    The paths written.
  """
  written = []
  for cname in sorted({g['config'] for g in groups}):
    cg = [g for g in groups if g['config'] == cname]
    methods = sorted({g['method'] for g in cg}, key=_method_order)
    written.append(
        reports.plot_accuracy_vs_sparsity(
            cg,
            methods,
            os.path.join(out, f'accuracy_{cname}.png'),
            f'{cname}: accuracy vs sparsity (mean ± std over seeds)',
        )
    )
    nmethods = [m for m in methods if _is_neuron_method(m)]
    if nmethods:
      written.append(
          reports.plot_active_neurons_vs_sparsity(
              cg,
              nmethods,
              os.path.join(out, f'active_neurons_{cname}.png'),
              f'{cname}: active neurons per layer at the end',
          )
      )
  return written


def collect(out: str, plots: bool = True) -> list[dict[str, Any]]:
  """Reads every run under `out` and writes results.md/.csv, differences.md, runs.csv, plots.

  Returns:
    The `aggregate` groups.
  """
  rows = scan_runs(out)
  groups = aggregate(rows)
  with open(os.path.join(out, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(results_markdown(groups, rows))
  with open(os.path.join(out, 'differences.md'), 'w', encoding='utf-8') as f:
    f.write(differences_markdown(groups))
  write_csv(groups, os.path.join(out, 'results.csv'))
  write_runs_csv(rows, os.path.join(out, 'runs.csv'))
  if plots and groups:
    write_plots(groups, out)
  n_done = sum(r['finished'] for r in rows)
  print(
      f'Collected {n_done} finished runs of {len(rows)} into '
      f'{os.path.join(out, "results.md")} and results.csv.',
      flush=True,
  )
  return groups


# ------------------------------------------------------------------- main


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _OUT.value:
    raise app.UsageError('--out is required.')
  out = os.path.abspath(_OUT.value)
  if not _COLLECT_ONLY.value:
    runs = expand_grid(
        _CONFIGS.value,
        _METHODS.value,
        [float(s) for s in _SPARSITIES.value],
        [int(s) for s in _SEEDS.value],
        out,
        _OVERRIDES.value,
    )
    # This process only traces shapes: on the CPU it holds no accelerator
    # memory that the training subprocesses need.
    jax.config.update('jax_platforms', 'cpu')
    failed = check_grid([r for r in runs if not r.finished])
    if failed:
      _report_invalid(failed)
      sys.exit(1)
    if _DRY_RUN.value:
      for r in runs:
        state = 'done' if r.finished else 'todo'
        print(f'{state}  {subprocess.list2cmdline(r.command())}')
      print(f'{len(runs)} runs, {sum(r.finished for r in runs)} finished.')
      return
    os.makedirs(out, exist_ok=True)
    result = run_grid(runs, jobs=_JOBS.value)
  else:
    result = {'failed': []}
  collect(out)
  if result['failed']:
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
