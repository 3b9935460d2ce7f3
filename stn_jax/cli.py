"""The ``stn-jax`` command: train an experiment by config name, list the config names.

  stn-jax list
  stn-jax train --config=distorted_mnist:st_cnn_affine_rts --workdir=runs/st_cnn_affine_rts \\
      [--config.steps=3000 ...] [--data_dir=DIR] [--nodownload]

``python -m experiments.train ...`` (in a clone of the repository) is
``stn-jax train ...``.

``--config`` names a config of :mod:`stn_jax.configs` as ``<family>:<name>``
(``stn-jax list`` prints them; the older ``experiments/configs/<family>.py:<name>``
means the same), or a config file of one's own, ``<path>.py[:<argument>]``.
A family without a name is an error that lists the family's names (no
default config starts a full-length run). Any config field can be
overridden with ``--config.<field>=<value>``; a field that does not exist is
an error. Running again with the same work directory resumes from its newest
checkpoint (the stored config must match).

Data: MNIST is read through TFDS from ``--data_dir`` (the same as
``--config.data_dir``), else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``;
when it is not there it is downloaded once (about 11 MB, mirror
``$STN_JAX_MNIST_MIRROR``; :mod:`stn_jax.download`) unless ``--nodownload``
is given (or ``STN_JAX_DOWNLOAD=0`` is set).

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
import signal
import sys
from typing import Optional, Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from stn_jax import configs

FLAGS = flags.FLAGS
TRAIN_FLAGS = ("config", "workdir", "data_dir", "download", "distributed",
               "coordinator_address", "num_processes", "process_id")


class NamedConfigParser(flags.ArgumentParser):
  """``--config``: a registered config (``<family>:<name>``) or a config file of one's own."""

  def parse(self, argument):
    path, _, name = argument.partition(":")
    family = os.path.basename(path).removesuffix(".py")
    if family in configs.FAMILIES and not os.path.isfile(path):
      config = configs.get_config(argument)
    else:  # A config file: a module with get_config([name]).
      if not os.path.isfile(path):
        raise ValueError(f"--config {argument!r}: no config family {family!r} (choose one of "
                         f"{', '.join(configs.FAMILIES)}; 'stn-jax list' prints the names) "
                         f"and no file {path!r}.")
      spec = importlib.util.spec_from_file_location("config_file", path)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      config = module.get_config(*([name] if name else []))
    config.lock()
    return config

  def flag_type(self):
    return "config object"


config_flags.DEFINE_config_file(
    "config", None, "Experiment config: <family>:<name> (see 'stn-jax list') or "
    "<file>.py:<name>; override fields with --config.<field>=<value>.", lock_config=True)
FLAGS["config"].parser = NamedConfigParser()
flags.DEFINE_string("workdir", None, "Work directory (checkpoints, metrics, results); "
                    "an existing one is resumed.")
flags.DEFINE_string("data_dir", None, "TFDS data directory (sets --config.data_dir; default "
                    "$TFDS_DATA_DIR, else ~/tensorflow_datasets).")
flags.DEFINE_bool("download", True, "Download MNIST when it is not in the data directory; "
                  "--nodownload (or STN_JAX_DOWNLOAD=0) never downloads.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host; "
                  "or set STN_JAX_DISTRIBUTED=1).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")


def usage() -> str:
  """The help text: commands, the train flags (from their definitions) and every config name."""
  lines = ["usage: stn-jax train --config=<family>:<name> --workdir=DIR "
           "[--config.<field>=<value> ...] [flags]",
           "       stn-jax list",
           "",
           "Trains a Spatial Transformer Network experiment (stn_jax); 'list' prints the "
           "config names.",
           "",
           "train flags:"]
  for name in TRAIN_FLAGS:
    flag = FLAGS[name]
    default = "" if flag.default is None else f" (default: {flag.default_as_str})"
    lines.append(f"  --{name}: {flag.help}{default}")
  lines += ["", "configs (<family>:<name>):"]
  for family in configs.FAMILIES:
    lines.append(f"  {family}: {' '.join(configs.family_module(family).NAMES)}")
  return "\n".join(lines)


def initialize_distributed() -> None:
  """``jax.distributed.initialize`` with the flags given (CPU processes use gloo collectives)."""
  import jax
  if jax.config.jax_platforms in ("cpu",) or os.environ.get("JAX_PLATFORMS") == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {k: v for k, v in dict(coordinator_address=FLAGS.coordinator_address,
                                   num_processes=FLAGS.num_processes,
                                   process_id=FLAGS.process_id).items() if v is not None}
  jax.distributed.initialize(**kwargs)


def fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def train(argv: Sequence[str]) -> None:
  """``stn-jax train``, after absl has parsed the flags."""
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.config is None or not FLAGS.workdir:
    fail("train needs --config=<family>:<name> and --workdir=DIR; 'stn-jax list' prints "
         "the config names.")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every checkpoint step at INFO.
  from stn_jax import host_memory
  host_memory.reuse_freed_host_memory()  # before the backend starts; see its docstring
  if FLAGS.distributed or os.environ.get("STN_JAX_DISTRIBUTED") == "1":
    initialize_distributed()
  from stn_jax import checkpoints, datasets, download, guards, loop, tasks, workdir
  config = FLAGS.config
  if FLAGS.data_dir:
    config.data_dir = FLAGS.data_dir
  if not FLAGS.download:
    os.environ[datasets.DOWNLOAD_ENV] = "0"   # read by stn_jax.datasets.load_mnist
  try:
    task = tasks.build_task(config)
    loop.train_and_evaluate(config, task, FLAGS.workdir)
  except (workdir.ConfigMismatchError, workdir.WorkdirLockedError, loop.NonFiniteLossError,
          checkpoints.CheckpointError, ValueError, FileNotFoundError,
          download.DownloadError) as error:
    fail(str(error))
  except guards.RunInterrupted as stopped:   # SIGINT/SIGTERM: checkpointed; exit as signalled
    print(str(stopped), file=sys.stderr)
    sys.exit(128 + int(getattr(signal, stopped.signal_name)))


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Entry point of ``stn-jax`` (``argv`` defaults to ``sys.argv``); returns the exit status."""
  argv = list(sys.argv if argv is None else argv)
  command, rest = (argv[1], argv[2:]) if len(argv) > 1 else (None, [])
  if command in (None, "-h", "--help", "help") or (
      command == "train" and any(a in ("-h", "--help", "--helpshort")
                                 for a in rest)):
    print(usage())
    return 0
  if command == "list":
    print("\n".join(configs.names()))
    return 0
  if command != "train":
    print(f"error: unknown command {command!r}; use 'train' or 'list'.\n\n{usage()}",
          file=sys.stderr)
    return 2
  app.run(train, argv=["stn-jax train", *rest])   # exits the process
  return 0


if __name__ == "__main__":
  sys.exit(main())
