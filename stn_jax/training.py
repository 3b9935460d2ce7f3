"""The pure, data-parallel training step (the core of the training loop).

A model is split once into a static graph definition and plain state; the
step is a pure function of ``(state, images, labels)`` so that it runs under
``jax.jit`` on one device or ``jax.pmap`` over the local devices, with
gradients and metrics averaged across devices by ``jax.lax.pmean``.

This module holds the step and the helpers to replicate state and shard
batches; the loop around it (evaluation, checkpoints, metrics, CLI) is built
on top.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

AXIS = "devices"


class TrainState(NamedTuple):
  """Everything a step changes: ``step``, trainable ``params``, the model's
  other state ``rest`` (e.g. RNG counters) and the optimiser state."""
  step: jax.Array
  params: Any
  rest: Any
  opt_state: Any


def create_train_state(model: nnx.Module, optimizer: optax.GradientTransformation):
  """``(graphdef, TrainState)`` of a model at step 0."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return graphdef, TrainState(jnp.zeros((), jnp.int32), params, rest,
                              optimizer.init(params))


def classification_loss(logits, labels):
  """Mean softmax cross entropy and accuracy for integer labels."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  accuracy = (jnp.argmax(logits, -1) == labels).mean()
  return loss, {"loss": loss, "accuracy": accuracy}


def make_train_step(graphdef, optimizer: optax.GradientTransformation, *,
                    loss_fn: Callable = classification_loss,
                    axis_name: Optional[str] = None):
  """A pure step ``(state, images, labels) -> (state, metrics)``.

  With ``axis_name`` (under ``pmap``) the gradients and metrics are averaged
  over that axis, so every device applies the same update to its replica.
  """

  def step(state: TrainState, images, labels):
    def loss_of(params):
      model = nnx.merge(graphdef, params, state.rest)
      loss, metrics = loss_fn(model(images), labels)
      return loss, (metrics, nnx.state(model, nnx.Not(nnx.Param)))

    grads, (metrics, rest) = jax.grad(loss_of, has_aux=True)(state.params)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
      metrics = jax.lax.pmean(metrics, axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(state.step + 1, params, rest, opt_state), metrics

  return step


def pmap_train_step(graphdef, optimizer: optax.GradientTransformation, **kwargs):
  """:func:`make_train_step` under ``jax.pmap`` over the local devices (state donated)."""
  step = make_train_step(graphdef, optimizer, axis_name=AXIS, **kwargs)
  return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,))


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
