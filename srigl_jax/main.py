r"""Command-line entry point: trains one experiment config.

  python -m srigl_jax.main --config=configs/fashion_mnist.py --workdir=/tmp/fmnist

Any config field can be overridden, e.g. `--config.num_train_steps=200
--config.sparsity.gamma_sal=0.5`; the config file's arg selects method and
sparsity: `--config=configs/cifar10_resnet18.py:method=rigl,sparsity=0.95`.
Running the same command again resumes from the latest checkpoint in
`--workdir`. In a multi-process job (Cloud TPU pod, SLURM, or
JAX_COORDINATOR_ADDRESS set) every process runs the same command.
"""

import ctypes
import ctypes.util
import logging as py_logging
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from srigl_jax.training import loop

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file (configs/*.py[:arg]).', lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Directory for checkpoints, metrics, plots and summary.'
)
flags.mark_flags_as_required(['config', 'workdir'])

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
  """Makes glibc keep freed memory for reuse instead of handing it back.

  XLA:CPU allocates the temporaries of a compiled step afresh on every call.
  Above glibc's mmap threshold (at most 32 MiB) each such allocation is a new
  mapping whose pages fault in again on every step. The SRigL step of the
  Fashion-MNIST MLP (44 MiB of temporaries, most of them for the mask update
  that runs once per `update_every` steps) took 10.3 ms against RigL's 6.1 ms
  (30 MiB) for that reason alone, and 6.6 ms with this setting. Serving every
  allocation from the heap and not trimming it keeps the pages mapped; the
  process then holds on to its peak memory, which a training job does anyway.

  It changes the whole process, so the entry point calls it (on CPU backends),
  not the library. A training loop of your own on a CPU host gets the same
  without code by starting Python with glibc's environment variables
  `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1073741824`, or by calling this
  function once at start. Set SRIGL_JAX_SYSTEM_MALLOC=1 to keep glibc's
  defaults.

  Returns:
    Whether the setting took (False off glibc, or when opted out).
  """
  if os.environ.get('SRIGL_JAX_SYSTEM_MALLOC') == '1':
    return False
  name = ctypes.util.find_library('c')
  try:
    libc = ctypes.CDLL(name) if name else None
  except OSError:
    libc = None
  if libc is None or not hasattr(libc, 'mallopt'):
    return False
  return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def _is_multi_process() -> bool:
  """Whether this process is one of several that must form one JAX job."""
  env = os.environ
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return True
  # SLURM: one task of several (srun); a single-task allocation is local.
  if int(env.get('SLURM_NTASKS', env.get('SLURM_NPROCS', '1')) or 1) > 1:
    return True
  # Cloud TPU VM pods: more than one worker host.
  hostnames = env.get('TPU_WORKER_HOSTNAMES', '')
  return len([h for h in hostnames.split(',') if h]) > 1


class _QuietLibraries(py_logging.Filter):
  """Drops INFO records of orbax (dozens per checkpoint) from the console."""

  def filter(self, record):
    return record.levelno >= py_logging.WARNING or (f'{os.sep}orbax{os.sep}' not in record.pathname)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if os.environ.get('SRIGL_JAX_ASYNC_DISPATCH') != '1':
    # Synchronous CPU dispatch, set before JAX creates its CPU client (the
    # only moment it takes), so that the export at the end times one-at-a-time
    # calls as a server makes them (`srigl_jax.serving.model.choose_cpu_dispatch`).
    # Training speed is unchanged within noise: the default config for 800
    # steps ran 39.6 and 43.2 steps/s against 41.7 and 37.1 asynchronously
    # (2-core Xeon, interleaved runs). SRIGL_JAX_ASYNC_DISPATCH=1 keeps JAX's
    # default.
    jax.config.update('jax_cpu_enable_async_dispatch', False)
  if _is_multi_process():
    # SLURM and TPU pods are detected by JAX itself; a generic launcher gives
    # JAX_COORDINATOR_ADDRESS plus JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    kwargs = {}
    if 'JAX_NUM_PROCESSES' in os.environ:
      kwargs['num_processes'] = int(os.environ['JAX_NUM_PROCESSES'])
    if 'JAX_PROCESS_ID' in os.environ:
      kwargs['process_id'] = int(os.environ['JAX_PROCESS_ID'])
    jax.distributed.initialize(**kwargs)
  logging.info(
      'JAX process %d of %d, %d local / %d global devices (%s).',
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
      jax.devices()[0].platform,
  )
  if jax.default_backend() == 'cpu' and keep_freed_memory():
    logging.info(
        'glibc malloc: freed memory kept for reuse ' '(SRIGL_JAX_SYSTEM_MALLOC=1 turns this off).'
    )
  loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
