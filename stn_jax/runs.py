"""A training run read back from its work directory: its configuration and its trained model.

  >>> from stn_jax import runs
  >>> model = runs.restore_model("runs/main")        # the newest checkpoint, evaluation mode
  >>> logits = model(images)                          # images [B, H, W, C]

The layer above :mod:`stn_jax.loop` and :mod:`stn_jax.tasks`: the config
stored in ``config.json`` rebuilds the task's model, and the checkpoint fills
in its weights.
"""

from __future__ import annotations

import json
from typing import Optional

import ml_collections
from flax import nnx

from stn_jax import checkpoints, optim, steps, tasks
from stn_jax import workdir as workdir_files
from stn_jax.loop import Task


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The configuration a run in ``workdir`` was trained with (its ``config.json``)."""
  path = workdir_files.resolve(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{workdir} holds no config.json: not a training run's work directory.")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def restore_model(workdir: str, *, task: Optional[Task] = None,
                  step: Optional[int] = None) -> nnx.Module:
  """The trained model of the run in ``workdir``, in evaluation mode, ready to call.

  The model is rebuilt from the stored configuration (or from ``task``, when
  given: this skips loading the task's data) and takes the weights of the
  checkpoint at ``step`` (default: the newest intact one;
  :class:`stn_jax.checkpoints.CheckpointError` when there is none).
  """
  config = load_config(workdir)
  task = task if task is not None else tasks.build_task(config)
  model = task.make_model(nnx.Rngs(params=config.seed, dropout=config.seed))
  _, optimizer = optim.make_schedule_and_optimizer(config)
  _, template = steps.create_train_state(model, optimizer)
  store = checkpoints.Checkpoints(workdir)
  try:
    state = store.restore(template, step)
  finally:
    store.close()
  return nnx.merge(steps.eval_graphdef(model), state.params, state.rest)
