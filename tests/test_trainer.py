"""Tests of the training loop, configs and CLI (on the offline synthetic digits)."""

import json
import os
import socket
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

from stn_jax import (checkpoints, configs, datasets, loop, objectives, optim, runs, steps, tasks,
                     workdir)
from tests.conftest import assert_same_params, params_of, tiny_config
from tests.multidevice import run_with_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- The loop -----------------------------------------------------------------------------


def test_loss_falls_and_outputs_are_written(tmp_path):
  config = tiny_config(steps=60, log_every=20, eval_every=60, checkpoint_every=60,
                       batch_size=32, figure_examples=4, **{"optimizer.name": "adam",
                                                            "optimizer.learning_rate": 3e-3,
                                             "optimizer.schedule": "constant"})
  config.variant = "translated"  # 60x60, where the ST has work to do
  task, seen = tasks.build_task(config), []
  results = loop.train_and_evaluate(config, task, str(tmp_path), callbacks=[seen.append])
  records = workdir.read_metrics(str(tmp_path))
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == [20, 40, 60]
  assert train[-1]["loss"] < 0.6 * train[0]["loss"]
  assert all(r["images_per_second"] > 0 and r["learning_rate"] == pytest.approx(3e-3)
             for r in train)
  stored = json.load(open(tmp_path / "results.json"))
  assert stored["test_examples"] == 128 and stored["steps"] == 60
  assert stored["test_error"] == pytest.approx(results["test_error"])
  assert stored["test_error"] < 60  # chance is 90%
  assert stored["config"]["variant"] == "translated" and stored["device_kind"]
  assert (tmp_path / "transformers.png").stat().st_size > 5000
  assert os.listdir(tmp_path / "tensorboard")
  # The callbacks saw each record as metrics.jsonl holds it.
  assert [(r["step"], r["split"], r["loss"]) for r in seen] == [
      (r["step"], r["split"], r["loss"]) for r in records]
  assert results["headline"] == "error"
  assert results["test_accuracy"] == pytest.approx(1 - results["test_error"] / 100, abs=1e-5)
  # The returned model, and the one restored from the work directory, are the trained one.
  images, labels = task.test_set()
  x = jnp.asarray(images[:8])
  restored = runs.restore_model(str(tmp_path), task=task)
  np.testing.assert_array_equal(np.asarray(results["model"](x)), np.asarray(restored(x)))
  assert runs.load_config(str(tmp_path)).variant == "translated"
  from matplotlib.figure import Figure
  figure = loop.transformer_figure(task, restored, images[:2], labels[:2])
  assert isinstance(figure, Figure)
  assert figure.axes[0].get_xlabel().startswith(f"true {labels[0]}, predicted ")


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
  config = tiny_config()
  whole = loop.train_and_evaluate(config, tasks.build_task(config), str(tmp_path / "whole"))

  class Killed(Exception):
    pass

  def kill_at_5(step, state):
    if step == 5:
      raise Killed

  with pytest.raises(Killed):
    loop.train_and_evaluate(config, tasks.build_task(config), str(tmp_path / "cut"),
                               hooks=[kill_at_5])
  assert sorted(os.listdir(tmp_path / "cut" / "checkpoints")) == ["2", "4"]
  resumed = loop.train_and_evaluate(config, tasks.build_task(config), str(tmp_path / "cut"))
  assert resumed["resumed_from_step"] == 4
  assert_same_params(params_of(whole), params_of(resumed))
  logged = [(r["step"], r["split"]) for r in workdir.read_metrics(str(tmp_path / "cut"))]
  assert len(logged) == len(set(logged))          # the killed run's extra lines are dropped
  assert logged == [(r["step"], r["split"]) for r in workdir.read_metrics(str(tmp_path / "whole"))]


def test_rerunning_a_finished_run_returns_its_stored_results(tmp_path):
  config = tiny_config(steps=2)
  first = loop.train_and_evaluate(config, tasks.build_task(config), str(tmp_path))
  again = loop.train_and_evaluate(config, tasks.build_task(config), str(tmp_path))
  assert again["resumed_from_step"] == 0   # the stored run's; tests/test_reliability.py has more
  assert again["test_error"] == first["test_error"]
  assert_same_params(params_of(first), params_of(again))


