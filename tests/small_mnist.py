"""A small MNIST for tests that run user-facing code as written (README blocks, notebooks).

:func:`prepare` serves a few hundred :func:`stn_jax.datasets.synthetic_digits`
in MNIST's own IDX files from a real HTTP server on 127.0.0.1 and lets
:func:`stn_jax.download.prepare_mnist` (the library's first-use path) download,
check and prepare them as TFDS ``mnist`` in a data directory. Code that reads
MNIST the usual way (``$TFDS_DATA_DIR``) then finds it there: no internet, no
shared copy, and evaluation sets small enough for a test.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import pathlib
import threading

import numpy as np

from stn_jax import datasets, download

SIZES = {"train": 256, "test": 64}


def idx_bytes(array: np.ndarray) -> bytes:
  """The IDX encoding of a uint8 array: magic ``0 0 8 ndim``, big-endian dims, the bytes."""
  header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  return header + array.astype(np.uint8).tobytes()


class _Quiet(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):  # No request lines in the test output.
    pass


@contextlib.contextmanager
def http_server(directory: pathlib.Path):
  """``http.server`` on 127.0.0.1 (a free port) serving ``directory``; yields its base URL."""
  handler = functools.partial(_Quiet, directory=str(directory))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_port}/"
  finally:
    server.shutdown()
    server.server_close()
    thread.join()


def prepare(root: pathlib.Path) -> pathlib.Path:
  """Prepares the small MNIST under ``root / 'tfds'`` and returns that data directory."""
  mirror = root / "mirror"
  mirror.mkdir(parents=True)
  files = {}
  for seed, (split, size) in enumerate(SIZES.items()):
    images, labels = datasets.synthetic_digits(size, seed=seed)
    for kind, array in (("image", images[..., 0]), ("label", labels.astype(np.uint8))):
      name = download.MNIST_FILES[split, kind].name
      raw = idx_bytes(array)
      (mirror / name).write_bytes(gzip.compress(raw))
      files[split, kind] = download.IdxFile(name, hashlib.sha256(raw).hexdigest())
  data_dir = root / "tfds"
  with http_server(mirror) as url:
    download.prepare_mnist(str(data_dir), mirror=url, files=files)
  return data_dir
