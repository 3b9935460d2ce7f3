"""Data loading through TensorFlow Datasets, offline included, and batch streams.

Whole splits fit in memory as uint8 arrays, read with ``tfds.data_source``
(array_record, random access, no TensorFlow needed). The data directory is
``data_dir`` if given, else ``$TFDS_DATA_DIR``, else TFDS's default
(``~/tensorflow_datasets``).

MNIST on first use: when ``mnist`` is not prepared there, :func:`load_mnist`
downloads the four standard files (about 11 MB) and prepares TFDS's ``mnist``
in that directory itself, without TensorFlow (:mod:`stn_jax.download`; mirror:
``$STN_JAX_MNIST_MIRROR``); later runs read it offline. ``download=False``, or
``STN_JAX_DOWNLOAD=0`` in the environment (the CLI's ``--nodownload``),
forbids that. Other data sets (SVHN, CUB) are downloaded by TFDS itself only
with ``download=True`` and TensorFlow installed (``pip install 'stn-jax[download]'``).

TFDS's notices that reach every user and need no action ("... has no
dataset_info.json" while looking for a data set, "OpenCV is not installed"
when decoding with Pillow) are filtered out of the ``absl`` logger.
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import Any, Callable, Iterator, Optional

import jax
import numpy as np

from stn_jax import distortions


DOWNLOAD_ENV = "STN_JAX_DOWNLOAD"   # "0": never download (the CLI's --nodownload)
_QUIET_NOTICES = ("has no dataset_info.json", "OpenCV is not installed")


class _QuietTfdsNotices(logging.Filter):
  """Drops TFDS's two routine notices (see the module docstring); keeps everything else."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not any(notice in record.getMessage() for notice in _QUIET_NOTICES)


logging.getLogger("absl").addFilter(_QuietTfdsNotices())


class DataNotFoundError(FileNotFoundError):
  """A data set is not prepared in the data directory and may not be downloaded."""


def resolve_data_dir(data_dir: Optional[str] = None) -> str:
  """``data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets`` (user-expanded)."""
  if data_dir:
    return os.path.expanduser(data_dir)
  if os.environ.get("TFDS_DATA_DIR"):
    return os.path.expanduser(os.environ["TFDS_DATA_DIR"])
  return os.path.expanduser(os.path.join("~", "tensorflow_datasets"))


def download_allowed(download: Optional[bool]) -> bool:
  """``download`` if given, else whether ``$STN_JAX_DOWNLOAD`` is not ``0`` (default: allowed)."""
  if download is not None:
    return download
  return os.environ.get(DOWNLOAD_ENV, "1").strip() != "0"


def _not_prepared(name: str, directory: str) -> DataNotFoundError:
  where = f"TFDS data set {name!r} is not prepared in {directory!r}"
  elsewhere = ("or point TFDS_DATA_DIR (or --data_dir, or data_dir=) at a directory that "
               "holds a prepared copy")
  if name == "mnist":
    return DataNotFoundError(
        f"{where}, and downloading it is switched off (download=False, --nodownload or "
        f"{DOWNLOAD_ENV}=0). Allow the download (about 11 MB, no TensorFlow needed), {elsewhere}.")
  return DataNotFoundError(
      f"{where}. TFDS downloads and prepares it itself only with TensorFlow installed: pip "
      f"install 'stn-jax[download]', then in Python call this loader once with download=True; "
      f"{elsewhere}.")


def _data_source(name: str, split: str, data_dir: Optional[str], download: Optional[bool]):
  """``tfds.data_source`` of a split; prepares a missing data set when allowed (see above)."""
  import tensorflow_datasets as tfds
  directory = resolve_data_dir(data_dir)
  try:
    return tfds.data_source(name, split=split, data_dir=directory, download=False)
  except Exception:
    if tfds.builder(name, data_dir=directory).is_prepared():
      raise   # Prepared but unreadable: TFDS's own error, unchanged.
  # Not prepared (TFDS's error, about file formats, would mislead here).
  if name == "mnist" and download_allowed(download):
    from stn_jax import download as mnist_download
    mnist_download.prepare_mnist(directory)
    return tfds.data_source(name, split=split, data_dir=directory, download=False)
  if name != "mnist" and download:   # TFDS's own download and preparation: needs TensorFlow.
    return tfds.data_source(name, split=split, data_dir=directory, download=True)
  raise _not_prepared(name, directory)