def test_a_different_config_in_the_workdir_is_refused(tmp_path):
  config = tiny_config(steps=2)
  loop.train_and_evaluate(config, tasks.build_task(config), str(tmp_path))
  before = {p: os.path.getmtime(os.path.join(tmp_path, p)) for p in os.listdir(tmp_path)}
  changed = tiny_config(steps=2, seed=1)
  with pytest.raises(workdir.ConfigMismatchError, match=r"seed: 0 in the work directory, 1 now"):
    loop.train_and_evaluate(changed, tasks.build_task(changed), str(tmp_path))
  assert before == {p: os.path.getmtime(os.path.join(tmp_path, p)) for p in os.listdir(tmp_path)}
  # Logging fields may change on resume.
  relaxed = tiny_config(steps=2, log_every=1, eval_every=1)
  loop.train_and_evaluate(relaxed, tasks.build_task(relaxed), str(tmp_path))


def test_continuing_a_run_with_more_steps(tmp_path):
  """More steps in the same work directory train on from the last checkpoint; fewer are refused."""
  short = tiny_config("fcn_r", steps=2)
  first = loop.train_and_evaluate(short, tasks.build_task(short), str(tmp_path))
  longer = tiny_config("fcn_r", steps=4)
  more = loop.train_and_evaluate(longer, tasks.build_task(longer), str(tmp_path))
  assert more["resumed_from_step"] == 2 and more["steps"] == 4
  assert int(more["state"].step) == 4 and int(first["state"].step) == 2
  assert json.load(open(tmp_path / "config.json"))["steps"] == 4
  assert [r["step"] for r in workdir.read_metrics(str(tmp_path)) if r["split"] == "train"] == [2, 4]
  with pytest.raises(ValueError, match="holds a checkpoint at step 4, beyond steps=3"):
    loop.train_and_evaluate(tiny_config("fcn_r", steps=3), tasks.build_task(short), str(tmp_path))
  with pytest.raises(workdir.ConfigMismatchError, match=r"(?s)seed: 0 in the work directory, 5 now"
                     r".*Use a new work directory \(--workdir, or the workdir argument in Python\)"):
    loop.train_and_evaluate(tiny_config("fcn_r", steps=6, seed=5), tasks.build_task(short),
                            str(tmp_path))


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
  config = tiny_config("fcn_r")
  task = tasks.build_task(config)
  clean = task.train_batches

  def poisoned(start_step):
    for step, (x, y) in enumerate(clean(start_step), start_step):
      yield (np.full_like(np.asarray(x), np.nan) if step == 3 else x), y

  task.train_batches = poisoned
  with pytest.raises(loop.NonFiniteLossError,
                     match=r"became nan at step 3; stopping; the last good checkpoint \(step 2\)"):
    loop.train_and_evaluate(config, task, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
  restored = checkpoints.Checkpoints(str(tmp_path)).restore(
      steps.create_train_state(task.make_model(nnx.Rngs(0)),
                                  optim.make_schedule_and_optimizer(config)[1])[1])
  assert int(restored.step) == 2
  assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(restored.params))


def test_batch_must_divide_by_the_devices(tmp_path):
  run_with_devices(f"""
      from stn_jax import loop, tasks
      from tests.conftest import tiny_config
      config = tiny_config(batch_size=12)
      try:
        loop.train_and_evaluate(config, tasks.build_task(config), {str(tmp_path)!r})
      except ValueError as e:
        assert "batch_size 12 must divide by the 8 devices" in str(e), e
        print("ok")
  """)


def test_a_task_defines_its_own_metrics(tmp_path):
  """A task's own Evaluation (here top-2 accuracy) reaches metrics and results; no loop change."""
  config = tiny_config("fcn_r", steps=2, eval_every=2)
  task = tasks.build_task(config)

  def top2(logits, labels):
    return jnp.any(jnp.argsort(logits, -1)[:, -2:] == labels[:, None], -1).astype(jnp.float32)

  task.evaluation = objectives.Evaluation(
      per_example=lambda logits, labels: {"top2": top2(logits, labels)},
      summarise=lambda sums, n: {"top2_accuracy": 100 * sums["top2"] / n}, headline="top2_accuracy")
  seen = []
  results = loop.train_and_evaluate(config, task, str(tmp_path), callbacks=[seen.append])
  assert results["headline"] == "top2_accuracy" and "test_error" not in results
  images, labels = task.test_set()
  expected = 100 * float(top2(results["model"](jnp.asarray(images)), labels).mean())
  assert results["test_top2_accuracy"] == pytest.approx(expected, rel=1e-5)
  assert [r for r in seen if r["split"] == "test"][-1]["top2_accuracy"] == pytest.approx(expected,
                                                                                           rel=1e-5)


