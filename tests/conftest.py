"""Helpers shared by the tests (pytest loads this file first; subprocesses import it by name)."""

import jax
import numpy as np

from stn_jax.configs import distorted_mnist


def tiny_config(name="st_fcn_affine_r", **overrides):
  c = distorted_mnist.get_config(name)
  c.data = "synthetic"
  c.synthetic_examples = 512
  c.steps = 6
  c.batch_size = 16
  c.eval_batch_size = 64
  c.log_every = 2
  c.eval_every = 3
  c.checkpoint_every = 2
  c.figure_examples = 0
  c.progress = False
  c.optimizer.learning_rate = 0.05
  for key, value in overrides.items():
    target = c
    *path, last = key.split(".")
    for p in path:
      target = target[p]
    target[last] = value
  return c


def params_of(results):
  return jax.tree.leaves(results["state"].params)


def assert_same_params(a, b, **tol):
  for x, y in zip(a, b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **(tol or dict(rtol=0, atol=0)))
