"""Verified orbax checkpoints of a training state in a work directory (``<workdir>/checkpoints``).

Every step is an orbax checkpoint ``checkpoints/<step>/`` plus an integrity
manifest ``checkpoints/<step>/stn_jax_manifest.json`` written after orbax has
committed the step: the SHA-256 of every array of the state (its dtype, shape
and bytes, keyed by the array's path in the state, e.g.
``params.st.localisation.dense.0.kernel``). A restore is
*verified*: the restored arrays are hashed again and must match the manifest.

:meth:`Checkpoints.restore_newest_intact` walks the steps from the newest
down and restores the first verified one. A step is *damaged* when orbax
cannot read it (truncated or missing files, a missing metadata file, an empty
step directory), when it has no manifest (the run stopped between orbax's
commit and the manifest: the step was never verified), or when an array
differs from its save-time checksum (a flipped bit). Each damaged step is
named in a warning with the reason, and deleted, so that the resumed run
writes it again; when every step is damaged, :class:`CheckpointError` names
each one and nothing is changed. Nothing here calls a checkpoint good before
it has been verified.

Paths go through :mod:`stn_jax.workdir` (``etils.epath``): local
directories and ``gs://`` buckets alike; orbax receives ``gs://`` paths
unchanged (tensorstore writes the arrays).

Multi-host: every process calls :meth:`save` and the restore methods (orbax
saves and restores collectively); the manifest is written by process 0 only;
every process holds the same replicated state, so all compute the same
checksums and reach the same verdict.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from stn_jax import guards
from stn_jax import workdir as workdir_lib
from stn_jax.steps import TrainState

MANIFEST = "stn_jax_manifest.json"


class CheckpointError(RuntimeError):
  """No checkpoint of the work directory could be verified; nothing was changed."""


class DamagedCheckpoint(Exception):
  """One step failed verification (the message says why)."""


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


def array_digests(tree: Any) -> dict[str, str]:
  """``{path: SHA-256 hex}`` of each array of a host pytree (dtype, shape and bytes hashed)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    x = np.ascontiguousarray(leaf)
    h = hashlib.sha256(f"{x.dtype.str}{x.shape}".encode())
    h.update(x.tobytes())
    out[guards.dotted(path)] = h.hexdigest()
  return out