def test_periodic_actions_and_the_stopwatch():
  due = loop.Periodic(every=3, last=7)
  assert [s for s in range(1, 8) if due(s)] == [3, 6, 7]
  clock = loop.Stopwatch()
  with clock.paused():
    time.sleep(0.05)
  assert clock.lap() < 0.04
  assert loop.rounded(0.123456789) == 0.123457 and loop.rounded(123456789.0) == 123457000.0


@pytest.mark.parametrize("make", ["addition", "sequences"])
def test_streams_do_not_depend_on_the_process_count(make):
  """The shards of two processes put together are the one-process batch (train and test)."""
  images, labels = datasets.synthetic_digits(64)
  if make == "addition":
    batch = lambda shard: tasks.addition_batch(images, labels, variant="RTS", batch=8, seed=3,  # noqa: E731
                                               step=5, shard=shard)
  else:
    batch = lambda shard: tasks.sequence_batch(images, labels, batch=8, max_digits=2,  # noqa: E731
                                               canvas=32, seed=3, step=5, shard=shard)
  whole = batch(slice(None))
  halves = [batch(datasets.shard_of_batch(8, i, 2)) for i in range(2)]
  joined = jax.tree.map(lambda a, b: np.concatenate([a, b]), *halves)
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(joined)):  # same keys; float rounding
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_config_registry():
  names = configs.names()
  assert "distorted_mnist:st_cnn_affine_rts" in names and len(names) == len(set(names))
  for name in names:
    assert configs.get_config(name).name == name.split(":")[1]
  old_form = configs.get_config("experiments/configs/cub.py:st4_448")
  assert old_form.num_transformers == 4 and old_form.image_size == 448
  with pytest.raises(ValueError, match="names no config; give '<family>:<name>', one of: cnn_224"):
    configs.get_config("cub")
  with pytest.raises(ValueError, match="unknown config family 'nope'"):
    configs.get_config("nope:x")
  # Settings are fields: no empty strings standing for None.
  assert configs.get_config("distorted_mnist:cnn_r").transform is None
  assert configs.get_config("sequences:cnn").st is None


# --- Evaluation ---------------------------------------------------------------------------


@pytest.mark.parametrize("n,batch,shards", [(10, 4, 1), (10, 4, 2), (7, 8, 3), (16, 4, 2)])
def test_padded_batches_count_each_example_once(n, batch, shards):
  images = np.arange(n, dtype=np.float32)[:, None]
  seen, batches = [], []
  for index in range(shards):
    parts = list(steps.padded_batches(images, images[:, 0], batch, shard=(index, shards)))
    batches.append(len(parts))
    for x, y, mask in parts:
      assert len(x) == batch and len(mask) == batch
      seen.extend(x[mask, 0].tolist())
  assert sorted(seen) == list(range(n))
  assert len(set(batches)) == 1


def test_evaluate_equals_a_direct_computation():
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 1, (37, 28, 28, 1)).astype(np.float32)
  labels = rng.integers(0, 10, 37)
  net = tasks.models.DistortedMnistModel((28, 28), backbone="fcn", rngs=nnx.Rngs(0))
  graphdef, state = steps.create_train_state(net, optax.sgd(0.1))
  result = loop.evaluate(steps.pmap_eval_step(graphdef), steps.replicate(state),
                            images, labels, batch_size=8)
  logits = net(jnp.asarray(images))
  loss, correct = objectives.classification_terms(logits, labels)
  assert result["count"] == 37
  assert result["loss"] == pytest.approx(float(loss.mean()), rel=1e-5)
  assert result["error"] == pytest.approx(100 * (1 - float(correct.mean())))


def test_sequence_terms():
  length_logits = jnp.asarray([[0.0, 5.0, 0.0], [0.0, 5.0, 0.0]])
  digit_logits = jnp.zeros((2, 1, 11)).at[:, 0, 3].set(5.0)
  loss, correct = objectives.sequence_terms((length_logits, digit_logits),
                                          (jnp.asarray([1, 1]), jnp.asarray([[3], [4]])))
  assert correct.tolist() == [1.0, 0.0]
  assert loss[1] > loss[0] > 0


