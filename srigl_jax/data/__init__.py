"""Input pipelines: local IDX files, TFDS prepared data and synthetic data.

`create_dataset(config.input, seed=..., global_batch_size=...)` returns a
`Dataset` whose `train_batches(start_step)` and `eval_batches()` yield numpy
batches for this process; see `pipeline` for the determinism contract.
"""

from srigl_jax.data.errors import DataFormatError, DatasetNotFoundError
from srigl_jax.data.pipeline import (
    DATASET_NAMES,
    Dataset,
    available_cpus,
    create_dataset,
    default_input_config,
    input_geometry,
    resolve_input_config,
)

__all__ = [
    "DATASET_NAMES",
    "DataFormatError",
    "Dataset",
    "available_cpus",
    "DatasetNotFoundError",
    "create_dataset",
    "default_input_config",
    "input_geometry",
    "resolve_input_config",
]
