r"""ResNet-50 on ImageNet with the paper's recipe.

Needs imagenet2012 prepared for TFDS (manual download; see the error message).
Batch 512, SGD lr 0.2 with 5 warm-up epochs, x0.1 at epochs 30/70/90, label
smoothing 0.1, weight decay 1e-4, 256k steps; masks updated every 800 steps
with the grow score averaged over the last 8 mini-batches (the paper's
equivalent of 100 steps at batch 4096), ERK, gamma_sal 0.3.

Command (SRigL, 90%; a TPU pod or GPU cluster, see launch/README.md):

  python -m srigl_jax.main --config=configs/imagenet_resnet50.py \
      --workdir=/gcs/BUCKET/r50_srigl90

On few accelerators, split each batch: --config.optim.grad_accum_steps=4.

Expected top-1 (paper, dense 76.74): 80% RigL 74.98 / SRigL 75.01;
90% 72.81 / 72.71; 95% 69.66 / 69.18; 99% 51.47 / 51.55 (w/o ablation 48.74).
"""

from srigl_jax import config_lib

_NUM_TRAIN = 1_281_167


def get_config(arg=None):
  """Returns the config; arg is 'method=...,sparsity=...' (see docstring)."""
  args = config_lib.sparsity_arg(arg)
  config = config_lib.base_config('imagenet2012')
  config.batch_size = 512
  config.num_train_steps = 256_000
  config.log_every = 200
  config.eval_every = 2 * (_NUM_TRAIN // 512)
  config.checkpoint_every = 2000
  config.eval_batch_size = 1024

  config.model.name = 'resnet50'
  config.model.kwargs.width = 64

  config.sparsity.distribution = 'erk'
  config.sparsity.update_every = 800
  config.sparsity.grad_accumulation = 8
  config.sparsity.gamma_sal = 0.3

  config.optim.name = 'sgd'
  config.optim.learning_rate = 0.2
  config.optim.momentum = 0.9
  config.optim.weight_decay = 1e-4
  config.optim.schedule = 'multistep'
  config.optim.warmup_epochs = 5.0
  config.optim.boundaries_epochs = (30.0, 70.0, 90.0)
  config.optim.decay_factor = 0.1
  config.optim.label_smoothing = 0.1
  return config_lib.apply_sparsity_arg(config, args)