# --- Optimisers and rngs ------------------------------------------------------------------


def test_step_schedule_and_localisation_scale():
  schedule = optim.learning_rate_schedule(0.01, schedule="step", decay_every=50,
                                             decay_factor=0.1)
  assert [float(schedule(s)) for s in (0, 49, 50, 100)] == pytest.approx([0.01, 0.01, 1e-3, 1e-4])
  net = tasks.models.DistortedMnistModel((28, 28), backbone="fcn", transform="affine",
                                         rngs=nnx.Rngs(0))
  params = nnx.state(net, nnx.Param)
  grads = jax.tree.map(jnp.ones_like, params)
  full = optim.make_optimizer("sgd", optax.constant_schedule(1.0), momentum=0.0)
  scaled = optim.make_optimizer("sgd", optax.constant_schedule(1.0), momentum=0.0,
                                   localisation_lr_scale=0.1)
  u_full, _ = full.update(grads, full.init(params), params)
  u_scaled, _ = scaled.update(grads, scaled.init(params), params)
  mask = jax.tree.leaves(optim.localisation_mask(params))
  assert any(mask) and not all(mask)
  for inside, a, b in zip(mask, jax.tree.leaves(u_full), jax.tree.leaves(u_scaled)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a) * (0.1 if inside else 1.0), rtol=1e-6)


@pytest.mark.parametrize("bad,match", [
    (dict(name="rmsprop"), "unknown optimizer 'rmsprop'; expected one of 'sgd', 'adam'"),
    (dict(schedule="linear"), "unknown schedule 'linear'"),
])
def test_bad_optimizer_settings(bad, match):
  config = tiny_config(**{f"optimizer.{k}": v for k, v in bad.items()})
  with pytest.raises(ValueError, match=match):
    optim.make_schedule_and_optimizer(config)


def test_dropout_masks_differ_per_device_and_step():
  run_with_devices("""
      import jax, numpy as np
      from stn_jax import steps
      keys = jax.pmap(lambda s: jax.random.key_data(steps.step_rng(jax.random.key(0), s,
                      steps.AXIS)), axis_name=steps.AXIS)(np.zeros(4, np.int32))
      assert len({tuple(k) for k in np.asarray(keys)}) == 4
      later = jax.pmap(lambda s: jax.random.key_data(steps.step_rng(jax.random.key(0), s,
                       steps.AXIS)), axis_name=steps.AXIS)(np.ones(4, np.int32))
      assert not np.array_equal(np.asarray(keys), np.asarray(later))
      print("ok")
  """, num_devices=4)


def test_dropout_model_trains_under_pmap(tmp_path):
  from stn_jax.configs import sequences
  config = sequences.get_config("st_cnn_single")
  config.update(dict(data="synthetic", synthetic_examples=256, steps=2, batch_size=8,
                     eval_batch_size=32, log_every=1, eval_every=2, checkpoint_every=2,
                     figure_examples=2, progress=False, canvas=32, max_digits=2))
  results = loop.train_and_evaluate(config, tasks.build_task(config), str(tmp_path))
  assert results["test_examples"] == 64 and 0 <= results["test_error"] <= 100
  assert (tmp_path / "transformers.png").exists()


# --- Multi-device and multi-host ----------------------------------------------------------


