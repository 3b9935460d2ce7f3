"""Optimisers and learning-rate schedules (optax), and building them from a config."""

from __future__ import annotations

from typing import Any

import jax
import optax

from stn_jax import _validation as v

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "step", "cosine")
# Parameters under a module attribute of this name belong to a localisation net.
LOCALISATION_KEY = "localisation"


def learning_rate_schedule(learning_rate: float, *, schedule: str = "constant",
                           total_steps: int = 1, decay_every: int = 0,
                           decay_factor: float = 0.1, warmup_steps: int = 0) -> optax.Schedule:
  """A learning-rate schedule.

  ``'step'``: multiplied by ``decay_factor`` every ``decay_every`` steps (the
  paper: x0.1 every 50k of 150k steps); ``'cosine'``: cosine decay to 0 over
  ``total_steps``; ``'constant'``. ``warmup_steps`` adds a linear warm-up.
  """
  v.check_choice("schedule", schedule, SCHEDULES)
  if schedule == "step":
    if decay_every <= 0:
      raise ValueError(f"schedule 'step' needs decay_every > 0; got {decay_every}.")
    base = optax.exponential_decay(learning_rate, decay_every, decay_factor, staircase=True)
  elif schedule == "cosine":
    base = optax.cosine_decay_schedule(learning_rate, max(total_steps - warmup_steps, 1))
  else:
    base = optax.constant_schedule(learning_rate)
  if warmup_steps > 0:
    return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), base],
                                [warmup_steps])
  return base


def localisation_mask(params) -> Any:
  """``True`` for each parameter inside a localisation net (a path through ``localisation``)."""
  def inside(path, _):
    return any(getattr(k, "key", getattr(k, "name", None)) == LOCALISATION_KEY for k in path)
  return jax.tree_util.tree_map_with_path(inside, params)


def make_optimizer(name: str, schedule: optax.Schedule, *, momentum: float = 0.9,
                   weight_decay: float = 0.0, localisation_lr_scale: float = 1.0,
                   grad_clip_norm: float = 0.0) -> optax.GradientTransformation:
  """An optax optimiser: ``'sgd'`` (with momentum) or ``'adam'``.

  ``weight_decay`` is L2 added to the gradient (as in the paper's era of
  SGD); ``localisation_lr_scale`` multiplies the updates of every
  localisation-net parameter (the paper lowers the localisation nets'
  learning rate for some transformers); ``grad_clip_norm > 0`` clips the
  global gradient norm.
  """
  v.check_choice("optimizer", name, OPTIMIZERS)
  parts = []
  if grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(grad_clip_norm))
  if weight_decay > 0:
    parts.append(optax.add_decayed_weights(weight_decay))
  if name == "sgd":
    parts.append(optax.sgd(schedule, momentum=momentum or None))
  else:
    parts.append(optax.adam(schedule))
  if localisation_lr_scale != 1.0:
    parts.append(optax.masked(optax.scale(localisation_lr_scale), localisation_mask))
  return optax.chain(*parts)

def make_schedule_and_optimizer(config):
  """``(schedule, optimizer)`` from ``config.optimizer`` and ``config.steps``.

  ``config.optimizer``: ``name`` ('sgd' or 'adam'), ``learning_rate``,
  ``schedule`` ('constant', 'step', 'cosine'), for 'step' either
  ``decay_every`` (steps) or ``decay_fraction`` (of ``config.steps``, so a
  reduced budget keeps the paper's shape) and ``decay_factor``; optional
  ``warmup_steps``, ``momentum``, ``weight_decay``,
  ``localisation_lr_scale``, ``grad_clip_norm``.
  """
  o = config.optimizer
  schedule = learning_rate_schedule(
      o.learning_rate, schedule=o.schedule, total_steps=config.steps,
      decay_every=o.get("decay_every", 0) or round(o.get("decay_fraction", 0.0) * config.steps),
      decay_factor=o.get("decay_factor", 0.1),
      warmup_steps=o.get("warmup_steps", 0))
  optimizer = make_optimizer(
      o.name, schedule, momentum=o.get("momentum", 0.9), weight_decay=o.get("weight_decay", 0.0),
      localisation_lr_scale=o.get("localisation_lr_scale", 1.0),
      grad_clip_norm=o.get("grad_clip_norm", 0.0))
  return schedule, optimizer