def load_arrays(name: str, split: str, *, data_dir: Optional[str] = None,
                download: Optional[bool] = None,
                keys=("image", "label")) -> dict[str, np.ndarray]:
  """Reads a whole TFDS split into memory as NumPy arrays (one per key).

  ``download``: for ``mnist``, None (default) downloads it when missing unless
  ``$STN_JAX_DOWNLOAD`` is ``0``; for other data sets only True lets TFDS
  download (needs TensorFlow). False never downloads.
  """
  source = _data_source(name, split, data_dir, download)
  try:
    records = source.__getitems__(list(range(len(source))))
  except TypeError:  # Some sources (e.g. tfds.testing.mock_data) read one at a time only.
    records = [source[i] for i in range(len(source))]
  return {k: np.stack([np.asarray(r[k]) for r in records]) for k in keys}


def load_mnist(split: str, *, data_dir: Optional[str] = None,
               download: Optional[bool] = None) -> tuple[np.ndarray, np.ndarray]:
  """MNIST ``(images uint8 [N, 28, 28, 1], labels int32 [N])`` for ``'train'`` or ``'test'``.

  Downloaded and prepared on first use unless ``download=False`` or
  ``$STN_JAX_DOWNLOAD=0`` (:func:`stn_jax.download.prepare_mnist`).
  """
  arrays = load_arrays("mnist", split, data_dir=data_dir, download=download)
  return arrays["image"].astype(np.uint8), arrays["label"].astype(np.int32)


def shard_of_batch(global_batch: int, process_index: Optional[int] = None,
                   process_count: Optional[int] = None) -> slice:
  """The slice of each global batch that this process reads (multi-host data parallelism)."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if global_batch % count:
    raise ValueError(f"global batch {global_batch} must divide by the process count {count}.")
  per = global_batch // count
  return slice(index * per, (index + 1) * per)


def epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """The shuffled example order of ``epoch``, the same on every process."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def batch_indices(num_examples: int, global_batch: int, seed: int, step: int,
                  shard: slice = slice(None)) -> np.ndarray:
  """Example indices of this process's ``shard`` of global batch ``step``.

  Epochs are reshuffled (:func:`epoch_order`); the remainder of an epoch
  that does not fill a batch is skipped. A pure function of its arguments.
  """
  steps_per_epoch = num_examples // global_batch
  if steps_per_epoch == 0:
    raise ValueError(f"global batch {global_batch} exceeds the {num_examples} examples.")
  epoch, within = divmod(step, steps_per_epoch)
  order = epoch_order(num_examples, seed, epoch)
  return order[within * global_batch:(within + 1) * global_batch][shard]


def synthetic_digits(num: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """A tiny offline stand-in for MNIST (tests, smoke runs): ``(uint8 [N, 28, 28, 1], labels [N])``.

  Class ``k`` is a bright stroke whose orientation is ``18 k`` degrees
  through the centre, drawn with random thickness and small offsets, plus
  noise; learnable in a few hundred steps and sensitive to the distortions.
  """
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, num).astype(np.int32)
  yy, xx = np.mgrid[:28, :28].astype(np.float32) - 13.5
  angle = np.deg2rad(18.0 * labels)[:, None, None]
  offset = rng.uniform(-2, 2, (num, 2, 1, 1)).astype(np.float32)
  y, x = yy[None] - offset[:, 0], xx[None] - offset[:, 1]
  across = np.abs(-np.sin(angle) * x + np.cos(angle) * y)
  along = np.abs(np.cos(angle) * x + np.sin(angle) * y)
  width = rng.uniform(1.2, 2.5, (num, 1, 1))
  stroke = np.exp(-(across / width) ** 2) * (along < 9 + 2 * (labels[:, None, None] % 3))
  image = np.clip(stroke + 0.1 * rng.random((num, 28, 28)), 0, 1)
  return (255 * image[..., None]).astype(np.uint8), labels


