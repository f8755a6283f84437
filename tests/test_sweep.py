"""Tests of the sweep runner: grid, resume, collection, outputs, one real run."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest

from srigl_jax import config_lib, reports, sweep

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FMNIST = '/usr/share/datasets/fashion-mnist'


# ------------------------------------------------------------------- grid


def test_grid_dense_once_per_seed_and_gamma_spec(tmp_path):
  runs = sweep.expand_grid(
      ['configs/fashion_mnist.py:model=mlp'],
      ['dense', 'rigl', 'srigl', 'srigl@gamma_sal=0.95'],
      [0.9, 0.99],
      [0, 1],
      str(tmp_path),
      ['num_train_steps=20'],
  )
  dense = [r for r in runs if r.method == 'dense']
  assert [(r.sparsity, r.seed) for r in dense] == [(0.0, 0), (0.0, 1)]
  assert len(runs) == 2 + 3 * 2 * 2
  hi = [r for r in runs if r.method == 'srigl@gamma_sal=0.95']
  assert len(hi) == 4
  r = hi[0]
  assert r.config_arg == 'model=mlp,method=srigl,sparsity=0.9'
  assert r.overrides == ('num_train_steps=20', 'sparsity.gamma_sal=0.95')
  assert r.workdir == os.path.join(
      str(tmp_path), 'fashion_mnist-model=mlp', 'srigl@gamma_sal=0.95', 's0.9', 'seed0'
  )
  cmd = r.command('py')
  assert cmd[:3] == ['py', '-m', 'srigl_jax.main']
  assert ('--config=configs/fashion_mnist.py:model=mlp,method=srigl,' 'sparsity=0.9') in cmd
  assert '--config.seed=0' in cmd
  # Later overrides win on the command line: global, config, method.
  assert cmd[-2:] == ['--config.num_train_steps=20', '--config.sparsity.gamma_sal=0.95']
  assert dense[0].config_arg == 'model=mlp,method=dense,sparsity=0'
  assert dense[0].workdir.endswith(os.path.join('dense', 's0', 'seed0'))


def test_grid_config_spec_overrides_and_errors(tmp_path):
  runs = sweep.expand_grid(
      [
          'configs/fashion_mnist.py:model=cnn@num_train_steps=7;' 'model.kwargs.features=(8,16)',
          'configs/fashion_mnist.py',
      ],
      ['static'],
      [0.8],
      [3],
      str(tmp_path),
      ['num_train_steps=5'],
  )
  assert [r.config_name for r in runs] == ['fashion_mnist-model=cnn', 'fashion_mnist']
  assert runs[0].overrides == (
      'num_train_steps=5',
      'num_train_steps=7',
      'model.kwargs.features=(8,16)',
  )
  assert runs[1].config_arg == 'method=static,sparsity=0.8'
  with pytest.raises(ValueError, match='unknown method'):
    sweep.expand_grid(['configs/fashion_mnist.py'], ['nope'], [0.9], [0], str(tmp_path))
  with pytest.raises(ValueError, match='share the directory'):
    sweep.expand_grid(
        ['configs/fashion_mnist.py', 'configs/fashion_mnist.py@seed=1'],
        ['dense'],
        [0.9],
        [0],
        str(tmp_path),
    )
  with pytest.raises(ValueError, match='come from'):
    sweep.expand_grid(
        ['configs/fashion_mnist.py:sparsity=0.5'], ['dense'], [0.9], [0], str(tmp_path)
    )
  with pytest.raises(ValueError, match=r'\(0, 1\)'):
    sweep.expand_grid(['configs/fashion_mnist.py'], ['rigl'], [1.0], [0], str(tmp_path))


def test_check_grid_names_the_runs_that_cannot_train(tmp_path):
  config = os.path.join(_REPO, 'configs', 'fashion_mnist.py')
  runs = sweep.expand_grid(
      [config, f'{config}:model=mlp@num_train_stepz=3'],
      ['dense', 'srigl', 'srigl@gamma_sal=-0.5'],
      [0.9],
      [0, 1],
      str(tmp_path),
      ['num_train_steps=20', 'model.kwargs.hidden_sizes=(16,16)'],
  )
  assert sweep.run_config(runs[0]).model.kwargs.hidden_sizes == (16, 16)
  failed = sweep.check_grid(runs)
  # One check per config x method x sparsity: the seeds share it.
  by_dir = {os.path.relpath(r.workdir, tmp_path): e for r, e in failed}
  gamma = by_dir.pop(os.path.join('fashion_mnist', 'srigl@gamma_sal=-0.5', 's0.9', 'seed0'))
  assert isinstance(gamma, config_lib.ConfigError) and gamma.field == 'sparsity.gamma_sal'
  # The misspelt override fails all three runs of its config spec, as the
  # entry point would.
  assert len(by_dir) == 3 and all('num_train_stepz' in str(e) for e in by_dir.values())


def test_sweep_with_an_invalid_config_trains_nothing(tmp_path):
  out = str(tmp_path / 'sweep')
  cmd = [
      sys.executable,
      '-m',
      'srigl_jax.sweep',
      f'--out={out}',
      f'--configs={os.path.join(_REPO, "configs", "fashion_mnist.py")}',
      '--methods=dense,srigl@gamma_sal=-0.5',
      '--sparsities=0.9',
      '--seeds=0',
  ]
  env = dict(os.environ, PYTHONPATH=_REPO, JAX_PLATFORMS='cpu')
  proc = subprocess.run(
      cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert 'cannot train; nothing was started' in proc.stdout
  assert 'ConfigError (sparsity.gamma_sal): sparsity.gamma_sal must be >= 0' in proc.stdout
  assert not os.path.exists(out)


# ----------------------------------------------------------------- resume


def _fake_summary(workdir, acc, layers=None, sparsity=0.9):
  os.makedirs(workdir, exist_ok=True)
  summary = {
      'final_step': 20,
      'eval_accuracy': acc,
      'steps_per_sec': 10.0,
      'global_sparsity': sparsity,
      'layers': layers or {},
  }
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(summary, f)


def test_finished_runs_are_skipped_and_failures_reported(tmp_path):
  runs = sweep.expand_grid(
      ['configs/fashion_mnist.py'], ['dense', 'static'], [0.9], [0, 1], str(tmp_path)
  )
  _fake_summary(runs[0].workdir, 0.5)
  # A run started before (checkpoint, no summary) is trained again; the
  # trainer resumes it from its checkpoint.
  os.makedirs(os.path.join(runs[1].workdir, 'checkpoints'))
  fake_python = tmp_path / 'fake_python'
  # Stands in for the interpreter: "trains" by writing summary.json into
  # --workdir, except for seed 1 of static, which crashes.
  fake_python.write_text(
      '#!/bin/sh\n'
      'for a in "$@"; do case "$a" in --workdir=*) w="${a#--workdir=}";; '
      'esac; done\n'
      'case "$w" in *static*seed1) echo boom; exit 3;; esac\n'
      'echo \'{"eval_accuracy": 0.7, "layers": {}}\' > "$w/summary.json"\n'
  )
  fake_python.chmod(0o755)
  result = sweep.run_grid(runs, jobs=2, python=str(fake_python))
  assert result['skipped'] == [runs[0]]
  assert sorted(r.workdir for r in result['done']) == sorted([runs[1].workdir, runs[2].workdir])
  assert [r.workdir for r in result['failed']] == [runs[3].workdir]
  assert 'boom' in (open(os.path.join(runs[3].workdir, 'run.log')).read())
  # Second pass: only the failed run is tried again.
  result = sweep.run_grid(runs, jobs=1, python=str(fake_python))
  assert len(result['skipped']) == 3 and len(result['failed']) == 1


# ---------------------------------------------------------------- collect


def _layers(pcts):
  return {
      f'dense_{i}/kernel': {
          'active_neurons': p,
          'neurons': 100,
          'density': 0.1,
          'fan_in': 3,
          'min_fan_in': 1,
          'active_neurons_pct': float(p),
      }
      for i, p in enumerate(pcts)
  }


def _fabricate(out):
  c = os.path.join(out, 'cfg')
  for seed, acc in enumerate([0.80, 0.82, 0.84]):
    _fake_summary(os.path.join(c, 'dense', 's0', f'seed{seed}'), acc, sparsity=0.0)
  for seed, (acc, p0) in enumerate([(0.70, 50), (0.74, 70)]):
    _fake_summary(os.path.join(c, 'rigl', 's0.9', f'seed{seed}'), acc, _layers([p0, 100]))
  _fake_summary(os.path.join(c, 'srigl@gamma_sal=0.95', 's0.99', 'seed0'), 0.6, _layers([40, 100]))
  # Unfinished: listed, not aggregated.
  os.makedirs(os.path.join(c, 'rigl', 's0.99', 'seed0'))


def test_collect_aggregates_exactly(tmp_path):
  out = str(tmp_path)
  _fabricate(out)
  rows = sweep.scan_runs(out)
  assert len(rows) == 7 and sum(r['finished'] for r in rows) == 6
  groups = {(g['method'], g['sparsity']): g for g in sweep.aggregate(rows)}
  assert set(groups) == {('dense', 0.0), ('rigl', 0.9), ('srigl@gamma_sal=0.95', 0.99)}
  d = groups[('dense', 0.0)]
  assert d['n'] == 3 and d['seeds'] == [0, 1, 2]
  assert d['acc_mean'] == pytest.approx(82.0)
  assert d['acc_std'] == pytest.approx(2.0)  # Sample std of 80, 82, 84.
  r = groups[('rigl', 0.9)]
  assert r['acc_mean'] == pytest.approx(72.0)
  assert r['acc_std'] == pytest.approx(math.sqrt(8.0))
  assert r['active_pct'] == {'dense_0': pytest.approx(60.0), 'dense_1': pytest.approx(100.0)}
  assert r['active_pct_std']['dense_0'] == pytest.approx(math.sqrt(200.0))
  s = groups[('srigl@gamma_sal=0.95', 0.99)]
  assert s['n'] == 1 and math.isnan(s['acc_std'])
  assert s['acc_mean'] == pytest.approx(60.0)


def test_mean_std():
  assert sweep.mean_std([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, math.sqrt(5.0 / 3.0)))
  m, s = sweep.mean_std([])
  assert math.isnan(m) and math.isnan(s)


def test_active_pct_from_counts_without_pct_field(tmp_path):
  # A neuron without weights is inactive: 30 of 120 active is 25 %.
  _fake_summary(str(tmp_path), 0.5, {'a/kernel': {'active_neurons': 30, 'neurons': 120}})
  assert sweep.read_run(str(tmp_path))['active_pct'] == {'a': 25.0}


def test_markdown_csv_and_plots(tmp_path):
  out = str(tmp_path)
  _fabricate(out)
  groups = sweep.collect(out)
  md = open(os.path.join(out, 'results.md')).read()
  assert '## cfg' in md
  assert 'Dense: 82.00 ± 2.00 (seeds [0, 1, 2]).' in md
  assert '| sparsity | rigl | srigl@gamma_sal=0.95 |' in md
  assert '| 90 | 72.00 ± 2.83 | - |' in md
  assert '| 99 | - | 60.00 (n=1) |' in md
  assert '| method | sparsity | dense_0 | dense_1 |' in md
  assert '| rigl | 90 | 60.0 | 100.0 |' in md
  assert 'rigl/s0.99/seed0' in md  # Listed as unfinished.
  with open(os.path.join(out, 'results.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(groups) == 3
  rigl = next(r for r in rows if r['method'] == 'rigl')
  assert rigl['sparsity'] == '0.9' and rigl['n_seeds'] == '2'
  assert float(rigl['accuracy_mean']) == pytest.approx(72.0)
  assert float(rigl['accuracy_std']) == pytest.approx(math.sqrt(8.0), 1e-5)
  assert rigl['accuracies'] == '70 74'
  assert float(rigl['active_pct/dense_0']) == 60.0
  dense = next(r for r in rows if r['method'] == 'dense')
  assert dense['active_pct/dense_0'] == ''
  one = next(r for r in rows if r['method'].startswith('srigl'))
  assert one['accuracy_std'] == ''
  with open(os.path.join(out, 'runs.csv'), newline='') as f:
    runs = list(csv.DictReader(f))
  assert len(runs) == 7
  # Relative to the sweep folder, so a committed sweep reads the same anywhere.
  for r in runs:
    assert not os.path.isabs(r['workdir'])
    assert os.path.isdir(os.path.join(out, r['workdir']))
  for name in ('accuracy_cfg.png', 'active_neurons_cfg.png'):
    path = os.path.join(out, name)
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_plots_are_drawn_by_the_reports_functions(tmp_path, monkeypatch):
  out = str(tmp_path)
  _fabricate(out)
  calls = []

  def spy(name):
    real = getattr(reports, name)

    def wrapped(groups, methods, path, title):
      calls.append((name, [g['method'] for g in groups], list(methods), path, title))
      return real(groups, methods, path, title)

    monkeypatch.setattr(reports, name, wrapped)

  spy('plot_accuracy_vs_sparsity')
  spy('plot_active_neurons_vs_sparsity')
  written = sweep.write_plots(sweep.aggregate(sweep.scan_runs(out)), out)
  all_methods = ['dense', 'rigl', 'srigl@gamma_sal=0.95']
  assert calls == [
      (
          'plot_accuracy_vs_sparsity',
          all_methods,
          all_methods,
          os.path.join(out, 'accuracy_cfg.png'),
          'cfg: accuracy vs sparsity (mean ± std over seeds)',
      ),
      (
          'plot_active_neurons_vs_sparsity',
          all_methods,
          ['rigl', 'srigl@gamma_sal=0.95'],
          os.path.join(out, 'active_neurons_cfg.png'),
          'cfg: active neurons per layer at the end',
      ),
  ]
  assert written == [c[3] for c in calls]
  for path in written:
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'


# ------------------------------------------------------------ end to end


@pytest.mark.skipif(
    not os.path.isdir(_FMNIST),
    reason='Fashion-MNIST (Debian dataset-fashion-mnist) ' 'is not installed.',
)
def test_real_sweep_of_two_runs(tmp_path):
  out = str(tmp_path / 'sweep')
  tiny = (
      'num_train_steps=12;batch_size=32;eval_batch_size=100;log_every=6;'
      'eval_every=12;checkpoint_every=12;write_plots=False;'
      'input.num_train_examples=256;input.num_eval_examples=200;'
      'model.kwargs.hidden_sizes=(32,32);sparsity.update_every=4'
  )
  env = dict(os.environ)
  env['PYTHONPATH'] = _REPO + os.pathsep + env.get('PYTHONPATH', '')
  env['JAX_PLATFORMS'] = 'cpu'
  cmd = [
      sys.executable,
      '-m',
      'srigl_jax.sweep',
      f'--out={out}',
      '--configs=configs/fashion_mnist.py:model=mlp',
      '--methods=dense,srigl',
      '--sparsities=0.9',
      '--seeds=0',
      f'--overrides={tiny}',
      '--jobs=2',
  ]
  proc = subprocess.run(
      cmd, cwd=_REPO, env=env, capture_output=True, text=True, timeout=300, check=False
  )
  assert proc.returncode == 0, proc.stdout + proc.stderr
  base = os.path.join(out, 'fashion_mnist-model=mlp')
  for run in ('dense/s0/seed0', 'srigl/s0.9/seed0'):
    assert os.path.exists(os.path.join(base, run, 'summary.json')), open(
        os.path.join(base, run, 'run.log')
    ).read()
  rows = {(r['method'], r['sparsity']): r for r in sweep.scan_runs(out)}
  srigl = rows[('srigl', 0.9)]
  # The table's numbers are the run's own, read back from its summary.json.
  with open(os.path.join(base, 'srigl/s0.9/seed0', 'summary.json'), encoding='utf-8') as f:
    summary = json.load(f)
  assert srigl['finished']
  assert srigl['accuracy'] == pytest.approx(100 * summary['eval_accuracy'])
  assert srigl['global_sparsity'] == pytest.approx(summary['global_sparsity'])
  assert abs(srigl['global_sparsity'] - 0.9) < 0.01
  assert {'dense_0', 'dense_1'} <= set(srigl['active_pct'])
  with open(os.path.join(out, 'results.csv'), newline='') as f:
    assert {r['method'] for r in csv.DictReader(f)} == {'dense', 'srigl'}
  assert os.path.exists(os.path.join(out, 'accuracy_fashion_mnist-model=mlp.png'))
  # Resume: everything is finished, so a rerun would train nothing.
  runs = sweep.expand_grid(
      ['configs/fashion_mnist.py:model=mlp'], ['dense', 'srigl'], [0.9], [0], out, [tiny]
  )
  assert len(runs) == 2 and all(r.finished for r in runs)


def test_layer_columns_follow_the_model_when_low_sparsity_keeps_a_layer_dense():
  # At 80% ERK keeps conv_0 dense, so those runs list only conv_1 and dense_0.
  low = {'conv_1': 100.0, 'dense_0': 100.0}
  high = {'conv_0': 75.0, 'conv_1': 80.0, 'dense_0': 100.0, 'head': 100.0}
  assert reports.layer_names([low, high]) == ['conv_0', 'conv_1', 'dense_0', 'head']


def test_accuracy_differences_and_their_standard_errors():
  d, se = sweep.accuracy_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
  assert d == pytest.approx(2.0) and se == pytest.approx(math.sqrt(1.0 / 3.0))
  assert sweep.accuracy_difference([5.0], [4.0]) == (1.0, 0.0)

  def group(method, sparsity, accs):
    return {'config': 'c', 'method': method, 'sparsity': sparsity, 'accs': accs}

  groups = [
      group('dense', 0.0, [90.0, 90.0]),
      group('static', 0.9, [80.0, 80.2]),
      group('rigl', 0.9, [81.0, 81.2]),
      group('srigl', 0.9, [81.1, 80.9]),
  ]
  text = sweep.differences_markdown(groups)
  # rigl - static: +1.00, se sqrt(0.02 / 2 + 0.02 / 2) = 0.14, > 3 se: clear.
  assert '| rigl - static | +1.00 ± 0.14* |' in text
  assert '| srigl - rigl | -0.10 ± 0.14 |' in text  # Within 3 se: no mark.
  assert 'srigl_noablation' not in text  # Not in the sweep: no row.

  grouped = sweep.differences_markdown(groups + [group('srigl@group_size=8', 0.9, [80.6, 80.4])])
  assert '| srigl@group_size=8 - srigl | -0.50 ± 0.14* |' in grouped
  assert '| srigl@group_size=8 - rigl | -0.60 ± 0.14* |' in grouped
