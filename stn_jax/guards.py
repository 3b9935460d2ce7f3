"""Guards of a training run: its configuration checked first, non-finite values caught in the step.

:func:`validate_config` checks every number and name the loop will use
(steps, batch sizes against the devices, the logging/evaluation/checkpoint
periods, the optimiser and its schedule) and raises a ``ValueError`` naming
the field before anything is written to the work directory, so a corrected
command runs in the same directory.

A localisation net whose parameters or outputs become NaN or infinite is
invisible in the loss: the sampler reads non-finite grid points as
"outside", so every warped image is blank, the loss stays near chance and
the gradient stays finite. Inside the training step, :func:`parameters_flag`
computes one flag for all the parameters and :func:`transform_flags` one per
localisation net output (the transform parameters, captured with
``nnx.capture``); :func:`check_finite` turns a false flag into a
:class:`NonFiniteError` naming the step and the layer, or the parameter
arrays, which :func:`non_finite_parameters` finds on the host only once the
single flag has fired (one flag, not one per array, keeps the step as fast
as it was without guards: docs/benchmarks/architecture_round.md).

:class:`StopSignals` turns SIGINT/SIGTERM into a stop after the current step
with a checkpoint (:class:`RunInterrupted`); :func:`sampler_fingerprint`
names the sampler a run uses (recorded with each checkpoint).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stn_jax.optim import LOCALISATION_KEY


class NonFiniteError(FloatingPointError):
  """The loss, a parameter or a transform became NaN or infinite."""


class RunInterrupted(Exception):
  """SIGINT or SIGTERM stopped the run after a step, with a checkpoint of that step."""

  def __init__(self, signal_name: str, step: int, directory: str):
    self.signal_name = signal_name
    self.step = step
    super().__init__(f"stopped by {signal_name} after step {step}; its checkpoint at step "
                     f"{step} is in {directory}; run the same command again to resume.")


# --- The configuration --------------------------------------------------------------------


def _positive_int(config, field: str) -> int:
  value = config.get(field) if hasattr(config, "get") else config[field]
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"config.{field} must be a positive integer; got {value!r}.")
  return value


def validate_config(config, *, num_devices: Optional[int] = None) -> None:
  """Raises ``ValueError`` naming the first field the loop could not run with.

  Checks ``steps``, ``batch_size`` and ``eval_batch_size`` (positive and
  divisible by ``num_devices``, default all devices of all processes),
  ``log_every``, ``eval_every``, ``checkpoint_every``, ``keep_checkpoints``
  (positive), ``optimizer.learning_rate`` (finite, not negative) and builds
  the optimiser and schedule (:func:`stn_jax.optim.make_schedule_and_optimizer`
  names a bad optimiser, schedule or decay).
  """
  from stn_jax import optim
  devices = jax.device_count() if num_devices is None else num_devices
  for field in ("steps", "batch_size", "eval_batch_size", "log_every", "eval_every",
                "checkpoint_every"):
    _positive_int(config, field)
  if config.get("keep_checkpoints", 2) is not None:
    keep = config.get("keep_checkpoints", 2)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep <= 0:
      raise ValueError(f"config.keep_checkpoints must be a positive integer; got {keep!r}.")
  for field in ("batch_size", "eval_batch_size"):
    if config[field] % devices:
      raise ValueError(f"config.{field} {config[field]} must divide by the {devices} devices "
                       f"({jax.process_count()} process(es) x {jax.local_device_count()} "
                       "local devices).")
  learning_rate = config.optimizer.get("learning_rate")
  if not isinstance(learning_rate, (int, float)) or not math.isfinite(learning_rate) \
      or learning_rate < 0:
    raise ValueError("config.optimizer.learning_rate must be a finite number >= 0; got "
                     f"{learning_rate!r}.")
  optim.make_schedule_and_optimizer(config)


# --- Non-finite values --------------------------------------------------------------------


def _keys(path) -> list:
  return [getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path]


def dotted(path) -> str:
  """``st.localisation.dense.0.kernel``: a pytree path (of a parameter) as dotted names."""
  return ".".join(str(k) for k in _keys(path) if k != "value")


def localisation_outputs(intermediates) -> dict[str, jax.Array]:
  """``{path: output}`` of every localisation net's ``__call__`` in ``nnx.capture``'s state."""
  out = {}
  for path, value in jax.tree_util.tree_flatten_with_path(intermediates)[0]:
    keys = _keys(path)
    if "__call__" in keys:
      at = keys.index("__call__")
      if at > 0 and keys[at - 1] == LOCALISATION_KEY:
        out[dotted(path[:at])] = value
  return out


PARAMETERS_FLAG = "parameters"


def parameters_flag(params) -> dict[str, jax.Array]:
  """``{'parameters': 1.0 if every value of every array in ``params`` is finite else 0.0}``.

  One flag for the whole tree, computed inside the step: the largest
  magnitude over all arrays, which is NaN or infinite exactly when some
  value is (no overflow from large finite values, unlike a sum).
  """
  leaves = [jnp.max(jnp.abs(leaf)) for leaf in jax.tree.leaves(params) if jnp.size(leaf)]
  if not leaves:
    return {PARAMETERS_FLAG: jnp.ones((), jnp.float32)}
  largest = jnp.max(jnp.stack(leaves).astype(jnp.float32))
  return {PARAMETERS_FLAG: jnp.isfinite(largest).astype(jnp.float32)}


def non_finite_parameters(params) -> list[str]:
  """``['parameter <dotted path>', ...]``: the arrays of ``params`` holding a NaN or infinity.

  Host-side (numpy) search, run only after :func:`parameters_flag` fired.
  """
  return [f"parameter {dotted(path)}"
          for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
          if not np.all(np.isfinite(np.asarray(leaf)))]


def transform_flags(intermediates) -> dict[str, jax.Array]:
  """``{'transform parameters of <path>': 1.0 or 0.0}`` per localisation net output.

  ``intermediates``: what :func:`capture_call` captured. Cheap: one
  reduction per array, inside the step (the flags are floats so that they
  average over devices like the other metrics).
  """
  return {f"transform parameters of {name}": jnp.all(jnp.isfinite(value)).astype(jnp.float32)
          for name, value in localisation_outputs(intermediates).items()}


def capture_call(model: nnx.Module, images):
  """``(outputs, intermediates)``: ``model(images)`` with every method's output captured."""
  return nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(images)


