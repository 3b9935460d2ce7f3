"""Work directories and data on ``gs://``, against a real Cloud Storage API emulator on 127.0.0.1.

The emulator is ``gcp-storage-emulator`` (the ``[test]`` extra), started once
per session in its own process with an in-memory store. Each client library
is pointed at it by its own setting (:data:`EMULATOR_SETTINGS`); nothing is
mocked. Also here: the TPU launch script's commands (dry run, no cloud call).
"""

import json
import os
import shlex
import socket
import struct
import subprocess
import sys
import textwrap
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


# gcp-storage-emulator, started with one fix: Cloud Storage sends an object's generation
# (x-goog-generation) with its data, and tensorstore's conditional writes (orbax's OCDBT
# manifests) reuse it; the emulator leaves that header out ("Malformed StorageGeneration").
EMULATOR = """
import sys
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

plain_download = objects.download


def download(request, response, storage, *args, **kwargs):
  try:
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
  except NotFound:
    pass
  return plain_download(request, response, storage, *args, **kwargs)


objects.download = download
from gcp_storage_emulator.server import create_server  # after the fix: it binds the handlers
create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket=sys.argv[2]).run()
"""


@pytest.fixture(scope="session")
def gcs():
  """The emulator's URL; its settings are in ``os.environ`` (so subprocesses inherit them)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = subprocess.Popen([sys.executable, "-c", EMULATOR, str(port), BUCKET],
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


# --- Training with a gs:// work directory -----------------------------------------------------


def read_events(data: bytes) -> list[tuple[str, int, float]]:
  """``(tag, step, value)`` of every scalar in a TensorBoard event file (TFRecord framing)."""
  from tensorboardX.proto import event_pb2
  out, i = [], 0
  while i < len(data):
    (length,) = struct.unpack("<Q", data[i:i + 8])
    event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
    i += 12 + length + 4
    out.extend((v.tag, event.step, v.simple_value) for v in event.summary.value)
  return out


class Stop(Exception):
  pass


def test_training_in_a_gs_work_directory_stops_resumes_and_reads_back(gcs, tmp_path):
  from etils import epath
  import jax
  from flax import nnx
  from stn_jax import checkpoints, loop, optim, steps, tasks, workdir
  from tests.conftest import assert_same_params, params_of, tiny_config
  config = tiny_config(figure_examples=2)   # 6 steps; checkpoints at 2, 4, 6; eval at 3, 6
  run = f"gs://{BUCKET}/run"

  def stop_at_5(step, state):
    if step == 5:
      raise Stop

  with pytest.raises(Stop):
    loop.train_and_evaluate(config, tasks.build_task(config), run, hooks=[stop_at_5])
  root = epath.Path(run)
  assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["2", "4"]
  resumed = loop.train_and_evaluate(config, tasks.build_task(config), run)
  assert resumed["resumed_from_step"] == 4

  # Every output, read back from the bucket.
  assert {p.name for p in root.iterdir()} == {"config.json", "metrics.jsonl", "results.json",
                                              "transformers.png", "tensorboard", "checkpoints"}
  assert json.loads((root / "config.json").read_text()) == workdir.config_to_dict(config)
  stored = json.loads((root / "results.json").read_text())
  assert stored == {k: resumed[k] for k in stored} and stored["resumed_from_step"] == 4
  records = workdir.read_metrics(run)
  assert [(r["step"], r["split"]) for r in records] == [
      (2, "train"), (3, "test"), (4, "train"), (6, "train"), (6, "test")]
  assert records[-1]["error"] == pytest.approx(stored["test_error"], abs=1e-3)
  assert (root / "transformers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  events = [e for f in (root / "tensorboard").iterdir() for e in read_events(f.read_bytes())]
  losses = {step: value for tag, step, value in events if tag == "train/loss"}
  assert sorted(losses) == [2, 4, 6]   # both runs' event files; the resumed one purges after 4
  assert losses[6] == pytest.approx(records[3]["loss"])
  task = tasks.build_task(config)
  _, template = steps.create_train_state(task.make_model(nnx.Rngs(0)),
                                         optim.make_schedule_and_optimizer(config)[1])
  store = checkpoints.Checkpoints(run)
  state, step = store.restore_newest_intact(template)   # verified against its manifest
  store.close()
  assert step == 6 and sorted(p.name for p in (root / "checkpoints").iterdir()) == ["4", "6"]
  assert_same_params(jax.tree.leaves(state.params), params_of(resumed))


def test_a_gs_work_directory_has_one_writer(gcs):
  from stn_jax import workdir
  run = f"gs://{BUCKET}/locked"
  first = workdir.WorkdirLock(run)
  first.acquire()
  try:
    with pytest.raises(workdir.WorkdirLockedError, match=rf"gs://{BUCKET}/locked is in use by "
                       rf"another run \(process {os.getpid()} on host"):
      workdir.WorkdirLock(run).acquire()
  finally:
    first.release()
  assert not workdir.resolve(run).joinpath(workdir.LOCK_NAME).exists()
  second = workdir.WorkdirLock(run)
  second.acquire()
  second.release()


def test_two_processes_share_one_gs_work_directory_and_resume_exactly(gcs, tmp_path):
  """jax.distributed on loopback: checkpoints saved and restored by both processes together,
  the other files written once (process 0), a stopped and resumed run equal to an
  uninterrupted one."""
  from etils import epath
  from stn_jax import loop, tasks, workdir
  from tests.conftest import params_of, tiny_config
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  run = f"gs://{BUCKET}/two_hosts"
  code = textwrap.dedent(f"""
      import sys, jax, numpy as np, pytest
      pid = int(sys.argv[1])
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      jax.distributed.initialize("127.0.0.1:{port}", num_processes=2, process_id=pid)
      from stn_jax import loop, tasks
      from tests.conftest import tiny_config
      config = tiny_config(steps=4, eval_every=4)   # checkpoints at 2 and 4

      class Stop(Exception):
        pass

      def stop_at_3(step, state):
        if step == 3:
          raise Stop

      with pytest.raises(Stop):
        loop.train_and_evaluate(config, tasks.build_task(config), {run!r}, hooks=[stop_at_3])
      results = loop.train_and_evaluate(config, tasks.build_task(config), {run!r})
      assert results["resumed_from_step"] == 2, results["resumed_from_step"]
      np.savez({str(tmp_path)!r} + f"/params{{pid}}.npz",
               *[np.asarray(x) for x in jax.tree.leaves(results["state"].params)])
      print("devices", jax.device_count())
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=400) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    assert out.strip().endswith("devices 4"), out
  a, b = np.load(tmp_path / "params0.npz"), np.load(tmp_path / "params1.npz")
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k])
  # One set of files, written once: no duplicate records, no lock left.
  root = epath.Path(run)
  assert {p.name for p in root.iterdir()} == {"config.json", "metrics.jsonl", "results.json",
                                              "tensorboard", "checkpoints"}
  logged = [(r["step"], r["split"]) for r in workdir.read_metrics(run)]
  assert logged == [(2, "train"), (4, "train"), (4, "test")]
  assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["2", "4"]
  # Equal to an uninterrupted run of the same global batch on one process.
  config = tiny_config(steps=4, eval_every=4)
  single = loop.train_and_evaluate(config, tasks.build_task(config), str(tmp_path / "one"))
  for k, leaf in zip(a.files, params_of(single)):
    np.testing.assert_allclose(a[k], np.asarray(leaf), atol=2e-5, rtol=1e-4)


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
      "--config=distorted_mnist:st_cnn_affine_rts",
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
