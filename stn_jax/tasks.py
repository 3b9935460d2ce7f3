"""Builds a :class:`stn_jax.loop.Task` (model, data streams, loss, metrics) from a config.

``config.task`` names the builder in :data:`TASKS` (the one list of tasks):
``distorted_mnist`` (Table 1 and the translated/cluttered variants),
``mnist_addition``, ``sequences``, ``svhn``, ``cub``. Adding a task: its
builder function plus one entry in :data:`TASKS`.

Training streams are pure functions of ``(seed, step)`` and do not depend on
the number of processes: each step's examples are drawn from the epoch order
of ``(seed, epoch)``, and the example at position ``i`` of global batch ``s``
is distorted with the key ``fold_in(fold_in(key(seed), s), i)``, so a resumed
run sees exactly the data an uninterrupted one would, on any process count.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import jax
import numpy as np

from stn_jax import (colocalisation as coloc, datasets, distortions, models, modules3d, objectives,
                     volumetric)
from stn_jax.loop import Task


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


def _positions(shard: slice, count: int) -> np.ndarray:
  """Positions in the global batch of the ``count`` examples of ``shard``."""
  return np.arange(shard.start or 0, (shard.start or 0) + count)


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
                                      transform=config.transform,
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
  return Task(make_model, train_batches, test_set, objectives.classification_terms, views,
              objectives.CLASSIFICATION)


# --- MNIST addition ---------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames="variant")
def _addition_each(keys, first, second, labels_first, labels_second, variant):
  """:func:`stn_jax.distortions.addition_pairs` with one key per example (``keys [B]``)."""
  def one(key, a, b, label_a, label_b):
    x, y = distortions.addition_pairs(key, a[None], b[None], label_a[None], label_b[None],
                                      variant)
    return x[0], y[0]
  return jax.vmap(one)(keys, first, second, labels_first, labels_second)


def addition_batch(images, labels, *, variant, batch, seed, step, shard):
  """``shard`` of global batch ``step`` of MNIST addition: ``(images [b, H, W, 2], sums [b])``."""
  first = datasets.batch_indices(len(images), batch, seed, step, shard)
  second = datasets.batch_indices(len(images), batch, seed + 7919, step, shard)
  keys = datasets.example_keys(seed, step, _positions(shard, len(first)))
  x, y = _addition_each(keys, images[first], images[second], labels[first], labels[second],
                        variant)
  return np.asarray(x), np.asarray(y)


def mnist_addition(config) -> Task:
  train_images, train_labels = mnist_arrays(config, "train")
  test_images, test_labels = mnist_arrays(config, "test")
  in_hw = distortions.OUTPUT_HW[config.variant]
  shard = datasets.shard_of_batch(config.batch_size)

  def make_model(rngs):
    if not config.transform:
      if config.backbone == "cnn":
        return models.MnistCNN(in_hw, 2, 19, rngs=rngs)
      return models.DenseStack(in_hw[0] * in_hw[1] * 2, (256, 256), 19, rngs=rngs)
    return models.AdditionModel(in_hw, transform=config.transform,
                                num_transformers=config.num_transformers, rngs=rngs)

  def train_batches(start_step):
    return datasets.stream(lambda step: addition_batch(
        train_images, train_labels, variant=config.variant, batch=config.batch_size,
        seed=config.seed, step=step, shard=shard), start_step)

  def test_set():
    return addition_batch(test_images, test_labels, variant=config.variant,
                           batch=len(test_images), seed=config.test_seed, step=0,
                           shard=slice(None))

  views = None
  if config.transform:
    views = lambda model, x: _transformer_views(model.parallel.transformers,  # noqa: E731
                                                [x] * len(model.parallel.transformers))
  return Task(make_model, train_batches, test_set, objectives.classification_terms, views,
              objectives.CLASSIFICATION)


# --- Multi-digit sequences (MNIST stand-in for SVHN) and SVHN -----------------------------


@functools.partial(jax.jit, static_argnames=("canvas_hw", "max_digits"))
def _sequences_each(keys, digits, labels, canvas_hw, max_digits):
  """:func:`stn_jax.distortions.digit_sequences` with one key per example (``keys [B]``)."""
  def one(key, d, y):
    x, lengths, slots = distortions.digit_sequences(key, d[None], y[None], canvas_hw=canvas_hw,
                                                    max_digits=max_digits)
    return x[0], lengths[0], slots[0]
  return jax.vmap(one)(keys, digits, labels)


def sequence_batch(images, labels, *, batch, max_digits, canvas, seed, step, shard):
  """``shard`` of global batch ``step`` of digit sequences: ``(images, (lengths, digits))``."""
  idx = np.stack([datasets.batch_indices(len(images), batch, seed + 104729 * k, step, shard)
                  for k in range(max_digits)], 1)
  keys = datasets.example_keys(seed, step, _positions(shard, len(idx)))
  x, lengths, digits = _sequences_each(keys, images[idx], labels[idx], (canvas, canvas),
                                       max_digits)
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
    return models.MultiDigitCNN(hw, in_channels=1, st=config.st,
                                max_digits=config.max_digits, rngs=rngs)

  def train_batches(start_step):
    return datasets.stream(lambda step: sequence_batch(
        train_images, train_labels, batch=config.batch_size, max_digits=config.max_digits,
        canvas=config.canvas, seed=config.seed, step=step, shard=shard), start_step)

  def test_set():
    return sequence_batch(test_images, test_labels, batch=len(test_images),
                           max_digits=config.max_digits, canvas=config.canvas,
                           seed=config.test_seed, step=0, shard=slice(None))

  views = _multi_digit_views if config.st else None
  return Task(make_model, train_batches, test_set, objectives.sequence_terms, views,
              objectives.SEQUENCES)


def _as_sequences(labels):
  """Single-digit labels as length-1 sequences ``(lengths, digits [N, 1])``."""
  return np.ones_like(labels), labels[:, None]


def svhn(config) -> Task:
  data_dir = default_data_dir(config.data_dir)
  train_images, train_labels = datasets.load_svhn_cropped("train", data_dir=data_dir)
  test_images, test_labels = datasets.load_svhn_cropped("test", data_dir=data_dir)
  shard = datasets.shard_of_batch(config.batch_size)

  def make_model(rngs):
    return models.MultiDigitCNN((32, 32), in_channels=3, st=config.st, max_digits=1,
                                rngs=rngs)

  def batch(step):
    idx = datasets.batch_indices(len(train_images), config.batch_size, config.seed, step, shard)
    return train_images[idx].astype(np.float32) / 255.0, _as_sequences(train_labels[idx])

  def test_set():
    return test_images.astype(np.float32) / 255.0, _as_sequences(test_labels)

  views = _multi_digit_views if config.st else None
  return Task(make_model, functools.partial(datasets.stream, batch), test_set,
              objectives.sequence_terms, views, objectives.SEQUENCES)


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

  def batch(step):
    idx = datasets.batch_indices(len(train_images), config.batch_size, config.seed, step, shard)
    x = train_images[idx].astype(np.float32) / 255.0
    # Flips drawn per global-batch position, so that they do not depend on the process count.
    positions = np.arange(shard.start, shard.start + len(idx))
    flip = np.random.default_rng([config.seed, step]).random(config.batch_size)[positions] < 0.5
    return np.where(flip[:, None, None, None], x[:, :, ::-1], x), train_labels[idx]

  def test_set():
    return test_images.astype(np.float32) / 255.0, test_labels

  views = None
  if config.num_transformers:
    views = lambda model, x: _transformer_views(  # noqa: E731
        model.parallel.transformers, [x] * config.num_transformers)
  return Task(make_model, functools.partial(datasets.stream, batch), test_set,
              objectives.classification_terms, views, objectives.CLASSIFICATION)


# --- Co-localisation (appendix A.2) ---------------------------------------------------------


def colocalisation(config) -> Task:
  """Pairs of same-class digits on 84x84 canvases; triplet loss; localised % as accuracy."""
  train_images, train_labels = mnist_arrays(config, "train")
  test_images, test_labels = mnist_arrays(config, "test")
  shard = datasets.shard_of_batch(config.batch_size)
  pairs = dict(num_clutter=config.num_clutter, digit_class=config.digit_class)

  @functools.cache
  def encoder_weights():  # Once per task: a restored model takes its weights from the checkpoint.
    return coloc.pretrain_encoder(train_images, train_labels, steps=config.encoder_steps,
                                  seed=config.seed,
                                  num_clutter=config.get("encoder_clutter", 0))

  def make_model(rngs):
    return coloc.CoLocaliser(encoder_weights(), initial_scale=config.initial_scale,
                             inside_canvas=config.inside_canvas,
                             learn_scale=config.learn_scale,
                             normalize_embeddings=config.normalize_embeddings, rngs=rngs)

  def train_batches(start_step):
    by_class = coloc.class_index(train_labels)
    spread = functools.partial(coloc.curriculum_spread, steps=config.curriculum_steps,
                               start=config.curriculum_start)
    return datasets.stream(lambda step: coloc.pair_batch(
        train_images, by_class, batch=config.batch_size, seed=config.seed, step=step,
        shard=shard, spread=spread(step), **pairs), start_step)

  def test_set():
    return coloc.pair_batch(test_images, coloc.class_index(test_labels),
                            batch=config.test_examples, seed=config.test_seed, step=0, **pairs)

  terms = functools.partial(coloc.colocalisation_terms, margin=config.margin)
  views = lambda model, x: _transformer_views([model.st], [x])  # noqa: E731
  return Task(make_model, train_batches, test_set, terms, views,
              coloc.evaluation(margin=config.margin))


# --- 3-D MNIST (appendix A.3) ---------------------------------------------------------------


def mnist_3d(config) -> Task:
  """Extruded, 3-D rotated and translated digits; a 3-D transformer or none, then a 2-D CNN."""
  train_images, train_labels = mnist_arrays(config, "train")
  test_images, test_labels = mnist_arrays(config, "test")
  shard = datasets.shard_of_batch(config.batch_size)
  size, out = config.volume_size, config.output_size
  volumes = functools.partial(volumetric.extruded_digits, size=size, thickness=config.thickness,
                              max_degrees=config.max_degrees, max_shift=config.max_shift)

  def make_model(rngs):
    return modules3d.ProjectedVolumeClassifier((size,) * 3, out_dhw=(out,) * 3,
                                               st3d=config.st3d, projection=config.projection,
                                               rngs=rngs)

  def batch(step):  # The whole global batch, then this process's shard of it.
    idx = datasets.batch_indices(len(train_images), config.batch_size, config.seed, step)
    key = jax.random.fold_in(jax.random.key(config.seed), step)
    return np.asarray(volumes(key, train_images[idx]))[shard], train_labels[idx][shard]

  def train_batches(start_step):
    return datasets.stream(batch, start_step)

  def test_set():
    n = config.test_examples
    return np.asarray(volumes(jax.random.key(config.test_seed), test_images[:n])), test_labels[:n]

  # No loop figure: its inputs are volumes (experiments/mnist_3d_report.py draws them).
  return Task(make_model, train_batches, test_set, objectives.classification_terms)


# The one list of tasks: config.task -> its builder.
TASKS = {"distorted_mnist": distorted_mnist,
         "mnist_addition": mnist_addition,
         "sequences": sequences,
         "svhn": svhn,
         "cub": cub,
         "colocalisation": colocalisation,
         "mnist_3d": mnist_3d}


def build_task(config) -> Task:
  """The :class:`~stn_jax.loop.Task` named by ``config.task`` (a key of :data:`TASKS`)."""
  if config.task not in TASKS:
    raise ValueError(f"unknown config.task {config.task!r}; choose one of: {', '.join(TASKS)}.")
  return TASKS[config.task](config)
