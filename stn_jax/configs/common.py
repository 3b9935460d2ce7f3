"""Settings shared by every experiment family, and name lookup.

A family module ``stn_jax/configs/<family>.py`` defines ``NAMES`` and
``get_config(name)``; ``python -m experiments.train --config=<family>:<name>``
selects one (:func:`stn_jax.configs.get_config`), and
``--config.<field>=<value>`` overrides any field that exists.
"""

from __future__ import annotations

from typing import Sequence

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Loop settings (:func:`stn_jax.loop.train_and_evaluate`) with the paper's optimiser.

  Optimiser: SGD, base learning rate 0.01 divided by 10 at each third of the
  run (150k steps, steps of 50k in the paper's appendix as recorded in
  ../shared/reference/paper.md, where the values are marked uncertain);
  momentum 0.9 is our choice.
  """
  c = ml_collections.ConfigDict()
  c.name = None
  c.task = None
  c.seed = 0
  c.steps = 150_000
  c.batch_size = 256
  c.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", learning_rate=0.01, momentum=0.9, schedule="step", decay_fraction=1 / 3,
      decay_every=0, decay_factor=0.1, warmup_steps=0, weight_decay=0.0,
      localisation_lr_scale=1.0, grad_clip_norm=0.0))
  c.eval_every = 5_000
  c.eval_batch_size = 1_000
  c.log_every = 100
  c.checkpoint_every = 1_000
  c.keep_checkpoints = 2
  c.progress = True
  c.figure_examples = 8
  c.data_dir = None         # None: $TFDS_DATA_DIR, else ../shared/data/tfds when present
  c.init_from = ""          # a work directory: start from its newest checkpoint's model (step 0)
  return c


def mnist_config(name: str, task: str, **fields) -> ml_collections.ConfigDict:
  """:func:`base_config` plus the settings of the MNIST-made tasks, then ``fields``."""
  c = base_config()
  c.name = name
  c.task = task
  c.data = "mnist"          # 'mnist' (TFDS) or 'synthetic' (offline stand-in, for tests)
  c.synthetic_examples = 2048  # training examples when data='synthetic' (test: a quarter)
  c.test_seed = 1234        # fixed distortion of the test set
  c.update(fields)
  return c


def unknown_name(family: str, name: str, names: Sequence[str]) -> ValueError:
  return ValueError(f"unknown {family} config {name!r}; choose one of: {', '.join(names)}.")
