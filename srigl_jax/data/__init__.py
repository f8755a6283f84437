"""Input pipelines: local IDX files, TFDS prepared data and synthetic data.

`create_dataset(config.input, seed=..., global_batch_size=...)` returns a
`Dataset` whose `train_batches(start_step)` and `eval_batches()` yield numpy
batches for this process; see `pipeline` for the determinism contract.

The pipeline (grain, TFDS data sources) is imported on first use of one of its
names, so that a process needing only `srigl_jax.data.augment` (a server
replaying the eval preprocessing) does not load it.
"""

from srigl_jax.data.errors import DataFormatError, DatasetNotFoundError

# The names of `srigl_jax.data.pipeline` offered here.
_PIPELINE_NAMES = (
    "DATASET_NAMES",
    "Dataset",
    "available_cpus",
    "create_dataset",
    "default_input_config",
    "input_geometry",
    "resolve_input_config",
)

__all__ = ["DataFormatError", "DatasetNotFoundError", *_PIPELINE_NAMES]


def __getattr__(name):
  if name in _PIPELINE_NAMES:
    from srigl_jax.data import pipeline  # pylint: disable=g-import-not-at-top

    return getattr(pipeline, name)
  raise AttributeError(f"module 'srigl_jax.data' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(__all__))