def test_two_processes_with_jax_distributed_end_identical(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  code = textwrap.dedent(f"""
      import sys, jax, numpy as np
      pid = int(sys.argv[1])
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      jax.distributed.initialize("127.0.0.1:{port}", num_processes=2, process_id=pid)
      from stn_jax import loop, tasks
      from tests.conftest import tiny_config
      config = tiny_config(steps=3, checkpoint_every=3, eval_every=3)
      results = loop.train_and_evaluate(config, tasks.build_task(config), {str(tmp_path / 'run')!r})
      leaves = [np.asarray(x) for x in jax.tree.leaves(results["state"].params)]
      np.savez({str(tmp_path)!r} + f"/params{{pid}}.npz", *leaves)
      print("error", results["test_error"], "devices", jax.device_count())
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=ROOT)
  procs = [subprocess.Popen([sys.executable, "-c", code, str(i)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=240) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    assert out.strip().endswith("devices 4"), out
  last = [out.strip().splitlines()[-1] for out, _ in outs]
  assert last[0] == last[1]   # the same test error
  a, b = np.load(tmp_path / "params0.npz"), np.load(tmp_path / "params1.npz")
  assert len(a.files) > 4
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k])
  # The same global batch on one process and one device gives the same parameters.
  config = tiny_config(steps=3, checkpoint_every=3, eval_every=3)
  single = loop.train_and_evaluate(config, tasks.build_task(config), str(tmp_path / "one"))
  for k, leaf in zip(a.files, params_of(single)):
    np.testing.assert_allclose(a[k], np.asarray(leaf), atol=2e-5, rtol=1e-4)


# --- Configs and CLI ----------------------------------------------------------------------


def cli(*args, timeout=240):
  return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_cli_trains_and_resumes(tmp_path):
  args = ["--config=experiments/configs/distorted_mnist.py:fcn_r", f"--workdir={tmp_path}",
          "--config.data=synthetic", "--config.synthetic_examples=256", "--config.steps=2",
          "--config.batch_size=16", "--config.eval_batch_size=64", "--config.log_every=1",
          "--config.figure_examples=0"]
  first = cli(*args)
  assert first.returncode == 0, first.stderr[-2000:]
  assert "done: test error" in first.stdout
  again = cli(*args)
  assert again.returncode == 0 and "holds this finished run" in again.stdout   # and changes nothing
  bad = cli(*args[:-1], "--config.seed=3")
  assert bad.returncode == 2 and "different configuration" in bad.stderr


def test_cli_rejects_unknown_names_and_fields(tmp_path):
  unknown = cli("--config=distorted_mnist:st_cnn_rts", f"--workdir={tmp_path}")
  assert unknown.returncode != 0
  assert "unknown distorted_mnist config 'st_cnn_rts'; choose one of: fcn_r" in unknown.stderr
  field = cli("--config=experiments/configs/distorted_mnist.py:cnn_r", f"--workdir={tmp_path}",
              "--config.stepz=3")
  assert field.returncode != 0 and "stepz" in field.stderr
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("family", ["distorted_mnist", "cluttered_mnist", "mnist_addition",
                                    "sequences", "svhn", "cub"])
def test_every_config_builds(family):
  import importlib
  module = importlib.import_module(f"stn_jax.configs.{family}")
  for name in module.NAMES:
    config = module.get_config(name)
    assert config.name == name and config.task in tasks.TASKS
    optim.make_schedule_and_optimizer(config)
  with pytest.raises(ValueError, match=f"unknown {family} config 'nope'"):
    module.get_config("nope")


@pytest.mark.parametrize("family,name,shape", [
    ("distorted_mnist", "st_cnn_tps_e", (8, 28, 28, 1)),
    ("distorted_mnist", "st_fcn_projective_rts", (8, 42, 42, 1)),
    ("cluttered_mnist", "st_cnn_attention_cluttered", (8, 60, 60, 1)),
    ("mnist_addition", "st_fcn_tps_2x", (8, 42, 42, 2)),
    ("mnist_addition", "st_fcn_affine", (8, 42, 42, 2)),
    ("mnist_addition", "cnn", (8, 42, 42, 2)),
    ("cluttered_mnist", "st_fcn_affine_cluttered", (8, 60, 60, 1)),
    ("sequences", "st_cnn_multi", (8, 64, 64, 1)),
])
def test_tasks_make_batches_the_model_reads(family, name, shape):
  import importlib
  config = importlib.import_module(f"stn_jax.configs.{family}").get_config(name)
  config.data, config.synthetic_examples, config.batch_size = "synthetic", 64, 8
  task = tasks.build_task(config)
  x, y = next(task.train_batches(0))
  assert np.shape(x) == shape
  model = task.make_model(nnx.Rngs(0))
  out = model(jnp.asarray(x))
  loss, correct = task.terms(out, jax.tree.map(jnp.asarray, y))
  assert loss.shape == (8,) and np.isfinite(np.asarray(loss)).all()
  x2, _ = next(task.train_batches(0))
  np.testing.assert_array_equal(np.asarray(x), np.asarray(x2))   # pure in the step


def test_missing_data_is_a_clear_error(tmp_path):
  from stn_jax.configs import svhn
  config = svhn.get_config("cnn")
  config.data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="svhn_cropped"):
    tasks.build_task(config)
