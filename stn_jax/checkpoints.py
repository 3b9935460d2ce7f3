"""Orbax checkpoints of a training state in a work directory (``<workdir>/checkpoints``)."""

from __future__ import annotations

import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from stn_jax.steps import TrainState


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_saveable(tree):
  """Host NumPy copy with typed PRNG keys stored as their raw ``uint32`` data."""
  return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if _is_key(x) else x),
                      jax.device_get(tree))


def _from_saveable(tree, template):
  return jax.tree.map(
      lambda x, t: jax.random.wrap_key_data(x, impl=jax.random.key_impl(t)) if _is_key(t)
      else jnp.asarray(x), tree, template)


class Checkpoints:
  """Orbax checkpoints of a :class:`~stn_jax.steps.TrainState` under ``<workdir>/checkpoints``."""

  def __init__(self, workdir: str, keep: int = 2):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, state: TrainState) -> None:
    step = int(state.step)
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=self._ocp.args.StandardSave(_to_saveable(state)))
    self.manager.wait_until_finished()

  def restore(self, template: TrainState, step: Optional[int] = None):
    step = self.latest_step() if step is None else step
    abstract = _to_saveable(template)
    restored = self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
    return _from_saveable(restored, template)

  def close(self) -> None:
    self.manager.close()

