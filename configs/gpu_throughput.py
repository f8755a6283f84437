r"""Training throughput on generated data: the paper's recipes, no dataset needed.

`model` picks the recipe and input shape:
  resnet18       ResNet-18 with the CIFAR-10 recipe (configs/cifar10_resnet18.py)
                 on 32x32x3 images, 10 classes, batch 128;
  vit_s16        ViT-S/16 with the ViT-B/16 ImageNet recipe
                 (configs/imagenet_vit_b16.py: AdamW, uniform sparsity, delta
                 100) on 224x224x3 images, 1000 classes, batch 128, no
                 RandAugment or mixup (they cost host time, not device time);
  resnet18_tiny, vit_tiny   the same recipes at toy sizes for a CPU.
300 steps (30 for the toy sizes); evaluation, a checkpoint and nothing else
at the end; no export, no plots.

Command (SRigL, 90%, masks every 100 steps; steps/s in summary.json):

  python -m srigl_jax.main --config=configs/gpu_throughput.py:model=resnet18,method=srigl \
      --workdir=/tmp/r18_srigl --config.sparsity.update_every=100

scripts/gpu_check.sh runs srigl, rigl and dense at delta 100 and 20 for
resnet18 and vit_s16 through `python -m srigl_jax.benchmarks.train_step`,
which also times one train step with and without the mask update on the
device; results in docs/benchmarks/gpu/train.json once a GPU run has been
made (target: SRigL within 5% of dense at delta 100).
"""

import importlib.util
import os

from srigl_jax import config_lib, data

_MODELS = ('resnet18', 'vit_s16', 'resnet18_tiny', 'vit_tiny')


def _recipe(name, arg):
  """`get_config(arg)` of the paper config `configs/<name>.py` beside this file."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f'{name}.py')
  spec = importlib.util.spec_from_file_location(f'_recipe_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg=None):
  """Returns the config; arg is 'model=...,method=...,sparsity=...' (see docstring)."""
  args = config_lib.sparsity_arg(arg, {'model': _MODELS})
  sparsity_arg = f'method={args["method"]},sparsity={args["sparsity"]}'
  tiny = args['model'].endswith('_tiny')
  if args['model'].startswith('resnet18'):
    config = _recipe('cifar10_resnet18', sparsity_arg)
    shape, classes = (16, 16, 3) if tiny else (32, 32, 3), 10
    augment = 'crop_flip'
    if tiny:
      config.model.kwargs.width = 8
  else:
    config = _recipe('imagenet_vit_b16', sparsity_arg)
    config.model.name = 'vit_tiny_test' if tiny else 'vit_s16'
    shape, classes = (16, 16, 3) if tiny else (224, 224, 3), 10 if tiny else 1000
    augment = 'none'
  batch = 16 if tiny else 128
  config.batch_size = batch
  config.eval_batch_size = batch
  config.input = data.default_input_config('synthetic')
  config.input.image_shape = shape
  config.input.num_classes = classes
  config.input.augment = augment
  config.input.num_train_examples = 8 * batch if tiny else 32 * batch
  config.input.num_eval_examples = batch
  if not tiny:
    # 224x224 float batches are normalised on the host: spread that over threads.
    config.input.num_threads = 8
    config.input.prefetch = 4
  config.num_train_steps = 30 if tiny else 300
  config.log_every = 10 if tiny else 50
  config.eval_every = config.num_train_steps
  config.checkpoint_every = config.num_train_steps
  config.write_plots = False
  config.export = False
  return config
