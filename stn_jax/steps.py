"""The pure, data-parallel training and evaluation steps, and their device plumbing.

A model is split once into a static graph definition and plain state; the
steps are pure functions of ``(state, batch, rng)`` so that they run under
``jax.jit`` on one device or ``jax.pmap`` over the local devices (all devices
of all processes in a multi-host run), with gradients and metrics averaged
across devices by ``jax.lax.pmean`` and evaluation sums added by ``psum``.

Loss functions are *per example* (:mod:`stn_jax.objectives`): ``terms(outputs, labels) -> (loss [B],
correct [B])``. Training averages them; evaluation sums them under a mask, so
that a padded last batch counts each real example exactly once.

Optimisers and schedules are :mod:`stn_jax.optim`; the loop around these
steps (evaluation schedule, checkpoints, metrics) is :mod:`stn_jax.loop`.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from stn_jax import guards

from stn_jax.objectives import CLASSIFICATION, Evaluation, Terms, classification_terms

AXIS = "devices"


class TrainState(NamedTuple):
  """Everything a step changes: ``step``, trainable ``params``, the model's
  other state ``rest`` (e.g. dropout RNG streams) and the optimiser state."""
  step: jax.Array
  params: Any
  rest: Any
  opt_state: Any


def create_train_state(model: nnx.Module, optimizer: optax.GradientTransformation):
  """``(graphdef, TrainState)`` of a model at step 0."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, TrainState(jnp.zeros((), jnp.int32), params, rest,
                              optimizer.init(params))


def eval_graphdef(model: nnx.Module):
  """The graph definition of ``model`` in evaluation mode (dropout off).

  It merges with the same state as the training graph definition.
  """
  model.eval()
  graphdef, _, _ = nnx.split(model, nnx.Param, ...)
  model.train()
  return graphdef


# --- Steps --------------------------------------------------------------------------------


def step_rng(rng: jax.Array, step: jax.Array, axis_name: Optional[str]) -> jax.Array:
  """The key of one step on one device: ``rng`` folded with the step and the device index."""
  key = jax.random.fold_in(rng, step)
  if axis_name is not None:
    key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
  return key


def make_train_step(graphdef, optimizer: optax.GradientTransformation, *,
                    terms: Terms = classification_terms, axis_name: Optional[str] = None):
  """A pure step ``(state, images, labels, rng) -> (state, metrics)``.

  ``rng`` is the run's base key; the step folds in ``state.step`` and (under
  ``pmap``) the device index, and reseeds the model's ``dropout`` stream with
  it, so that every device draws its own masks and a resumed run draws what
  an uninterrupted one would. With ``axis_name`` the gradients and metrics
  are averaged over that axis, so every device applies the same update.
  ``metrics``: mean ``loss`` and ``accuracy`` of the batch, ``grad_norm``,
  and ``finite``: a flag (1.0 if finite) for all the updated parameters and one per
  localisation net output (:mod:`stn_jax.guards`; a NaN localisation net
  leaves the loss finite).
  """

  def step(state: TrainState, images, labels, rng):
    def loss_of(params):
      model = nnx.merge(graphdef, params, state.rest, copy=True)
      nnx.reseed(model, dropout=step_rng(rng, state.step, axis_name))
      outputs, captured = guards.capture_call(model, images)
      loss, correct = terms(outputs, labels)
      metrics = {"loss": loss.mean(), "accuracy": correct.mean(),
                 "finite": guards.transform_flags(captured)}
      return loss.mean(), (metrics, nnx.state(model, nnx.Not(nnx.Param)))

    grads, (metrics, rest) = jax.grad(loss_of, has_aux=True)(state.params)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
      metrics = jax.lax.pmean(metrics, axis_name)
    metrics["grad_norm"] = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["finite"].update(guards.parameters_flag(params))
    return TrainState(state.step + 1, params, rest, opt_state), metrics

  return step


def make_eval_step(graphdef, *, evaluation: Evaluation = CLASSIFICATION,
                   axis_name: Optional[str] = None):
  """A pure step ``(state, images, labels, mask) -> sums``.

  ``graphdef`` should be in evaluation mode (:func:`eval_graphdef`).
  ``mask [B]`` is 1 for real examples and 0 for padding; ``sums`` holds each
  of ``evaluation.per_example``'s values summed over the real examples, and
  their ``count``, summed over ``axis_name`` too when given.
  """

  def step(state: TrainState, images, labels, mask):
    model = nnx.merge(graphdef, state.params, state.rest)
    values = evaluation.per_example(model(images), labels)
    mask = mask.astype(jnp.float32)
    sums = {name: jnp.sum(value * mask) for name, value in values.items()}
    sums["count"] = jnp.sum(mask)
    if axis_name is not None:
      sums = jax.lax.psum(sums, axis_name)
    return sums

  return step


def pmap_train_step(graphdef, optimizer: optax.GradientTransformation, **kwargs):
  """:func:`make_train_step` under ``jax.pmap`` (state donated; ``rng`` not mapped)."""
  step = make_train_step(graphdef, optimizer, axis_name=AXIS, **kwargs)
  return jax.pmap(step, axis_name=AXIS, in_axes=(0, 0, 0, None), donate_argnums=(0,))


def pmap_eval_step(graphdef, **kwargs):
  """:func:`make_eval_step` under ``jax.pmap``; the sums come back on every device."""
  return jax.pmap(make_eval_step(graphdef, axis_name=AXIS, **kwargs), axis_name=AXIS)


# --- Replication and sharding --------------------------------------------------------------


def replicate(tree, num_devices: Optional[int] = None):
  """Stacks a copy of a pytree per local device (leading axis = device) for ``pmap``."""
  n = num_devices or jax.local_device_count()
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), tree)


def unreplicate(tree):
  """The first device's copy of a replicated pytree."""
  return jax.tree.map(lambda x: x[0], tree)


def shard_batch(batch, num_devices: Optional[int] = None):
  """Splits the leading (batch) axis of each array into ``[devices, batch / devices, ...]``."""
  n = num_devices or jax.local_device_count()

  def split(x):
    x = np.asarray(x)
    if x.shape[0] % n:
      raise ValueError(f"the batch of {x.shape[0]} examples must divide by the "
                       f"{n} local devices.")
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])

  return jax.tree.map(split, batch)


def padded_batches(images: np.ndarray, labels: Any, batch_size: int,
                   shard: Optional[Sequence[int]] = None):
  """Fixed-size evaluation batches ``(images, labels, mask)`` over a whole set.

  The set is padded (by repeating its first example) to a multiple of
  ``batch_size * shards``; ``mask`` is 1 for real examples and 0 for padding,
  so each real example is counted exactly once. ``shard = (index, count)``
  yields only that process's contiguous part; every shard gets the same
  number of batches (collectives need all processes in step).
  """
  index, count = shard or (0, 1)
  n = len(images)
  per_shard = -(-n // (batch_size * count)) * batch_size
  start = index * per_shard
  for lo in range(start, start + per_shard, batch_size):
    idx = np.arange(lo, lo + batch_size)
    mask = idx < n
    idx = np.where(mask, idx, 0)
    yield images[idx], jax.tree.map(lambda y: np.asarray(y)[idx], labels), mask
