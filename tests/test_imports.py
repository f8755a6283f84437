"""The package's import structure: no cycle, and a server that imports no trainer.

`test_no_import_cycle` reads every module of srigl_jax with `ast` (nothing is
imported) and builds the graph of its imports: every `import` and `from ...
import` statement anywhere in a file counts, inside functions too, with
relative imports resolved; `from pkg import name` is an edge to `pkg.name`
when that is a module, else to `pkg`; importing `pkg.sub` also runs `pkg`'s
`__init__`. An import of a module's own ancestor package is left out: Python
has run the ancestors' `__init__` before the module itself, so it cannot run
them again.

`test_serving_imports_no_trainer` exports two tiny trained runs (an MLP and a
CNN) and loads and runs each artefact in a fresh process, which must not
import the trainer, the export, the data pipeline, the sweep or the reports,
nor grain, tensorboardX, matplotlib or tensorflow_datasets.
"""

import ast
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from srigl_jax import data, export
from srigl_jax.sparsity import apply_masks, get_masks
from srigl_jax.training import loop

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable-next=g-import-not-at-top,wrong-import-position
from conftest import REPO, load_config, set_fields

PACKAGE = pathlib.Path(REPO) / 'srigl_jax'


def module_names() -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every module of the package."""
  out = {}
  for path in sorted(PACKAGE.rglob('*.py')):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix('').parts)
    if parts[-1] == '__init__':
      parts.pop()
    out['.'.join(parts)] = path
  return out


def _ancestors(name: str) -> list[str]:
  parts = name.split('.')
  return ['.'.join(parts[:i]) for i in range(1, len(parts))]


def import_graph() -> dict[str, set[str]]:
  """Module -> the package modules its import statements run (see the module doc)."""
  modules = module_names()
  graph = {}
  for name, path in modules.items():
    is_package = path.name == '__init__.py'
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom):
        if node.level:
          # The package a relative import starts from: the module's own
          # package (the module itself for an __init__), then up.
          base = name.split('.')
          base = base if is_package else base[:-1]
          base = base[: len(base) - (node.level - 1)]
          pkg = '.'.join(base + ([node.module] if node.module else []))
        else:
          pkg = node.module
        for alias in node.names:
          sub = f'{pkg}.{alias.name}'
          targets.add(sub if sub in modules else pkg)
    edges = set()
    for target in targets:
      for t in _ancestors(target) + [target]:
        if t in modules and t != name and t not in _ancestors(name):
          edges.add(t)
    graph[name] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of the graph as [a, b, ..., a], or None."""
  state = {}  # 1: on the current path, 2: done.
  path = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt) :] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_the_graph_sees_lazy_relative_and_submodule_imports():
  graph = import_graph()
  # A lazy import inside a function: the root package's export hook.
  assert 'srigl_jax.export' in graph['srigl_jax']
  assert 'srigl_jax.serving' in graph['srigl_jax']
  # `from srigl_jax.data import pipeline` inside the package's __getattr__.
  assert 'srigl_jax.data.pipeline' in graph['srigl_jax.data']
  # `from srigl_jax.training import build as build_lib`: the submodule and the
  # package's __init__ it runs first.
  assert {'srigl_jax.training.build', 'srigl_jax.training'} <= graph['srigl_jax.export']
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']


def test_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_nothing_imports_the_trainer_loop_and_serving_imports_no_trainer():
  graph = import_graph()
  importers = sorted(m for m, edges in graph.items() if 'srigl_jax.training.loop' in edges)
  assert importers == ['srigl_jax.main'], importers
  serving = {m: e for m, e in graph.items() if m.startswith('srigl_jax.serving')}
  for module, edges in serving.items():
    bad = sorted(
        e
        for e in edges
        if e.startswith(('srigl_jax.training', 'srigl_jax.export', 'srigl_jax.sweep'))
        or e in ('srigl_jax.reports', 'srigl_jax.data.pipeline', 'srigl_jax.config_lib')
    )
    assert not bad, (module, bad)


# ------------------------------------------------------------ serving alone

_FORBIDDEN = (
    'srigl_jax.training',
    'srigl_jax.export',
    'srigl_jax.data.pipeline',
    'srigl_jax.sweep',
    'srigl_jax.reports',
    'srigl_jax.config_lib',
    'grain',
    'tensorboardX',
    'matplotlib',
    'tensorflow_datasets',
)

_SERVE = """
import json, sys
import numpy as np
import srigl_jax
model = srigl_jax.load_inference_model(sys.argv[1])
raw = np.load(sys.argv[2])
logits = np.asarray(model(model.preprocess(raw)))
forbidden = json.loads(sys.argv[3])
loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + '.') for f in forbidden))
print(json.dumps({'logits': logits.tolist(), 'loaded': loaded}))
"""

# Tiny runs on generated 28x28 grey images; the trainer exports each at its end.
_RUNS = {
    'mlp': {'model.kwargs.hidden_sizes': (32, 32)},
    'cnn': {'model.kwargs.features': (4, 8), 'model.kwargs.hidden_size': 16},
}


def _tiny_config(name):
  config = load_config('fashion_mnist', f'model={name}')
  config.input = data.default_input_config('synthetic')
  return set_fields(
      config,
      {
          'input.image_shape': (28, 28, 1),
          'input.num_train_examples': 128,
          'input.num_eval_examples': 64,
          'input.prefetch': 0,
          'batch_size': 16,
          'mesh.data': 1,
          'num_train_steps': 4,
          'log_every': 2,
          'eval_every': 4,
          'checkpoint_every': 4,
          'write_plots': False,
          'sparsity.sparsity': 0.8,
          'sparsity.update_every': 2,
          'sparsity.gamma_sal': 0.95,
          **_RUNS[name],
      },
  )


@pytest.mark.parametrize('name', sorted(_RUNS))
def test_serving_imports_no_trainer(name, tmp_path, compilation_cache):
  workdir = str(tmp_path / 'run')
  loop.train_and_evaluate(_tiny_config(name), workdir)
  path = os.path.join(workdir, 'inference')
  with open(os.path.join(path, 'manifest.json')) as f:
    assert json.load(f)['kind'] == 'condensed'
  raw = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
  np.save(tmp_path / 'raw.npy', raw)
  env = dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      JAX_COMPILATION_CACHE_DIR=compilation_cache,
      PYTHONPATH=REPO,
  )
  done = subprocess.run(
      [sys.executable, '-c', _SERVE, path, str(tmp_path / 'raw.npy'), json.dumps(_FORBIDDEN)],
      cwd=str(tmp_path),
      capture_output=True,
      text=True,
      timeout=300,
      env=env,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert result['loaded'] == []
  # The served logits are the masked model's.
  _, model, state, _ = export.restore_run(workdir)
  from srigl_jax.serving import apply_preprocessing  # pylint: disable=g-import-not-at-top

  with open(os.path.join(path, 'manifest.json')) as f:
    x = apply_preprocessing(json.load(f)['preprocessing'], raw)
  variables = {'params': apply_masks(state.params, get_masks(state.opt_state))}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  want = np.asarray(jax.device_get(model.apply(variables, x, train=False)))
  np.testing.assert_allclose(np.array(result['logits']), want, atol=1e-4, rtol=1e-4)
