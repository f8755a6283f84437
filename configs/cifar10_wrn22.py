r"""Wide ResNet-22 (widen factor 8) on CIFAR-10 with the paper's recipe.

Needs CIFAR-10 prepared for TFDS in $TFDS_DATA_DIR (or ~/tensorflow_datasets,
or --config.input.data_dir).

Command (SRigL, 90% sparsity, 250 epochs = 97,500 steps of batch 128):

  python -m srigl_jax.main --config=configs/cifar10_wrn22.py \
      --workdir=/tmp/c10_wrn22_srigl90

Expected top-1 (paper, dense 95.00): at 90% RigL 93.31, SRigL w/o ablation
93.1, SRigL 93.27; at 99% RigL 84.93, w/o ablation 76.9, SRigL 82.66
(`configs/cifar10_wrn22.py:method=srigl,sparsity=0.99`).
"""

from srigl_jax import config_lib


def get_config(arg=None):
  """Returns the config; arg is 'method=...,sparsity=...' (see docstring)."""
  config = config_lib.cifar10_config(arg, 'wrn22')
  config.model.kwargs.widen_factor = 8
  return config