def check_finite(metrics: dict, step: int, kept: Callable[[], str],
                 locate: Optional[Callable[[], list[str]]] = None) -> None:
  """Raises :class:`NonFiniteError` for a non-finite loss or flag (:func:`parameters_flag`,
  :func:`transform_flags`) below 1.

  ``metrics``: host values of one step (``loss`` and ``finite``, the flags);
  ``step``: the step they belong to (as the loop counts); ``kept()``: a
  sentence on the checkpoint that is kept, asked only when stopping;
  ``locate()``: names the non-finite parameter arrays
  (:func:`non_finite_parameters` of the run's parameters), asked only when
  the ``'parameters'`` flag fired; without it the message says "parameters".
  """
  loss = float(metrics["loss"])
  bad = sorted(name for name, ok in metrics.get("finite", {}).items() if not float(ok) >= 1.0)
  if PARAMETERS_FLAG in bad and locate is not None:
    bad = sorted((set(bad) - {PARAMETERS_FLAG}) | set(locate() or [PARAMETERS_FLAG]))
  if math.isfinite(loss) and not bad:
    return
  shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
  if math.isfinite(loss):
    raise NonFiniteError(f"non-finite values appeared in {shown} at step {step}; stopping; "
                         f"{kept()}.")
  also = f" Non-finite values also in {shown}." if bad else ""
  raise NonFiniteError(f"the training loss became {loss} at step {step}; stopping; "
                       f"{kept()}.{also}")


def sampler_fingerprint() -> str:
  """Which sampler ``implementation='auto'`` runs here, e.g. ``'cpu:native'`` or ``'tpu:matmul'``.

  The choice for bilinear/zeros float32 on a 28x28 image (the paper's
  default case) on this process's default backend; runs with different
  fingerprints agree to rounding, not bit for bit.
  """
  from stn_jax import sampling
  platform = {"gpu": "cuda"}.get(jax.default_backend(), jax.default_backend())
  choice = sampling.choose_implementation(platform, "bilinear", "zeros", (1, 28, 28, 1),
                                          (1, 28, 28, 2), "float32", "float32")
  return f"{platform}:{choice}"


# --- Stopping on a signal -----------------------------------------------------------------


class StopSignals:
  """SIGINT and SIGTERM ask the loop to stop after the current step (with a checkpoint).

  Preemptible cloud machines send SIGTERM before they stop. One process: a
  handler records the signal (installed only from the main thread; the
  previous handlers are put back by :meth:`close`). Several processes: they
  must stop at the same step to save together, so :meth:`requested` asks
  JAX's preemption sync point (the coordination service that
  ``jax.distributed.initialize`` starts listens for SIGTERM) instead.
  """

  def __init__(self):
    import signal
    import threading
    self._signal = signal
    self.received: Optional[str] = None
    self._previous = {}
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame) -> None:
    del frame
    self.received = self._signal.Signals(signum).name

  def requested(self, step: int) -> Optional[str]:
    """The signal's name if the run should stop after ``step``, else ``None``."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      return "SIGTERM" if multihost_utils.reached_preemption_sync_point(step) else None
    return self.received

  def close(self) -> None:
    for sig, handler in self._previous.items():
      self._signal.signal(sig, handler)
    self._previous = {}
