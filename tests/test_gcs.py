"""Work directories and data on ``gs://``, against a real Cloud Storage API emulator on 127.0.0.1.

The emulator is ``gcp-storage-emulator`` (the ``[test]`` extra), started once
per session in its own process with an in-memory store. Each client library
is pointed at it by its own setting (:data:`EMULATOR_SETTINGS`); nothing is
mocked. Also here: the TPU launch script's commands (dry run, no cloud call).
"""

import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "bucket"


def emulator_settings(url: str) -> dict:
  """The environment that points every Cloud Storage client the project uses at ``url``."""
  return {
      # gcsfs (etils.epath's gs:// backend without TensorFlow) and google-cloud-storage.
      "STORAGE_EMULATOR_HOST": url,
      "FSSPEC_GCS_TOKEN": "anon",                    # gcsfs: no credential lookup
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no bucket-type lookup by gRPC
      # tensorstore (orbax's array files).
      "TENSORSTORE_GCS_HTTP_URL": url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",   # tensorstore: no credential lookup
      # google-cloud-cpp inside array_record (TFDS's data files).
      "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
  }


@pytest.fixture(scope="session")
def gcs():
  """The emulator's URL; its settings are in ``os.environ`` (so subprocesses inherit them)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = subprocess.Popen(
      [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1",
       "--port", str(port), "--in-memory", "--default-bucket", BUCKET, "-q"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + 30
  while True:
    try:
      urllib.request.urlopen(url + "/", timeout=1).read()
      break
    except OSError:
      if time.time() > deadline or server.poll() is not None:
        server.kill()
        pytest.fail("the Cloud Storage emulator did not start")
      time.sleep(0.1)
  saved = {k: os.environ.get(k) for k in emulator_settings(url)}
  os.environ.update(emulator_settings(url))
  yield url
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key, None)
    else:
      os.environ[key] = value
  server.terminate()
  server.wait(timeout=10)


def upload_tree(local: str, remote: str) -> None:
  from etils import epath
  for directory, _, files in os.walk(local):
    for name in files:
      source = os.path.join(directory, name)
      target = epath.Path(remote) / os.path.relpath(source, local)
      target.write_bytes(epath.Path(source).read_bytes())


def tiny_mnist(tmp_path, n_train=64, n_test=32):
  """A prepared TFDS ``mnist`` 3.0.1 of random digits in ``tmp_path/tfds``; returns the arrays."""
  import tensorflow_datasets as tfds
  from stn_jax import download
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in (("train", n_train), ("test", n_test)):
    arrays[split, "image"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    arrays[split, "label"] = rng.integers(0, 10, n).astype(np.int64)
  data_dir = str(tmp_path / "tfds")
  builder = download.MnistFromArrays(arrays, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return data_dir, arrays


def test_mnist_reads_from_a_gs_data_directory(gcs, tmp_path):
  from stn_jax import datasets
  local, arrays = tiny_mnist(tmp_path)
  upload_tree(local + "/mnist", f"gs://{BUCKET}/data/mnist")
  images, labels = datasets.load_mnist("test", data_dir=f"gs://{BUCKET}/data", download=False)
  # TFDS stores the examples shuffled (by key): compare them as (image, label) pairs.
  expected = {arrays["test", "image"][i].tobytes(): arrays["test", "label"][i] for i in range(32)}
  assert images.shape == (32, 28, 28, 1)
  assert {x[..., 0].tobytes(): y for x, y in zip(images, labels)} == expected


# --- The TPU launch script (dry run) --------------------------------------------------------


def launch(*args):
  return subprocess.run([sys.executable, "-m", "experiments.launch_tpu", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=60)


def test_launch_script_prints_the_gcloud_commands_it_would_run():
  out = launch("--name=stn", "--zone=us-central2-b", "--accelerator_type=v4-32",
               "--workdir=gs://b/stn/run1", "--data_dir=gs://b/tfds", "--spot",
               "--repo=https://example.org/stn-jax.git", "--ref=v1", "--dry_run",
               "--", "--config.steps=3000")
  assert out.returncode == 0, out.stderr
  create, setup, train = [shlex.split(line) for line in out.stdout.strip().splitlines()]
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "stn",
                    "--zone=us-central2-b", "--accelerator-type=v4-32",
                    "--version=tpu-ubuntu2204-base", "--spot"]
  for command in (setup, train):
    assert command[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "stn"]
    assert "--worker=all" in command and command[-1].startswith("--command=")
  setup_script = setup[-1][len("--command="):]
  assert "pip install -q -U 'jax[tpu]'" in setup_script
  assert "git clone -q https://example.org/stn-jax.git ~/stn-jax" in setup_script
  assert "checkout -q v1" in setup_script and "pip install -q -e ~/stn-jax" in setup_script
  train_words = shlex.split(train[-1][len("--command="):].replace("&&", ";"))
  assert "TFDS_DATA_DIR=gs://b/tfds" in train_words
  i = train_words.index("experiments.train")
  assert train_words[i + 1:i + 5] == [
      "--config=stn_jax/configs/distorted_mnist.py:st_cnn_affine_rts",
      "--workdir=gs://b/stn/run1", "--distributed", "--config.steps=3000"]
  # The dry run ran nothing: no gcloud is needed for it.
  assert "error" not in out.stderr


@pytest.mark.parametrize("args,message", [
    (["--steps=train", "--workdir=runs/x"], "train needs --workdir=gs://"),
    (["--steps=setup"], "setup needs --repo"),
    (["--steps=boot"], "unknown step(s) boot"),
])
def test_launch_script_refuses_what_cannot_work(args, message):
  out = launch("--name=stn", "--zone=z", "--dry_run", *args)
  assert out.returncode == 2 and message in out.stderr
