"""Runs one experiment on a Cloud TPU VM or pod slice: the ``gcloud`` calls, in order.

  python -m experiments.launch_tpu --name=stn --zone=us-central2-b \\
      --accelerator_type=v4-32 --workdir=gs://my-bucket/stn/st_cnn_affine_rts \\
      --data_dir=gs://my-bucket/tfds \\
      --config=distorted_mnist:st_cnn_affine_rts \\
      --repo=https://github.com/<you>/stn-jax.git [--steps=create,setup,train] [--spot] \\
      [--dry_run] [-- --config.steps=3000 ...]

Steps (``--steps``, default ``create,setup,train``):

* ``create``: ``gcloud compute tpus tpu-vm create`` (``--spot`` for a
  preemptible slice; a preempted run resumes from its ``gs://`` work directory
  when the same command is run again).
* ``setup``: on every worker (``--worker=all``): a virtual environment,
  ``pip install 'jax[tpu]'``, ``git clone`` of ``--repo`` at ``--ref`` and an
  editable install of it.
* ``train``: on every worker, the same command: ``python -m experiments.train
  --distributed`` (each worker finds its peers through the TPU metadata),
  in the background, logging to ``~/stn-train.log``; data from ``--data_dir``
  (``TFDS_DATA_DIR``) and everything written to ``--workdir``.
* ``logs``: the last lines of every worker's log.
* ``delete``: deletes the TPU VM.

``--dry_run`` prints the commands instead of running them (the tests check
them; nothing here is run against the cloud in the test suite). Arguments
after ``--`` are passed to ``experiments.train``.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from typing import Sequence

STEPS = ("create", "setup", "train", "logs", "delete")
VENV = "~/stn-venv"
CHECKOUT = "~/stn-jax"
LOG = "~/stn-train.log"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--name", required=True, help="TPU VM name.")
  parser.add_argument("--zone", required=True, help="e.g. us-central2-b.")
  parser.add_argument("--project", default=None, help="Google Cloud project (default: gcloud's).")
  parser.add_argument("--accelerator_type", default="v4-8", help="e.g. v4-8, v4-32, v5litepod-8.")
  parser.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM software version.")
  parser.add_argument("--spot", action="store_true", help="A Spot (preemptible) TPU VM.")
  parser.add_argument("--repo", default=None,
                      help="Git URL of this project (your fork or mirror; setup clones it).")
  parser.add_argument("--ref", default="main", help="Branch, tag or commit to check out.")
  parser.add_argument("--config", default="distorted_mnist:st_cnn_affine_rts",
                      help="<file>.py:<name>, relative to the checkout.")
  parser.add_argument("--workdir", default=None, help="gs://bucket/dir of the run (train).")
  parser.add_argument("--data_dir", default=None, help="gs://bucket/tfds: TFDS_DATA_DIR (train).")
  parser.add_argument("--steps", default="create,setup,train",
                      help=f"Comma-separated, from {', '.join(STEPS)}.")
  parser.add_argument("--dry_run", action="store_true", help="Print the commands only.")
  parser.add_argument("train_args", nargs="*", help="After --: more experiments.train flags.")
  args = parser.parse_args(argv)
  args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
  unknown = [s for s in args.steps if s not in STEPS]
  if unknown:
    parser.error(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}.")
  if "setup" in args.steps and not args.repo:
    parser.error("setup needs --repo=<git URL> of this project (each worker clones it).")
  if "train" in args.steps and not (args.workdir or "").startswith("gs://"):
    parser.error("train needs --workdir=gs://bucket/dir: every worker writes to it, and a "
                 "preempted slice resumes from it.")
  return args


def _tpu(args, verb: str, *more: str) -> list[str]:
  command = ["gcloud", "compute", "tpus", "tpu-vm", verb, args.name, f"--zone={args.zone}"]
  if args.project:
    command.append(f"--project={args.project}")
  return command + list(more)


def _on_all_workers(args, script: str) -> list[str]:
  return _tpu(args, "ssh", "--worker=all", f"--command={script}")


def setup_script(args) -> str:
  """The shell commands every worker runs once: venv, JAX for TPU, this project."""
  return " && ".join([
      f"python3 -m venv {VENV}",
      f"{VENV}/bin/pip install -q -U pip",
      f"{VENV}/bin/pip install -q -U 'jax[tpu]'",
      f"(test -d {CHECKOUT} || git clone -q {shlex.quote(args.repo)} {CHECKOUT})",
      f"git -C {CHECKOUT} fetch -q origin && git -C {CHECKOUT} checkout -q {shlex.quote(args.ref)}",
      f"{VENV}/bin/pip install -q -e {CHECKOUT}",
  ])


def train_script(args) -> str:
  """The one command every worker runs (in the background; the run survives the ssh session)."""
  flags = [f"--config={args.config}", f"--workdir={args.workdir}", "--distributed",
           *args.train_args]
  env = f"TFDS_DATA_DIR={shlex.quote(args.data_dir)} " if args.data_dir else ""
  train = f"{VENV}/bin/python -m experiments.train {' '.join(map(shlex.quote, flags))}"
  return f"cd {CHECKOUT} && {env}nohup {train} > {LOG} 2>&1 < /dev/null &"


def commands(args) -> list[list[str]]:
  """The ``gcloud`` command lines of ``args.steps``, in order."""
  out = []
  for step in args.steps:
    if step == "create":
      out.append(_tpu(args, "create", f"--accelerator-type={args.accelerator_type}",
                      f"--version={args.version}", *(["--spot"] if args.spot else [])))
    elif step == "setup":
      out.append(_on_all_workers(args, setup_script(args)))
    elif step == "train":
      out.append(_on_all_workers(args, train_script(args)))
    elif step == "logs":
      out.append(_on_all_workers(args, f"tail -n 20 {LOG}"))
    elif step == "delete":
      out.append(_tpu(args, "delete", "--quiet"))
  return out


def main(argv: Sequence[str]) -> int:
  args = parse_args(argv)
  for command in commands(args):
    print(shlex.join(command), flush=True)
    if not args.dry_run:
      result = subprocess.run(command)
      if result.returncode:
        print(f"error: the command above exited with {result.returncode}.", file=sys.stderr)
        return result.returncode
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
