"""MNIST on first use: download the four IDX files, prepare TFDS's ``mnist`` without TensorFlow.

:func:`prepare_mnist` fetches the standard files (``train-images-idx3-ubyte.gz``,
``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``,
``t10k-labels-idx1-ubyte.gz``, about 11 MB together) from the first mirror
that answers, checks them, and writes the TFDS data set ``mnist`` version
3.0.1 in the array_record format into the data directory, where
``tfds.data_source('mnist', data_dir=...)`` and
:func:`stn_jax.datasets.load_mnist` read it offline from then on. The records
and their order are those of TFDS's own ``mnist`` builder (same features,
same example keys, so TFDS shuffles them the same way).

Why not TFDS's own builder: it reads the files with ``tf.io.gfile`` and so needs
TensorFlow (and the undeclared ``importlib_resources``). Here the same
TFDS machinery (a :class:`tfds.core.GeneratorBasedBuilder`, its array_record
writer and its "write into ``incomplete.*``, then rename" preparation) runs
with PNG encoding done by Pillow, which needs neither.

Where things go, for a data directory ``D`` (``data_dir``, else
``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``):
``D/downloads/mnist/*.gz`` (the verified downloads, kept so that a rebuild does
not fetch them again; for a remote ``D`` such as ``gs://...``, a local temporary
directory) and ``D/mnist/3.0.1/`` (the TFDS data set).

Mirrors: ``$STN_JAX_MNIST_MIRROR`` (one base URL, or several separated by
commas, each holding the four files), else :data:`DEFAULT_MIRRORS`, tried in
order. A file is accepted only if it decompresses completely, its
decompressed bytes have the expected SHA-256 (:data:`MNIST_FILES`; checking
the decompressed bytes makes any mirror's gzip packing acceptable; the
published MD5s of the decompressed files match these too), and its IDX header
is sane. Each download goes to a temporary file in the same directory and is
renamed into place only after these checks, so an interrupted or failed run
leaves nothing half-written behind and a rerun starts cleanly.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import io
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from typing import Mapping, Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from stn_jax.datasets import resolve_data_dir

MIRROR_ENV = "STN_JAX_MNIST_MIRROR"
DEFAULT_MIRRORS = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",   # the mirror TFDS uses
    "https://ossci-datasets.s3.amazonaws.com/mnist/",        # the mirror torchvision uses
)
MNIST_VERSION = "3.0.1"   # TFDS's mnist version these records match


class DownloadError(OSError):
  """A file could not be fetched from any mirror, or failed its checks."""


@dataclasses.dataclass(frozen=True)
class IdxFile:
  """A gzip-compressed IDX file: its name on a mirror, the SHA-256 of its decompressed bytes."""
  name: str
  sha256: str


# Keys: (split, "image" | "label"). SHA-256 of the decompressed files; their MD5s are the
# published ones (train-images 6bbc9ace..., train-labels a25bea73..., t10k-images 2646ac64...,
# t10k-labels 27ae3e4e...).
MNIST_FILES: Mapping[tuple[str, str], IdxFile] = {
    ("train", "image"): IdxFile("train-images-idx3-ubyte.gz",
                                "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    ("train", "label"): IdxFile("train-labels-idx1-ubyte.gz",
                                "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    ("test", "image"): IdxFile("t10k-images-idx3-ubyte.gz",
                               "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    ("test", "label"): IdxFile("t10k-labels-idx1-ubyte.gz",
                               "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}


def mirrors() -> tuple[str, ...]:
  """Base URLs to try, in order: ``$STN_JAX_MNIST_MIRROR`` (comma-separated), else the defaults."""
  given = [m.strip() for m in os.environ.get(MIRROR_ENV, "").split(",") if m.strip()]
  return tuple(given) or DEFAULT_MIRRORS


def parse_idx(raw: bytes, source: str) -> np.ndarray:
  """The uint8 array of a decompressed IDX file (magic ``0 0 8 ndim``, big-endian dims, data)."""
  if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or not 1 <= raw[3] <= 4:
    raise DownloadError(f"{source} is not an IDX file of unsigned bytes "
                        f"(header {raw[:4].hex() or 'empty'}).")
  ndim = raw[3]
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  if len(raw) != 4 + 4 * ndim + int(np.prod(shape)):
    raise DownloadError(f"{source} holds {len(raw)} bytes; its header {list(shape)} says "
                        f"{4 + 4 * ndim + int(np.prod(shape))}.")
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _read_checked(path: str, expected: IdxFile, source: str) -> np.ndarray:
  """Decompresses ``path``, checks its SHA-256 and IDX header; ``source`` names it in errors."""
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
  except (EOFError, OSError, zlib.error) as error:
    raise DownloadError(f"{source} is truncated or not gzip data "
                        f"({type(error).__name__}: {error}).") from error
  digest = hashlib.sha256(raw).hexdigest()
  if digest != expected.sha256:
    raise DownloadError(f"{source} has the wrong checksum: SHA-256 of its decompressed bytes "
                        f"is {digest}, expected {expected.sha256}.")
  return parse_idx(raw, source)


def _fetch(url: str, path: str, expected: IdxFile, timeout: float) -> np.ndarray:
  """Downloads ``url`` to ``path`` atomically (temporary file, checks, rename); its array."""
  directory = os.path.dirname(path)
  handle, temporary = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".partial",
                                       dir=directory)
  try:
    with os.fdopen(handle, "wb") as out:
      try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
          shutil.copyfileobj(response, out)
      except (OSError, http.client.HTTPException, ValueError) as error:  # URLError is an OSError.
        detail = error.reason if type(error) is urllib.error.URLError else error
        raise DownloadError(f"could not download {url} ({type(error).__name__}: {detail}).") \
            from error
    array = _read_checked(temporary, expected, url)
    os.replace(temporary, path)
    return array
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def _fetch_from_mirrors(expected: IdxFile, path: str, bases: Sequence[str],
                       timeout: float) -> np.ndarray:
  """The first of ``bases`` that serves a good copy of ``expected``; every failure in the error."""
  failures = []
  for base in bases:
    url = urllib.parse.urljoin(base if base.endswith("/") else base + "/", expected.name)
    try:
      return _fetch(url, path, expected, timeout)
    except DownloadError as error:
      failures.append(error)
  reasons = "\n  ".join(str(f) for f in failures)
  raise DownloadError(
      f"could not get {expected.name} from {len(bases)} mirror(s):\n  {reasons}\n"
      f"Set {MIRROR_ENV} to a base URL that serves the four MNIST files, or point "
      f"TFDS_DATA_DIR (--data_dir) at a directory with a prepared TFDS 'mnist'.") from failures[-1]


def _download_arrays(directory: str, *, bases: Sequence[str],
                     files: Mapping[tuple[str, str], IdxFile],
                     timeout: float) -> dict[tuple[str, str], np.ndarray]:
  """The arrays of ``files``, from verified copies in ``directory`` or else downloaded there."""
  os.makedirs(directory, exist_ok=True)
  arrays = {}
  for key, expected in files.items():
    path = os.path.join(directory, expected.name)
    if os.path.exists(path):
      try:
        arrays[key] = _read_checked(path, expected, path)
        continue
      except DownloadError as error:   # A stale or damaged copy: fetch it again.
        print(f"stn_jax: {error} Downloading it again.", file=sys.stderr)
    arrays[key] = _fetch_from_mirrors(expected, path, bases, timeout)
  return arrays


def _png(image: np.ndarray) -> bytes:
  """PNG bytes of a uint8 ``[H, W]`` image (Pillow, so no TensorFlow is needed)."""
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="png")
  return buffer.getvalue()


with tfds.core.registered.skip_registration():   # TFDS's own MNIST keeps the name 'mnist'.

  class MnistFromArrays(tfds.core.GeneratorBasedBuilder):
    """TFDS ``mnist`` 3.0.1 written from in-memory arrays (same features and example keys)."""

    name = "mnist"
    VERSION = tfds.core.Version(MNIST_VERSION)
    code_path = None   # No checksums file to look up (it would need importlib_resources).

    def __init__(self, arrays: Mapping[tuple[str, str], np.ndarray], **kwargs):
      self._arrays = arrays
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          description="The MNIST database of handwritten digits (LeCun, Cortes and Burges).",
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(28, 28, 1)),
              "label": tfds.features.ClassLabel(num_classes=10),
          }),
          supervised_keys=("image", "label"),
          homepage="http://yann.lecun.com/exdb/mnist/")

    def _split_generators(self, dl_manager):
      del dl_manager   # The files are already here.
      splits = sorted({split for split, _ in self._arrays})
      return {split: self._generate_examples(self._arrays[split, "image"],
                                             self._arrays[split, "label"]) for split in splits}

    def _generate_examples(self, images, labels):
      for index in range(len(images)):
        yield index, {"image": _png(images[index]), "label": int(labels[index])}


def _check_pairs(arrays: Mapping[tuple[str, str], np.ndarray]) -> None:
  """Images ``[N, 28, 28]`` and labels ``[N]`` in 0..9 for each split."""
  for split in sorted({split for split, _ in arrays}):
    images, labels = arrays[split, "image"], arrays[split, "label"]
    if images.shape[1:] != (28, 28) or labels.shape != images.shape[:1]:
      raise DownloadError(f"MNIST {split}: images {list(images.shape)} and labels "
                          f"{list(labels.shape)} do not match [N, 28, 28] and [N].")
    if labels.size and labels.max() > 9:
      raise DownloadError(f"MNIST {split}: a label is {int(labels.max())}, not a digit 0..9.")


def prepare_mnist(data_dir: Optional[str] = None, *, mirror: Optional[str] = None,
                  files: Optional[Mapping[tuple[str, str], IdxFile]] = None,
                  timeout: float = 60.0) -> str:
  """Downloads MNIST (unless already there) and prepares TFDS ``mnist``; returns its directory.

  Args:
    data_dir: the TFDS data directory; default ``$TFDS_DATA_DIR``, else
      ``~/tensorflow_datasets``.
    mirror: base URL(s) to fetch from, comma-separated; default
      ``$STN_JAX_MNIST_MIRROR``, else :data:`DEFAULT_MIRRORS`.
    files: the files and their checksums; default :data:`MNIST_FILES`.
    timeout: seconds to wait for a mirror's answer.

  Raises:
    DownloadError: naming each URL tried and why it failed (the underlying
      exception is chained). Nothing half-written is left behind.
  """
  directory = resolve_data_dir(data_dir)
  builder_dir = os.path.join(directory, "mnist", MNIST_VERSION)
  if epath.Path(builder_dir, "dataset_info.json").exists():
    return builder_dir
  bases = tuple(m.strip() for m in mirror.split(",") if m.strip()) if mirror else mirrors()
  print(f"stn_jax: MNIST is not prepared in {directory!r}; downloading it (about 11 MB) "
        f"from {bases[0]} and preparing it there (once).", file=sys.stderr)
  remote = "://" in directory   # e.g. gs://: TFDS writes there, the downloads stay local.
  with tempfile.TemporaryDirectory() as scratch:
    downloads = os.path.join(scratch if remote else directory, "downloads")
    arrays = _download_arrays(os.path.join(downloads, "mnist"), bases=bases,
                              files=files or MNIST_FILES, timeout=timeout)
    _check_pairs(arrays)
    builder = MnistFromArrays(arrays, data_dir=directory, file_format="array_record")
    quiet = not sys.stderr.isatty()   # TFDS's progress bars are noise in a log file.
    if quiet:
      tfds.disable_progress_bar()
    try:
      builder.download_and_prepare(
          download_dir=downloads,
          download_config=tfds.download.DownloadConfig(
              compute_stats=tfds.download.ComputeStatsMode.SKIP))
    finally:
      if quiet:
        tfds.enable_progress_bar()
  return builder_dir