class Checkpoints:
  """Verified orbax checkpoints of a :class:`~stn_jax.steps.TrainState` (``<workdir>/checkpoints``).

  ``keep``: how many of the newest steps orbax keeps. ``sampler``: the
  sampler implementation in use (:func:`stn_jax.guards.sampler_fingerprint`),
  recorded in each manifest; resuming a step recorded under another one warns
  (the runs then agree to rounding, not bit for bit).
  """

  def __init__(self, workdir: str, keep: int = 2, *, sampler: Optional[str] = None):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.directory = workdir_lib.resolve(workdir) / "checkpoints"
    self._keep = keep
    self.sampler = sampler
    self._template = None
    self.manager = self._open_manager()

  def _open_manager(self):
    ocp = self._ocp
    return ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True))

  def steps(self) -> list[int]:
    """Every step directory present, newest first (orbax's steps and any other ``<int>/``)."""
    found = set(self.manager.all_steps())
    if self.directory.exists():
      found |= {int(p.name) for p in self.directory.iterdir() if p.name.isdigit()}
    return sorted(found, reverse=True)

  def save(self, state: TrainState) -> None:
    """Saves ``state`` at its step (collectively), then writes the step's manifest (process 0)."""
    step = int(state.step)
    if step in self.manager.all_steps():
      return
    host = _to_saveable(state)
    self.manager.save(step, args=self._ocp.args.StandardSave(host))
    self.manager.wait_until_finished()
    if jax.process_index() == 0:
      manifest = {"step": step, "sampler": self.sampler, "arrays": array_digests(host)}
      workdir_lib.write_text(self.directory / str(step) / MANIFEST,
                             json.dumps(manifest, indent=1, sort_keys=True))
    workdir_lib.sync_processes(f"stn_jax checkpoint manifest {step}")

  def restore_step(self, template: TrainState, step: int) -> TrainState:
    """Restores and verifies ``step``; raises :class:`DamagedCheckpoint` saying why not."""
    self._template = template
    manifest_path = self.directory / str(step) / MANIFEST
    try:
      manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
      raise DamagedCheckpoint(f"it has no integrity manifest ({MANIFEST}): the run stopped "
                              "before the step was verified, so it is not trusted") from None
    except (OSError, ValueError) as error:
      raise DamagedCheckpoint(f"its manifest is unreadable ({type(error).__name__}: "
                              f"{str(error)[:200]})") from None
    abstract = _to_saveable(template)
    try:
      restored = self.manager.restore(step, args=self._ocp.args.StandardRestore(abstract))
    except Exception as error:  # orbax/tensorstore raise many types for damaged files
      raise DamagedCheckpoint(f"orbax could not read it ({type(error).__name__}: "
                              f"{' '.join(str(error).split())[:300]})") from None
    got = array_digests(restored)
    expected = manifest.get("arrays", {})
    differ = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
    if differ:
      raise DamagedCheckpoint(
          f"{len(differ)} array(s) differ from their SHA-256 recorded at save time "
          f"({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''})")
    recorded = manifest.get("sampler")
    if self.sampler and recorded and recorded != self.sampler:
      warnings.warn(f"checkpoint step {step} was computed with the sampler {recorded!r}; this "
                    f"process uses {self.sampler!r}. The run continues, but agrees with an "
                    "uninterrupted one to rounding only, not bit for bit.", RuntimeWarning,
                    stacklevel=3)
    return _from_saveable(restored, template)

  def restore_verified(self, template: TrainState, step: int) -> Optional[TrainState]:
    """``step`` restored and verified, or ``None`` when it is missing or damaged."""
    if step not in self.steps():
      return None
    try:
      return self.restore_step(template, step)
    except DamagedCheckpoint:
      return None

  def restore(self, template: TrainState, step: Optional[int] = None) -> TrainState:
    """The verified state of ``step`` (default: the newest verified step)."""
    if step is not None:
      return self.restore_step(template, step)
    state, found = self.restore_newest_intact(template)
    if state is None:
      raise CheckpointError(f"{self.directory} holds no checkpoint.")
    return state

  def describe_kept(self) -> str:
    """Which checkpoint a stopped run leaves to resume from (verified now), as a sentence."""
    present = self.steps()
    if not present:
      return "no checkpoint had been written yet"
    if self._template is not None:
      for step in present:
        try:
          self.restore_step(self._template, step)
        except DamagedCheckpoint:
          continue
        return (f"the last good checkpoint (step {step}) is kept in {self.directory} (its "
                "arrays verified just now against their save-time SHA-256)")
    return (f"no checkpoint in {self.directory} could be verified (steps "
            f"{', '.join(map(str, present))})")

  def restore_newest_intact(self, template: TrainState) -> tuple[Optional[TrainState], int]:
    """``(state, step)`` of the newest verified step, or ``(None, 0)`` when there is none.

    Damaged newer steps are reported (a warning naming each step and why) and
    deleted. Raises :class:`CheckpointError` naming each step when steps exist
    but none verifies (then nothing is deleted).
    """
    self._template = template
    damaged = []
    for step in self.steps():
      try:
        state = self.restore_step(template, step)
      except DamagedCheckpoint as error:
        damaged.append((step, str(error)))
        continue
      if damaged:
        warnings.warn(
            "damaged checkpoint(s) in " + str(self.directory) + ": "
            + "; ".join(f"step {s}: {why}" for s, why in damaged)
            + f". Resuming from step {step}, the newest verified one; the damaged step(s) are "
              "deleted and will be written again.", RuntimeWarning, stacklevel=2)
        self._delete([s for s, _ in damaged])
      return state, step
    if damaged:
      raise CheckpointError(
          f"no checkpoint in {self.directory} could be verified; nothing was changed.\n"
          + "\n".join(f"  step {s}: {why}" for s, why in damaged)
          + "\nMove or delete that directory to start the run over, or restore it from a copy.")
    return None, 0

  def _delete(self, steps: list[int]) -> None:
    if jax.process_index() == 0:
      for step in steps:
        path = self.directory / str(step)
        if path.exists():
          path.rmtree()
    workdir_lib.sync_processes("stn_jax deleted damaged checkpoints")
    self.manager.close()
    self.manager = self._open_manager()

  def latest_step(self) -> Optional[int]:
    """The newest step saved (not verified: :meth:`restore_newest_intact` verifies)."""
    return self.manager.latest_step()

  def close(self) -> None:
    self.manager.close()
