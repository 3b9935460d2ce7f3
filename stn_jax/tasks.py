"""Builds a :class:`stn_jax.loop.Task` (model, data streams, loss) from a config.

``config.task`` selects the family: ``distorted_mnist`` (Table 1 and the
translated/cluttered variants), ``mnist_addition``, ``sequences``, ``svhn``,
``cub``. Training streams are pure functions of ``(seed, step)``: each step's
examples and distortions are drawn from ``fold_in(seed, step)``, so a resumed
run sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np

from stn_jax import datasets, distortions, models, steps
from stn_jax.loop import Task

TASKS = ("distorted_mnist", "mnist_addition", "sequences", "svhn", "cub")


def default_data_dir(data_dir: Optional[str]) -> Optional[str]:
  """``data_dir``, else None when $TFDS_DATA_DIR is set, else the project machines' copy."""
  if data_dir or os.environ.get("TFDS_DATA_DIR"):
    return data_dir or None
  return "../shared/data/tfds" if os.path.isdir("../shared/data/tfds") else None


def mnist_arrays(config, split: str) -> tuple[np.ndarray, np.ndarray]:
  """MNIST from TFDS, or the offline :func:`stn_jax.datasets.synthetic_digits` (``data='synthetic'``)."""
  if config.data == "synthetic":
    n = config.get("synthetic_examples", 2048) // (1 if split == "train" else 4)
    return datasets.synthetic_digits(n, seed=0 if split == "train" else 1)
  if config.data != "mnist":
    raise ValueError(f"config.data must be 'mnist' or 'synthetic' for {config.task}; "
                     f"got {config.data!r}.")
  return datasets.load_mnist(split, data_dir=default_data_dir(config.data_dir))


def _transformer_views(transformers, x_for_each):
  """Outputs, grids and titles of spatial transformers for the figure."""
  outputs, grids, titles = [], [], []
  for st, x in zip(transformers, x_for_each):
    warped, params = st(x)
    outputs.append(warped)
    grids.append(st.grid(params))
    titles.append(f"ST {st.transform}")
  return outputs, grids, titles


# --- Distorted MNIST (Table 1, translated, cluttered) ------------------------------------


def distorted_mnist(config) -> Task:
  train_images, train_labels = mnist_arrays(config, "train")
  test_images, test_labels = mnist_arrays(config, "test")
  in_hw = distortions.OUTPUT_HW[config.variant]

  def make_model(rngs):
    return models.DistortedMnistModel(in_hw, backbone=config.backbone,
                                      transform=config.transform or None,
                                      post_pool=config.post_pool, rngs=rngs)

  def train_batches(start_step):
    return datasets.distorted_batches(train_images, train_labels, variant=config.variant,
                                      global_batch=config.batch_size, seed=config.seed,
                                      start_step=start_step)

  def test_set():
    return (datasets.distorted_test_set(test_images, variant=config.variant,
                                        seed=config.test_seed), test_labels)

  views = None
  if config.transform:
    views = lambda model, x: _transformer_views([model.st], [x])  # noqa: E731
  return Task(make_model, train_batches, test_set, steps.classification_terms, views)


# --- MNIST addition ---------------------------------------------------------------------


def _addition_batch(images, labels, *, variant, batch, seed, step, shard):
  first = datasets.batch_indices(len(images), batch, seed, step, shard)
  second = datasets.batch_indices(len(images), batch, seed + 7919, step, shard)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step),
                           shard.start or 0)
  x, y = distortions.addition_pairs(key, images[first], images[second],
                                    labels[first], labels[second], variant)
  return np.asarray(x), np.asarray(y)


def mnist_addition(config) -> Task:
  train_images, train_labels = mnist_arrays(config, "train")
  test_images, test_labels = mnist_arrays(config, "test")
  in_hw = distortions.OUTPUT_HW[config.variant]
  shard = datasets.shard_of_batch(config.batch_size)

  def make_model(rngs):
    if not config.transform:
      return models.DenseStack(in_hw[0] * in_hw[1] * 2, (256, 256), 19, rngs=rngs)
    return models.AdditionModel(in_hw, transform=config.transform, rngs=rngs)

  def train_batches(start_step):
    step = start_step
    while True:
      yield _addition_batch(train_images, train_labels, variant=config.variant,
                            batch=config.batch_size, seed=config.seed, step=step, shard=shard)
      step += 1

  def test_set():
    n = len(test_images)
    x, y = _addition_batch(test_images, test_labels, variant=config.variant, batch=n,
                           seed=config.test_seed, step=0, shard=slice(None))
    return x, y

  views = None
  if config.transform:
    views = lambda model, x: _transformer_views(model.parallel.transformers,  # noqa: E731
                                                [x] * len(model.parallel.transformers))
  return Task(make_model, train_batches, test_set, steps.classification_terms, views)


# --- Multi-digit sequences (MNIST stand-in for SVHN) and SVHN -----------------------------


