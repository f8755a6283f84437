r"""ResNet-18 (CIFAR form) on CIFAR-10 with the paper's recipe.

Needs CIFAR-10 prepared for TFDS in $TFDS_DATA_DIR (or ~/tensorflow_datasets,
or --config.input.data_dir); see the error message if it is missing.

Command (SRigL, 90% sparsity, 250 epochs = 97,500 steps of batch 128):

  python -m srigl_jax.main --config=configs/cifar10_resnet18.py \
      --workdir=/tmp/c10_r18_srigl90

Expected top-1 (paper, dense 95.45):

  sparsity   RigL   SRigL w/o ablation   SRigL
  80         95.20  95.19                95.22
  90         95.06  95.00                95.11
  95         94.62  94.48                94.70
  99         92.88  91.47                92.79

Other runs: `configs/cifar10_resnet18.py:method=rigl,sparsity=0.95`, with
method in dense, static, set, rigl, srigl_noablation, srigl. The speed
without the data, on generated CIFAR-shaped images:

  python -m srigl_jax.main --config=configs/cifar10_resnet18.py \
      --workdir=/tmp/r18_speed --config.input.name=synthetic \
      --config.input.num_train_examples=4096 \
      --config.input.num_eval_examples=256 --config.eval_batch_size=128 \
      --config.num_train_steps=16 --config.log_every=5
"""

from srigl_jax import config_lib


def get_config(arg=None):
  """Returns the config; arg is 'method=...,sparsity=...' (see docstring)."""
  config = config_lib.cifar10_config(arg, 'resnet18')
  config.model.kwargs.width = 64
  return config
