"""What a careless or unlucky user does to a run: corrupt checkpoints, NaN localisation nets,
bad configurations, two runs on one work directory, reruns of finished runs, SIGTERM."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from stn_jax import checkpoints, guards, loop, steps, tasks, workdir
from tests.conftest import assert_same_params, params_of, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- Checkpoint integrity -----------------------------------------------------------------


def small_state(step: int):
  """A real TrainState (the FCN of distorted MNIST) at ``step``, parameters shifted by ``step``."""
  model = tasks.models.DistortedMnistModel((28, 28), backbone="fcn", rngs=nnx.Rngs(0))
  _, state = steps.create_train_state(model, optax.sgd(0.1, momentum=0.9))
  return state._replace(step=jnp.asarray(step, jnp.int32),
                        params=jax.tree.map(lambda p: p + step, state.params))


@pytest.fixture(scope="module")
def saved_once(tmp_path_factory):
  """A work directory with verified checkpoints of steps 2 and 4 (saved once per module)."""
  root = tmp_path_factory.mktemp("saved")
  store = checkpoints.Checkpoints(str(root), keep=5)
  for step in (2, 4):
    store.save(small_state(step))
  store.close()
  return root


@pytest.fixture
def saved(saved_once, tmp_path):
  """A fresh copy of ``saved_once``'s checkpoints in ``tmp_path``; returns their directory."""
  shutil.copytree(saved_once / "checkpoints", tmp_path / "checkpoints")
  return tmp_path / "checkpoints"


def data_files(step_dir):
  """The array data files of an orbax step, largest first."""
  found = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs
           if os.path.basename(d) == "d"]
  return sorted(found, key=os.path.getsize, reverse=True)


