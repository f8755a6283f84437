r"""MobileNet-V3 (large; `:size=small` for small) on ImageNet.

The paper has no MobileNet run; this is a standard recipe, not a reproduction:
batch 1024, SGD Nesterov momentum 0.9, lr 0.4, 5 warm-up epochs then cosine,
weight decay 4e-5, label smoothing 0.1, 300 epochs; SRigL with ERK, masks every
100 steps, gamma_sal 0.3. Depthwise convolutions (one input per output channel
and position, so no fan-in to thin out) stay dense; the head is sparse and
exempt from ablation.

Command (SRigL, 90%):

  python -m srigl_jax.main --config=configs/imagenet_mobilenet_v3.py \
      --workdir=/gcs/BUCKET/mnv3_srigl90

Expected: no paper number; dense MobileNet-V3 large reaches about 75% top-1
with such recipes.
"""

from srigl_jax import config_lib

_NUM_TRAIN = 1_281_167


def get_config(arg=None):
  """Returns the config; arg is 'method=...,sparsity=...,size=large|small'."""
  args = config_lib.sparsity_arg(arg, {'size': ('large', 'small')})
  config = config_lib.base_config('imagenet2012')
  config.batch_size = 1024
  config.num_train_steps = config_lib.steps_for_epochs(300, _NUM_TRAIN, 1024)
  config.log_every = 200
  config.eval_every = 5 * (_NUM_TRAIN // 1024)
  config.checkpoint_every = 2000
  config.eval_batch_size = 1024

  config.model.name = f'mobilenet_v3_{args["size"]}'
  config.model.kwargs.width_multiplier = 1.0
  config.model.kwargs.dropout_rate = 0.2

  config.sparsity.distribution = 'erk'
  config.sparsity.update_every = 100
  config.sparsity.gamma_sal = 0.3
  config.sparsity.dense_layers = ('depthwise',)

  config.optim.name = 'sgd'
  config.optim.learning_rate = 0.4
  config.optim.momentum = 0.9
  config.optim.nesterov = True
  config.optim.weight_decay = 4e-5
  config.optim.schedule = 'cosine'
  config.optim.warmup_epochs = 5.0
  config.optim.label_smoothing = 0.1
  return config_lib.apply_sparsity_arg(config, args)
