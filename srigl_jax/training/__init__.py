"""Training: from a config to a trained, checkpointed and exported run.

  build          config -> model, optimizer, init, abstract state, Dataset (once,
                 every config check before any data is read)
  checks         the trainer's checks of its own config fields
  optimizer      the learning-rate schedule and the sparse optimizer (optim.*)
  state          the TrainState and its init
  steps          the jitted train and eval steps, mask statistics
  loop           `train_and_evaluate(config, workdir)` and its `preflight`
  checkpointing  orbax checkpoints, the run's fingerprint, preemption
  faults         non-finite losses and gradients
  metric_writers metrics.jsonl and TensorBoard

This package imports none of its modules: `srigl_jax.export` builds runs with
`training.build`, and the loop exports at the end of training, so an import of
the loop here would close a cycle. The entry point imports `training.loop`.
"""
