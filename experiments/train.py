"""Trains one experiment: a config plus a work directory.

  python -m experiments.train --config=distorted_mnist:st_cnn_affine_rts \\
      --workdir=runs/st_cnn_affine_rts [--config.steps=3000 ...]

``--config`` names a config of :mod:`stn_jax.configs` as ``<family>:<name>``
(the older ``experiments/configs/<family>.py:<name>`` means the same), or a
config file of your own, ``<path>.py[:<argument>]``.

Any config field can be overridden with ``--config.<field>=<value>``; a
field that does not exist is an error. Running again with the same work
directory resumes from its newest checkpoint (the stored config must match).

Multi-host (TPU slices, several GPU hosts, or CPU processes on loopback):
pass ``--distributed`` (or set ``STN_JAX_DISTRIBUTED=1``) to call
``jax.distributed.initialize``; on TPU and Slurm/Open MPI clusters it finds
its peers itself, elsewhere give ``--coordinator_address``,
``--num_processes`` and ``--process_id``. Every process runs this same
command; each feeds its local devices with its own shard of every batch.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS


class NamedConfigParser(flags.ArgumentParser):
  """``--config``: a registered config (``<family>:<name>``) or a config file of one's own."""

  def parse(self, argument):
    from stn_jax import configs
    path, _, name = argument.partition(":")
    family = os.path.basename(path).removesuffix(".py")
    if family in configs.FAMILIES and not os.path.isfile(path):
      config = configs.get_config(argument)
    else:  # A config file: a module with get_config([name]).
      spec = importlib.util.spec_from_file_location("config_file", path)
      if spec is None or not os.path.isfile(path):
        raise ValueError(f"--config {argument!r}: no config family {family!r} (choose one of "
                         f"{', '.join(configs.FAMILIES)}) and no file {path!r}.")
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      config = module.get_config(*([name] if name else []))
    config.lock()
    return config

  def flag_type(self):
    return "config object"


config_flags.DEFINE_config_file("config", None, "Experiment config: <family>:<name> "
                                "(stn_jax.configs) or <file>.py:<name>.", lock_config=True)
FLAGS["config"].parser = NamedConfigParser()
flags.DEFINE_string("workdir", None, "Work directory (checkpoints, metrics, results).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed() -> None:
  """``jax.distributed.initialize`` with the flags given (CPU processes use gloo collectives)."""
  import jax
  if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {k: v for k, v in dict(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes,
                                   process_id=FLAGS.process_id).items() if v is not None}
  jax.distributed.initialize(**kwargs)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint step at INFO.
  from stn_jax import host_memory
  host_memory.reuse_freed_host_memory()  # before the backend starts; see its docstring
  if FLAGS.distributed or os.environ.get("STN_JAX_DISTRIBUTED") == "1":
    initialize_distributed()
  from stn_jax import loop, tasks, workdir
  config = FLAGS.config
  try:
    task = tasks.build_task(config)
    loop.train_and_evaluate(config, task, FLAGS.workdir)
  except (workdir.ConfigMismatchError, loop.NonFiniteLossError, ValueError,
          FileNotFoundError) as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