def flip_bit(step_dir):
  path = data_files(step_dir)[0]
  raw = bytearray(open(path, "rb").read())
  raw[len(raw) // 2] ^= 0x10
  open(path, "wb").write(bytes(raw))


def truncate(step_dir):
  path = data_files(step_dir)[0]
  os.truncate(path, os.path.getsize(path) // 2)


def drop_metadata(step_dir):
  os.remove(os.path.join(step_dir, "_CHECKPOINT_METADATA"))
  os.remove(os.path.join(step_dir, "default", "_METADATA"))


def drop_manifest(step_dir):
  os.remove(os.path.join(step_dir, checkpoints.MANIFEST))


def wrong_checksum(step_dir):
  """A silent change: the manifest no longer matches one array (as after a flipped bit)."""
  path = os.path.join(step_dir, checkpoints.MANIFEST)
  manifest = json.load(open(path))
  key = sorted(manifest["arrays"])[0]
  manifest["arrays"][key] = "0" * 64
  json.dump(manifest, open(path, "w"))


@pytest.mark.parametrize("damage,reason", [
    (flip_bit, r"1 array\(s\) differ from their SHA-256 recorded at save time "
               r"\(params\.classifier"),
    (truncate, r"orbax could not read it"),
    (drop_metadata, r"orbax could not read it"),
    (drop_manifest, r"it has no integrity manifest"),
    (wrong_checksum, r"1 array\(s\) differ from their SHA-256 recorded at save time \(opt_state"),
])
def test_a_damaged_newest_step_falls_back_to_the_newest_intact_one(tmp_path, saved, damage,
                                                                   reason):
  directory = saved
  damage(str(directory / "4"))
  store = checkpoints.Checkpoints(str(tmp_path), keep=5)
  with pytest.warns(RuntimeWarning, match=r"step 4: " + reason + r".*Resuming from step 2"):
    state, step = store.restore_newest_intact(small_state(0))
  assert step == 2 and int(state.step) == 2
  assert_same_params(jax.tree.leaves(state.params), jax.tree.leaves(small_state(2).params))
  assert sorted(os.listdir(directory)) == ["2"]   # the damaged step is gone; it is rewritten
  store.close()


def test_an_empty_step_directory_is_skipped_with_a_clear_reason(tmp_path, saved):
  directory = saved
  os.makedirs(directory / "6")
  store = checkpoints.Checkpoints(str(tmp_path), keep=5)
  with pytest.warns(RuntimeWarning, match=r"step 6: it has no integrity manifest"):
    _, step = store.restore_newest_intact(small_state(0))
  assert step == 4
  store.close()


def test_when_every_step_is_damaged_the_error_names_each_and_nothing_changes(tmp_path, saved):
  directory = saved
  truncate(str(directory / "4"))
  drop_manifest(str(directory / "2"))
  store = checkpoints.Checkpoints(str(tmp_path), keep=5)
  with pytest.raises(checkpoints.CheckpointError) as info:
    store.restore_newest_intact(small_state(0))
  message = str(info.value)
  assert "step 4: orbax could not read it" in message
  assert "step 2: it has no integrity manifest" in message
  assert "nothing was changed" in message
  assert sorted(os.listdir(directory)) == ["2", "4"]
  store.close()


# --- Non-finite parameters and transforms -------------------------------------------------


def test_a_localisation_net_that_overflows_is_caught_in_the_step(tmp_path):
  """Images of 3e38 overflow the localisation net: its transform is NaN, the warped images are
  blank and the loss stays finite; the step's flags catch it."""
  config = tiny_config("st_fcn_affine_r", eval_every=100)
  task = tasks.build_task(config)
  clean = task.train_batches

  def poisoned(start_step):
    for step, (x, y) in enumerate(clean(start_step), start_step):
      yield (np.full_like(np.asarray(x, np.float32), 3e38) if step == 3 else x), y

  task.train_batches = poisoned
  with pytest.raises(guards.NonFiniteError,
                     match=r"non-finite values appeared in .*transform parameters of "
                           r"st\.localisation at step 3; stopping; the last good checkpoint "
                           r"\(step 2\) is kept in .* \(its arrays verified just now"):
    loop.train_and_evaluate(config, task, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_nan_parameters_are_named(tmp_path):
  config = tiny_config("st_fcn_affine_r")
  task = tasks.build_task(config)
  make = task.make_model

  def nan_bias(rngs):
    model = make(rngs)
    bias = model.st.localisation.regression.bias
    bias.value = bias.value.at[0].set(jnp.nan)
    return model

  task.make_model = nan_bias
  with pytest.raises(guards.NonFiniteError,
                     match=r"parameter st\.localisation\.regression\.bias.*at step 0; stopping; "
                           r"no checkpoint had been written yet"):
    loop.train_and_evaluate(config, task, str(tmp_path))


@pytest.mark.parametrize("bad,expected", [
    (None, 1.0), (jnp.nan, 0.0), (jnp.inf, 0.0), (-jnp.inf, 0.0)])
def test_one_parameters_flag_covers_every_array_without_overflowing(bad, expected):
  huge = {"a": jnp.full((3, 3), 3e38, jnp.float32), "b": {"c": -jnp.full((4,), 3e38)},
          "empty": jnp.zeros((0,))}      # A sum of these would overflow to inf.
  if bad is not None:
    huge["b"]["c"] = huge["b"]["c"].at[2].set(bad)
  flag = jax.jit(guards.parameters_flag)(huge)
  assert list(flag) == ["parameters"] and float(flag["parameters"]) == expected
  assert guards.non_finite_parameters(huge) == ([] if bad is None else ["parameter b.c"])


def test_the_parameters_flag_is_resolved_to_array_names_only_when_asked():
  metrics = {"loss": 0.5, "finite": {"parameters": 0.0, "transform parameters of st": 1.0}}
  asked = []
  locate = lambda: asked.append(1) or ["parameter head.kernel", "parameter st.bias"]
  with pytest.raises(guards.NonFiniteError, match=r"appeared in parameter head\.kernel, "
                                                  r"parameter st\.bias at step 7; stopping; kept"):
    guards.check_finite(metrics, 7, lambda: "kept", locate)
  with pytest.raises(guards.NonFiniteError, match=r"appeared in parameters at step 7"):
    guards.check_finite(metrics, 7, lambda: "kept")
  metrics["finite"]["parameters"] = 1.0
  guards.check_finite(metrics, 7, lambda: "kept", locate)
  assert asked == [1]


# --- Validation before anything is written ------------------------------------------------


@pytest.mark.parametrize("overrides,message", [
    (dict(steps=0), r"config\.steps must be a positive integer; got 0"),
    (dict(batch_size=0), r"config\.batch_size must be a positive integer; got 0"),
    (dict(eval_batch_size=-4), r"config\.eval_batch_size must be a positive integer"),
    (dict(checkpoint_every=0), r"config\.checkpoint_every must be a positive integer"),
    ({"optimizer.learning_rate": float("nan")}, r"learning_rate must be a finite number"),
    ({"optimizer.name": "rmsprop"}, r"unknown optimizer 'rmsprop'"),
    ({"optimizer.schedule": "step", "optimizer.decay_every": 0,
      "optimizer.decay_fraction": 0.0}, r"schedule 'step' needs decay_every > 0"),
])
def test_invalid_configs_are_refused_before_anything_is_written(tmp_path, overrides, message):
  config = tiny_config(**overrides)
  with pytest.raises(ValueError, match=message):
    loop.train_and_evaluate(config, task=None, workdir=str(tmp_path / "run"))  # task: unused
  assert not (tmp_path / "run").exists()


def test_eval_batch_must_divide_by_the_devices():
  with pytest.raises(ValueError, match=r"config\.eval_batch_size 12 must divide by the 8 devices"):
    guards.validate_config(tiny_config(batch_size=16, eval_batch_size=12), num_devices=8)


# --- One writer per work directory --------------------------------------------------------


HOLD = """
import sys, time
from stn_jax import workdir
lock = workdir.WorkdirLock(sys.argv[1], heartbeat_s=0.5)
lock.acquire()
print("held", flush=True)
time.sleep(120)
"""


def test_a_second_run_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    config = tiny_config(steps=2)
    with pytest.raises(workdir.WorkdirLockedError,
                       match=rf"in use by another run \(process {holder.pid} on host"):
      loop.train_and_evaluate(config, tasks.build_task(config), str(tmp_path))
    assert os.listdir(tmp_path) == [workdir.LOCK_NAME]   # nothing else was written
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # kill -9 left the lock file behind; its process is gone, so the next run takes it over.
  assert json.load(open(tmp_path / workdir.LOCK_NAME))["pid"] == holder.pid
  lock = workdir.acquire_lock(str(tmp_path))
  assert json.load(open(tmp_path / workdir.LOCK_NAME))["pid"] == os.getpid()
  lock.release()
  assert not (tmp_path / workdir.LOCK_NAME).exists()


def test_a_lock_without_heartbeat_from_another_host_is_stale(tmp_path):
  path = workdir.resolve(str(tmp_path)) / workdir.LOCK_NAME
  workdir.write_text(path, json.dumps({"host": "elsewhere", "pid": 1, "token": "x",
                                       "started": 0, "heartbeat": time.time() - 30}))
  with pytest.raises(workdir.WorkdirLockedError, match=r"host 'elsewhere'.*heartbeat 30 s ago"):
    workdir.WorkdirLock(str(tmp_path), stale_s=600).acquire()
  lock = workdir.WorkdirLock(str(tmp_path), stale_s=10)
  lock.acquire()
  assert json.loads(path.read_text())["token"] == lock.token
  lock.release()
  assert not path.exists()


# --- Reruns, signals, sampler -------------------------------------------------------------


def snapshot(directory):
  return {os.path.relpath(os.path.join(d, f), directory):
          (os.path.getmtime(os.path.join(d, f)), open(os.path.join(d, f), "rb").read())
          for d, _, fs in os.walk(directory) for f in fs}


def test_rerunning_a_finished_run_reports_the_stored_result_and_changes_nothing(tmp_path):
  # A refused command first: it leaves nothing behind, so the corrected one runs here.
  with pytest.raises(ValueError, match="config.eval_every must be a positive integer"):
    loop.train_and_evaluate(tiny_config(steps=2, eval_every=0), None, str(tmp_path))
  config = tiny_config(steps=2)
  first = loop.train_and_evaluate(config, tasks.build_task(config), str(tmp_path))
  before = snapshot(tmp_path)
  again = loop.train_and_evaluate(config, tasks.build_task(config), str(tmp_path))
  assert snapshot(tmp_path) == before
  stored = json.load(open(tmp_path / "results.json"))
  assert {k: again[k] for k in stored} == stored
  assert_same_params(params_of(first), params_of(again))


def test_init_from_starts_at_step_zero_from_another_runs_model(tmp_path):
  source = loop.train_and_evaluate(tiny_config(steps=4), tasks.build_task(tiny_config()),
                                   str(tmp_path / "source"))
  fresh = tiny_config(steps=2, init_from=str(tmp_path / "source"))
  # Zero learning rate: the new run's model is exactly the source's, the step starts at 0.
  fresh.optimizer.learning_rate = 0.0
  started = loop.train_and_evaluate(fresh, tasks.build_task(fresh), str(tmp_path / "fresh"))
  assert int(started["state"].step) == 2
  assert_same_params(params_of(source), params_of(started))
  scratch = tiny_config(steps=2)
  scratch.optimizer.learning_rate = 0.0
  unstarted = loop.train_and_evaluate(scratch, tasks.build_task(scratch), str(tmp_path / "s"))
  assert not all(np.array_equal(a, b) for a, b in zip(params_of(source), params_of(unstarted)))
  # A stored config from before the field existed still matches a run that leaves it empty.
  stored = workdir.config_to_dict(scratch)
  del stored["init_from"]
  assert workdir.config_differences(stored, workdir.config_to_dict(scratch)) == []
  assert workdir.config_differences(stored, workdir.config_to_dict(fresh)) == ["init_from"]


@pytest.mark.parametrize("case, message", [
    ("missing", "holds no checkpoints directory"),
    ("itself", "this run's own work directory"),
    ("other_model", "does not fit this run's model"),
])
def test_init_from_refuses_what_it_cannot_start_from(tmp_path, case, message):
  other = tmp_path / "other"
  if case == "other_model":
    config = tiny_config("st_fcn_tps_r", steps=2)
    loop.train_and_evaluate(config, tasks.build_task(config), str(other))
  source = {"missing": tmp_path / "nothing", "itself": tmp_path / "run", "other_model": other}
  config = tiny_config(steps=2, init_from=str(source[case]))
  if case == "itself":
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  with pytest.raises(ValueError, match=message):
    loop.train_and_evaluate(config, tasks.build_task(config), str(tmp_path / "run"))


def test_sigterm_stops_with_a_checkpoint_and_the_resumed_run_is_exact(tmp_path):
  """Preemption: SIGTERM mid-run checkpoints the step it stopped at; resuming continues exactly.
  The checkpoint records the sampler; resuming under another one warns."""
  config = tiny_config(steps=4, checkpoint_every=100, eval_every=100)
  whole = loop.train_and_evaluate(config, tasks.build_task(config), str(tmp_path / "whole"))

  def preempt_at_3(step, state):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  with pytest.raises(guards.RunInterrupted,
                     match=r"SIGTERM after step 3; its checkpoint at step 3"):
    loop.train_and_evaluate(config, tasks.build_task(config), str(tmp_path / "cut"),
                            hooks=[preempt_at_3])
  assert sorted(os.listdir(tmp_path / "cut" / "checkpoints")) == ["3"]
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL   # the handler is put back
  manifest_path = tmp_path / "cut" / "checkpoints" / "3" / checkpoints.MANIFEST
  manifest = json.load(open(manifest_path))
  assert manifest["sampler"] == guards.sampler_fingerprint()
  manifest["sampler"] = "tpu:matmul"   # as if the run had started on a TPU
  json.dump(manifest, open(manifest_path, "w"))
  with pytest.warns(RuntimeWarning, match=r"step 3 was computed with the sampler 'tpu:matmul'"):
    resumed = loop.train_and_evaluate(config, tasks.build_task(config), str(tmp_path / "cut"))
  assert resumed["resumed_from_step"] == 3 and resumed["sampler"] == guards.sampler_fingerprint()
  assert_same_params(params_of(whole), params_of(resumed))
