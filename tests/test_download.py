"""MNIST on first use (stn_jax.download) against a real HTTP server on 127.0.0.1.

The server serves a few hundred synthetic digits in the real IDX format,
gzip-compressed, under the standard file names; the tests pass those files'
own checksums. No internet and no prepared MNIST are needed.
"""

import functools
import gzip
import hashlib
import http.server
import os
import socket
import threading

import numpy as np
import pytest
import tensorflow_datasets as tfds

from stn_jax import datasets, download

SIZES = {"train": 120, "test": 40}


def idx_bytes(array: np.ndarray) -> bytes:
  """The IDX encoding of a uint8 array: magic 0 0 8 ndim, big-endian dims, the bytes."""
  header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  return header + array.astype(np.uint8).tobytes()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  """A directory of the four .gz files, their arrays and their checksums."""
  root = tmp_path_factory.mktemp("mirror")
  arrays, files = {}, {}
  for seed, split in enumerate(SIZES):
    images, labels = datasets.synthetic_digits(SIZES[split], seed=seed)
    for kind, array in (("image", images[..., 0]), ("label", labels.astype(np.uint8))):
      name = download.MNIST_FILES[split, kind].name
      raw = idx_bytes(array)
      (root / name).write_bytes(gzip.compress(raw))
      arrays[split, kind] = array
      files[split, kind] = download.IdxFile(name, hashlib.sha256(raw).hexdigest())
  return root, arrays, files


class Mirror:
  """``http.server`` on 127.0.0.1 (port 0) in a thread, serving one directory."""

  def __init__(self, directory):
    handler = functools.partial(QuietHandler, directory=str(directory))
    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    self.url = f"http://127.0.0.1:{self.server.server_port}/"
    self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
    self.thread.start()

  def stop(self):
    self.server.shutdown()
    self.server.server_close()
    self.thread.join()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):
    pass


@pytest.fixture
def mirror(served):
  server = Mirror(served[0])
  yield server
  server.stop()


def closed_port() -> int:
  """A port on 127.0.0.1 with nothing listening (connections are refused)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def leftovers(data_dir) -> list[str]:
  """Half-written things: temporary downloads and TFDS's incomplete.* directories."""
  found = []
  for parent, dirs, names in os.walk(data_dir):
    found += [os.path.join(parent, n) for n in dirs + names
              if n.endswith(".partial") or n.startswith("incomplete")]
  return found


def causes(error: BaseException) -> list[BaseException]:
  """The error and the exceptions it was raised from or while handling (what a traceback shows)."""
  chain = []
  while error is not None:
    chain.append(error)
    error = error.__cause__ or error.__context__
  return chain


def as_sorted_rows(images, labels):
  """Examples as sortable rows (TFDS stores them in its own shuffled order)."""
  rows = np.concatenate([labels.reshape(-1, 1), images.reshape(len(images), -1)], axis=1)
  return rows[np.lexsort(rows.T[::-1])]


def test_first_use_downloads_then_reads_offline(served, mirror, tmp_path, monkeypatch):
  _, arrays, files = served
  monkeypatch.setattr(download, "MNIST_FILES", files)   # this mirror's own checksums
  monkeypatch.setenv(download.MIRROR_ENV, mirror.url)
  monkeypatch.delenv(datasets.DOWNLOAD_ENV, raising=False)
  data_dir = str(tmp_path / "tfds")
  images, labels = datasets.load_mnist("train", data_dir=data_dir)   # downloads and prepares
  assert images.shape == (SIZES["train"], 28, 28, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(as_sorted_rows(images, labels),
                                as_sorted_rows(arrays["train", "image"], arrays["train", "label"]))
  assert leftovers(data_dir) == []
  mirror.stop()   # offline from now on
  monkeypatch.setenv(datasets.DOWNLOAD_ENV, "0")
  test_images, test_labels = datasets.load_mnist("test", data_dir=data_dir)
  np.testing.assert_array_equal(as_sorted_rows(test_images, test_labels),
                                as_sorted_rows(arrays["test", "image"], arrays["test", "label"]))
  # TFDS's own loader reads the prepared data set (image decoding by Pillow).
  source = tfds.data_source("mnist", split="test", data_dir=data_dir)
  assert len(source) == SIZES["test"] and source[0]["image"].shape == (28, 28, 1)


def test_truncated_file_is_rejected_and_a_rerun_succeeds(served, tmp_path):
  root, _, files = served
  truncated = tmp_path / "truncated_mirror"
  truncated.mkdir()
  for f in files.values():
    data = (root / f.name).read_bytes()
    (truncated / f.name).write_bytes(data[:len(data) // 2] if "t10k-images" in f.name else data)
  bad = Mirror(truncated)
  data_dir = tmp_path / "tfds"
  try:
    with pytest.raises(download.DownloadError) as info:
      download.prepare_mnist(str(data_dir), mirror=bad.url, files=files)
  finally:
    bad.stop()
  message = str(info.value)
  assert f"{bad.url}t10k-images-idx3-ubyte.gz" in message and "truncated" in message
  assert download.MIRROR_ENV in message and "TFDS_DATA_DIR" in message
  assert any(isinstance(e, EOFError) for e in causes(info.value))
  assert leftovers(data_dir) == [] and not (data_dir / "mnist").exists()
  good = Mirror(root)
  try:
    path = download.prepare_mnist(str(data_dir), mirror=good.url, files=files)
  finally:
    good.stop()
  assert os.path.isfile(os.path.join(path, "dataset_info.json")) and leftovers(data_dir) == []


def test_wrong_checksum_is_rejected_and_a_rerun_succeeds(served, mirror, tmp_path):
  _, _, files = served
  wrong = dict(files)
  wrong["train", "label"] = download.IdxFile(files["train", "label"].name, "0" * 64)
  data_dir = tmp_path / "tfds"
  with pytest.raises(download.DownloadError) as info:
    download.prepare_mnist(str(data_dir), mirror=mirror.url, files=wrong)
  message = str(info.value)
  assert f"{mirror.url}train-labels-idx1-ubyte.gz" in message
  assert "wrong checksum" in message and "0" * 64 in message
  assert leftovers(data_dir) == [] and not (data_dir / "mnist").exists()
  assert not (data_dir / "downloads" / "mnist" / files["train", "label"].name).exists()
  download.prepare_mnist(str(data_dir), mirror=mirror.url, files=files)
  assert datasets.load_mnist("train", data_dir=str(data_dir), download=False)[0].shape[0] == \
      SIZES["train"]


def test_unreachable_server_names_url_and_cause_then_next_mirror_works(served, mirror, tmp_path):
  _, _, files = served
  dead = f"http://127.0.0.1:{closed_port()}/"
  data_dir = tmp_path / "tfds"
  with pytest.raises(download.DownloadError) as info:
    download.prepare_mnist(str(data_dir), mirror=dead, files=files)
  assert f"{dead}train-images-idx3-ubyte.gz" in str(info.value)
  assert "Connection refused" in str(info.value)
  assert any(isinstance(e, ConnectionRefusedError) for e in causes(info.value))
  assert leftovers(data_dir) == [] and not (data_dir / "mnist").exists()
  # Mirrors are tried in order: the dead one first, then the good one.
  download.prepare_mnist(str(data_dir), mirror=f"{dead},{mirror.url}", files=files)
  assert tfds.builder("mnist", data_dir=str(data_dir)).is_prepared()