def _sequence_batch(images, labels, *, batch, max_digits, canvas, seed, step, shard):
  idx = np.stack([datasets.batch_indices(len(images), batch, seed + 104729 * k, step, shard)
                  for k in range(max_digits)], 1)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), shard.start or 0)
  x, lengths, digits = distortions.digit_sequences(key, images[idx], labels[idx],
                                                   canvas_hw=(canvas, canvas),
                                                   max_digits=max_digits)
  return np.asarray(x), (np.asarray(lengths), np.asarray(digits))


def _multi_digit_views(model, x):
  st = model.sts[0]
  if st is None:
    return [], [], []
  return _transformer_views([st], [x])


def sequences(config) -> Task:
  train_images, train_labels = mnist_arrays(config, "train")
  test_images, test_labels = mnist_arrays(config, "test")
  shard = datasets.shard_of_batch(config.batch_size)
  hw = (config.canvas, config.canvas)

  def make_model(rngs):
    return models.MultiDigitCNN(hw, in_channels=1, st=config.st or None,
                                max_digits=config.max_digits, rngs=rngs)

  def train_batches(start_step):
    step = start_step
    while True:
      yield _sequence_batch(train_images, train_labels, batch=config.batch_size,
                            max_digits=config.max_digits, canvas=config.canvas,
                            seed=config.seed, step=step, shard=shard)
      step += 1

  def test_set():
    return _sequence_batch(test_images, test_labels, batch=len(test_images),
                           max_digits=config.max_digits, canvas=config.canvas,
                           seed=config.test_seed, step=0, shard=slice(None))

  views = _multi_digit_views if config.st else None
  return Task(make_model, train_batches, test_set, steps.sequence_terms, views)


def _as_sequences(labels):
  """Single-digit labels as length-1 sequences ``(lengths, digits [N, 1])``."""
  return np.ones_like(labels), labels[:, None]


def svhn(config) -> Task:
  data_dir = default_data_dir(config.data_dir)
  train_images, train_labels = datasets.load_svhn_cropped("train", data_dir=data_dir)
  test_images, test_labels = datasets.load_svhn_cropped("test", data_dir=data_dir)
  shard = datasets.shard_of_batch(config.batch_size)

  def make_model(rngs):
    return models.MultiDigitCNN((32, 32), in_channels=3, st=config.st or None, max_digits=1,
                                rngs=rngs)

  def train_batches(start_step):
    step = start_step
    while True:
      idx = datasets.batch_indices(len(train_images), config.batch_size, config.seed, step, shard)
      yield train_images[idx].astype(np.float32) / 255.0, _as_sequences(train_labels[idx])
      step += 1

  def test_set():
    return test_images.astype(np.float32) / 255.0, _as_sequences(test_labels)

  views = _multi_digit_views if config.st else None
  return Task(make_model, train_batches, test_set, steps.sequence_terms, views)


# --- CUB-200 ------------------------------------------------------------------------------


def cub(config) -> Task:
  data_dir = default_data_dir(config.data_dir)
  size = config.image_size
  train_images, train_labels = datasets.load_cub("train", data_dir=data_dir, size=size)
  test_images, test_labels = datasets.load_cub("test", data_dir=data_dir, size=size)
  shard = datasets.shard_of_batch(config.batch_size)

  def backbone(rngs):  # 256 features
    return models.ConvFeatures(3, rngs=rngs)

  def make_model(rngs):
    if config.num_transformers == 0:
      return models.FeatureClassifier(backbone(rngs), 256, 200, dropout=0.5, rngs=rngs)
    return models.ParallelSTClassifier(backbone, 256, num_transformers=config.num_transformers,
                                       in_hw=(size, size), crop_hw=(224, 224), rngs=rngs)

  def train_batches(start_step):
    step = start_step
    while True:
      idx = datasets.batch_indices(len(train_images), config.batch_size, config.seed, step, shard)
      x = train_images[idx].astype(np.float32) / 255.0
      flip = np.random.default_rng([config.seed, step]).random(len(idx)) < 0.5
      yield np.where(flip[:, None, None, None], x[:, :, ::-1], x), train_labels[idx]
      step += 1

  def test_set():
    return test_images.astype(np.float32) / 255.0, test_labels

  views = None
  if config.num_transformers:
    views = lambda model, x: _transformer_views(  # noqa: E731
        model.parallel.transformers, [x] * config.num_transformers)
  return Task(make_model, train_batches, test_set, steps.classification_terms, views)


def build_task(config) -> Task:
  """The :class:`~stn_jax.loop.Task` named by ``config.task``."""
  builders = {"distorted_mnist": distorted_mnist, "mnist_addition": mnist_addition,
              "sequences": sequences, "svhn": svhn, "cub": cub}
  if config.task not in builders:
    raise ValueError(f"unknown config.task {config.task!r}; choose one of: {', '.join(TASKS)}.")
  return builders[config.task](config)