def stream(batch_of_step: Callable[[int], Any], start_step: int = 0) -> Iterator[Any]:
  """``batch_of_step(step)`` for ``step = start_step, start_step + 1, ...``: the endless form of
  every training stream (each batch a pure function of its step)."""
  return map(batch_of_step, itertools.count(start_step))


def example_keys(seed: int, step: int, positions: np.ndarray) -> jax.Array:
  """Keys ``[len(positions)]``: ``fold_in(fold_in(key(seed), step), i)`` for each position
  ``i`` in global batch ``step`` (so an example's randomness does not depend on the process
  count)."""
  return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.fold_in(jax.random.key(seed), step),
                                                   np.asarray(positions))


def distorted_batches(images: np.ndarray, labels: np.ndarray, *, variant: str,
                      global_batch: int, seed: int, start_step: int = 0,
                      process_index: Optional[int] = None,
                      process_count: Optional[int] = None) -> Iterator[tuple[jax.Array, np.ndarray]]:
  """Endless training stream of this process's shard of each distorted global batch.

  Step ``s`` reads the examples of position ``s`` in the epoch orders of
  :func:`epoch_order` and distorts the example at position ``i`` of the global
  batch with key ``fold_in(fold_in(key(seed), s), i)`` (so the stream does not
  depend on the number of processes): the
  data are distorted afresh each epoch, and the stream is a pure function of
  ``(seed, step)``, so a run resumed at ``start_step`` sees what an
  uninterrupted one would.
  """
  shard = shard_of_batch(global_batch, process_index, process_count)

  def batch(step):
    idx = batch_indices(len(images), global_batch, seed, step, shard)
    keys = example_keys(seed, step, np.arange(shard.start, shard.start + len(idx)))
    return distortions.distort_each(keys, images[idx], variant), labels[idx]

  return stream(batch, start_step)


def distorted_test_set(images: np.ndarray, *, variant: str, seed: int = 0,
                       chunk: int = 1000) -> np.ndarray:
  """The test set distorted once with a fixed seed (float32), so every model sees the same images."""
  base = jax.random.key(seed)
  out = [np.asarray(distortions.distort(jax.random.fold_in(base, i), images[s:s + chunk], variant))
         for i, s in enumerate(range(0, len(images), chunk))]
  return np.concatenate(out)


def load_svhn_cropped(split: str, *, data_dir: Optional[str] = None, download: bool = False):
  """SVHN through TFDS ``svhn_cropped``: ``(images uint8 [N, 32, 32, 3], labels [N])``.

  TFDS holds only the single-digit 32x32 crops, not the multi-digit sequences
  of the paper's Table 2 (64x64 crops around whole house numbers), so this
  cannot reproduce Table 2; :func:`stn_jax.distortions.digit_sequences` gives
  a multi-digit task of the same shape from MNIST.
  """
  arrays = load_arrays("svhn_cropped", split, data_dir=data_dir, download=download)
  return arrays["image"].astype(np.uint8), arrays["label"].astype(np.int32)


def load_cub(split: str, *, data_dir: Optional[str] = None, download: bool = False,
             size: int = 448) -> tuple[np.ndarray, np.ndarray]:
  """CUB-200-2011 through TFDS ``caltech_birds2011``, resized to ``size x size`` (the paper's 448).

  Returns ``(images uint8 [N, size, size, 3], labels [N])``. Training-time
  augmentation (random crops and flips) belongs to the training pipeline.
  """
  from PIL import Image
  source = _data_source("caltech_birds2011", split, data_dir, download)
  images, labels = [], []
  for i in range(len(source)):
    record = source[i]
    img = Image.fromarray(np.asarray(record["image"]).astype(np.uint8))
    images.append(np.asarray(img.resize((size, size), Image.BILINEAR)))
    labels.append(int(record["label"]))
  return np.stack(images), np.asarray(labels, np.int32)
