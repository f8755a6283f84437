r"""ViT-B/16 on ImageNet with the paper's recipe.

Needs imagenet2012 prepared for TFDS. 150 epochs at batch 4096, AdamW lr 3e-3,
weight decay 0.3 (kernels only), gradient clipping at norm 1.0, cosine with 16
warm-up epochs, label smoothing 0.11, RandAugment (2, 9) + mixup 0.2 / cutmix
1.0; masks every 100 steps, *uniform* sparsity, gamma_sal 0.95. The attention
q/k/v kernels (embed, heads, head_dim) have fan-in axis 0 and the output
projection (heads, head_dim, embed) fan-in axes (0, 1); the sparse optimizer
derives this from the Flax param names.

Command (SRigL, 90%):

  python -m srigl_jax.main --config=configs/imagenet_vit_b16.py \
      --workdir=/gcs/BUCKET/vit_b16_srigl90

Batch 4096 rarely fits at once: --config.optim.grad_accum_steps=8 splits it.

Expected top-1 (paper, dense 78.35): at 90% RigL 76.39, SRigL w/o ablation
71.26, SRigL 76.00.
"""

from srigl_jax import config_lib

_NUM_TRAIN = 1_281_167


def get_config(arg=None):
  """Returns the config; arg is 'method=...,sparsity=...' (see docstring)."""
  args = config_lib.sparsity_arg(arg)
  config = config_lib.base_config('imagenet2012')
  config.batch_size = 4096
  config.num_train_steps = config_lib.steps_for_epochs(150, _NUM_TRAIN, 4096)
  config.log_every = 100
  config.eval_every = 5 * (_NUM_TRAIN // 4096)
  config.checkpoint_every = 1000
  config.eval_batch_size = 1024

  config.input.randaugment = (2, 9)
  config.input.mixup_alpha = 0.2
  config.input.cutmix_alpha = 1.0

  config.model.name = 'vit_b16'
  config.model.kwargs.dropout_rate = 0.0

  config.sparsity.distribution = 'uniform'
  config.sparsity.update_every = 100
  config.sparsity.gamma_sal = 0.95

  config.optim.name = 'adamw'
  config.optim.learning_rate = 3e-3
  config.optim.momentum = 0.9
  config.optim.b2 = 0.999
  config.optim.weight_decay = 0.3
  config.optim.decay_pattern = r'(^|/)kernel$'
  config.optim.grad_clip_norm = 1.0
  config.optim.schedule = 'cosine'
  config.optim.warmup_epochs = 16.0
  config.optim.label_smoothing = 0.11
  return config_lib.apply_sparsity_arg(config, args)
