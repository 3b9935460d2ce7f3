"""The training loop: data-parallel steps, evaluation, checkpoints, metrics, figure.

:func:`train_and_evaluate` runs unchanged on one CPU, several GPUs and
multi-host TPU slices: the steps of :mod:`stn_jax.steps` run under
``jax.pmap`` over the local devices, each process feeds its own devices with
its own shard of every global batch (``Task.train_batches`` yields that
shard), and gradients are averaged over all devices of all processes.

Work directory layout::

  config.json          the run's configuration (a resumed run must match it)
  checkpoints/<step>/  orbax checkpoints (periodic and final)
  metrics.jsonl        one JSON object per log or evaluation
  tensorboard/         TensorBoard summaries (process 0)
  results.json         final test error, steps, wall time, devices, config
  transformers.png     test inputs, their sampling grids and transformer outputs

Resuming: a run restarts from the newest checkpoint in its work directory.
The data stream and every random key are pure functions of ``(seed, step)``,
so a killed and resumed run ends with the same parameters as an
uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stn_jax import checkpoints as checkpoints_lib
from stn_jax import optim, steps
from stn_jax import workdir as workdir_files


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or infinite."""


@dataclasses.dataclass
class Task:
  """What the loop trains and on what (built from a config by :mod:`stn_jax.tasks`).

  Attributes:
    make_model: ``rngs -> nnx.Module``; called once with ``nnx.Rngs(params=seed, dropout=seed)``.
    train_batches: ``start_step -> iterator`` of this process's shard
      ``(images, labels)`` of each global training batch, from ``start_step``
      on; it must be a pure function of the step (for exact resumption).
    test_set: ``() -> (images [N, ...], labels)`` the whole test set (labels may be a pytree).
    terms: per-example loss terms (:func:`stn_jax.steps.classification_terms`).
    views: ``(model, images) -> (outputs, grids, titles)`` for the figure,
      or ``None`` for models without a spatial transformer.
  """
  make_model: Callable[[nnx.Rngs], nnx.Module]
  train_batches: Callable[[int], Iterator[tuple[Any, Any]]]
  test_set: Callable[[], tuple[np.ndarray, Any]]
  terms: steps.Terms = steps.classification_terms
  views: Optional[Callable[[nnx.Module, jax.Array], tuple]] = None



class _Progress:
  """A tqdm bar on a terminal (process 0), plain log lines otherwise."""

  def __init__(self, total: int, initial: int, enabled: bool, bar: bool):
    self.enabled = enabled
    self.bar = None
    if enabled and bar and sys.stderr.isatty():
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

  def update(self, n: int = 1, **postfix) -> None:
    if self.bar is not None:
      self.bar.update(n)
      if postfix:
        self.bar.set_postfix(postfix, refresh=False)

  def log(self, line: str) -> None:
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.write(line)
    else:
      print(line, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


# --- The loop -----------------------------------------------------------------------------

def evaluate(eval_step, state, images, labels, *, batch_size: int) -> dict:
  """Loss, accuracy and error (%) over a whole set, each example counted once.

  ``batch_size`` is the global evaluation batch; each process evaluates its
  contiguous shard of the (padded) set.
  """
  count = jax.process_count()
  if batch_size % (count * jax.local_device_count()):
    raise ValueError(f"eval_batch_size {batch_size} must divide by the "
                     f"{count * jax.local_device_count()} devices.")
  local = batch_size // count
  totals = {"loss": 0.0, "correct": 0.0, "count": 0.0}
  for x, y, mask in steps.padded_batches(images, labels, local,
                                            shard=(jax.process_index(), count)):
    sums = eval_step(state, *steps.shard_batch((x, y, mask)))
    for k, value in jax.device_get(steps.unreplicate(sums)).items():
      totals[k] += float(value)
  n = totals["count"]
  return {"loss": totals["loss"] / n, "accuracy": totals["correct"] / n,
          "error": 100.0 * (1.0 - totals["correct"] / n), "count": n}


def describe_machine() -> str:
  """E.g. ``'2-core CPU (Intel Xeon ...)'`` or ``'1 x NVIDIA H100'``: where a result was measured."""
  if jax.default_backend() != "cpu":
    return f"{jax.device_count()} x {jax.devices()[0].device_kind}"
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return f"{os.cpu_count()}-core CPU ({model})"


def _check_finite(metrics: dict, step: int, checkpoints: checkpoints_lib.Checkpoints) -> None:
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    last = checkpoints.latest_step()
    kept = (f"the last good checkpoint (step {last}) is kept in {checkpoints.directory}"
            if last is not None else "no checkpoint had been written yet")
    raise NonFiniteLossError(f"the training loss became {loss} at step {step}; stopping; {kept}.")


def train_and_evaluate(config, task: Task, workdir: str, *,
                       hooks: Sequence[Callable[[int, steps.TrainState], None]] = ()) -> dict:
  """Trains ``task`` as ``config`` says, resuming from ``workdir``'s newest checkpoint.

  ``config`` (an ``ml_collections.ConfigDict``) needs ``seed``, ``steps``,
  ``batch_size`` (global), ``optimizer`` (see :func:`stn_jax.optim.make_schedule_and_optimizer`),
  ``eval_every``, ``eval_batch_size``, ``log_every``, ``checkpoint_every``
  and may have ``keep_checkpoints``, ``progress``, ``figure_examples``.
  ``hooks`` are called as ``hook(step, state)`` after every step (tests use
  one to simulate a kill). Returns the results written to ``results.json``.
  """
  started = time.time()
  primary = jax.process_index() == 0
  config_dict = workdir_files.config_to_dict(config)
  workdir_files.check_config_matches(workdir, config_dict)
  os.makedirs(workdir, exist_ok=True)
  if primary:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config_dict, f, indent=2, sort_keys=True)

  num_local = jax.local_device_count()
  global_batch = config.batch_size
  if global_batch % jax.device_count():
    raise ValueError(f"batch_size {global_batch} must divide by the {jax.device_count()} devices "
                     f"({jax.process_count()} processes x {num_local} local devices).")

  seed = config.seed
  model = task.make_model(nnx.Rngs(params=seed, dropout=seed))
  schedule, optimizer = optim.make_schedule_and_optimizer(config)
  graphdef, state = steps.create_train_state(model, optimizer)
  eval_graph = steps.eval_graphdef(model)

  checkpoints = checkpoints_lib.Checkpoints(workdir, keep=config.get("keep_checkpoints", 2))
  start_step = checkpoints.latest_step() or 0
  if start_step:
    state = checkpoints.restore(state, start_step)
  writer = workdir_files.MetricWriter(workdir, enabled=primary, resume_step=start_step)
  progress = _Progress(config.steps, start_step, primary, config.get("progress", True))
  progress.log(f"{'resuming at' if start_step else 'starting at'} step {start_step} of "
               f"{config.steps}; {jax.process_count()} process(es) x {num_local} "
               f"{jax.devices()[0].device_kind} device(s); global batch {global_batch}; "
               f"{sum(x.size for x in jax.tree.leaves(state.params)):,} parameters")

  train_step = steps.pmap_train_step(graphdef, optimizer, terms=task.terms)
  eval_step = steps.pmap_eval_step(eval_graph, terms=task.terms)
  rng = jax.random.key(seed)
  test_images, test_labels = task.test_set()

  def run_eval(replicated, step):
    t0 = time.time()
    result = evaluate(eval_step, replicated, test_images, test_labels,
                      batch_size=config.eval_batch_size)
    writer.write(step, "test", {k: result[k] for k in ("loss", "accuracy", "error")})
    progress.log(f"step {step}: test error {result['error']:.2f}% "
                 f"(loss {result['loss']:.4f}, {int(result['count'])} examples, "
                 f"{time.time() - t0:.1f} s)")
    return result

  replicated = steps.replicate(state, num_local)
  del state
  batches = task.train_batches(start_step)
  pending = None            # (step, metrics) of the last dispatched step, not yet checked.
  window = {"start": start_step, "t": time.time(), "excluded_s": 0.0}
  result = None
  train_seconds = 0.0
  try:
    for step in range(start_step, config.steps):
      images, labels = next(batches)
      x, y = steps.shard_batch((images, labels), num_local)
      replicated, metrics = train_step(replicated, x, y, rng)
      if pending is not None:        # Check the previous step while this one runs.
        _check_finite(jax.device_get(steps.unreplicate(pending[1])), pending[0], checkpoints)
      pending = (step, metrics)
      done = step + 1
      for hook in hooks:
        hook(done, replicated)
      host = None
      is_last = done == config.steps
      if done % config.log_every == 0 or is_last or done % config.checkpoint_every == 0:
        host = jax.device_get(steps.unreplicate(metrics))
        _check_finite(host, step, checkpoints)
        pending = None
      progress.update(1)
      if done % config.log_every == 0 or is_last:
        elapsed = time.time() - window["t"] - window["excluded_s"]
        steps_in_window = done - window["start"]
        train_seconds += elapsed
        values = {"loss": float(host["loss"]), "accuracy": float(host["accuracy"]),
                  "grad_norm": float(host["grad_norm"]), "learning_rate": float(schedule(step)),
                  "images_per_second": steps_in_window * global_batch / max(elapsed, 1e-9)}
        writer.write(done, "train", values)
        progress.log(f"step {done}: loss {values['loss']:.4f} acc {values['accuracy']:.3f} "
                     f"lr {values['learning_rate']:.2g} "
                     f"{values['images_per_second']:.0f} img/s")
        window = {"start": done, "t": time.time(), "excluded_s": 0.0}
      if done % config.eval_every == 0 or is_last:
        t0 = time.time()
        result = run_eval(replicated, done)
        window["excluded_s"] += time.time() - t0
      if done % config.checkpoint_every == 0 or is_last:
        t0 = time.time()
        checkpoints.save(steps.unreplicate(replicated))
        window["excluded_s"] += time.time() - t0
    if result is None:   # Resumed a finished run: evaluate its final state.
      result = run_eval(replicated, config.steps)
  finally:
    progress.close()
    writer.close()
    checkpoints.close()

  final = jax.device_get(steps.unreplicate(replicated))
  results = {
      "test_error": round(result["error"], 4), "test_loss": round(result["loss"], 6),
      "test_examples": int(result["count"]), "steps": config.steps,
      "global_batch": global_batch, "resumed_from_step": start_step,
      "train_seconds_this_run": round(train_seconds, 1),
      "wall_seconds_this_run": round(time.time() - started, 1),
      "device_kind": jax.devices()[0].device_kind, "platform": jax.default_backend(),
      "machine": describe_machine(),
      "num_devices": jax.device_count(), "process_count": jax.process_count(),
      "jax_version": jax.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "config": config_dict,
  }
  if primary:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=2)
    if task.views is not None and config.get("figure_examples", 0):
      _write_figure(task, eval_graph, final, test_images, config, workdir)
      progress.log(f"wrote {os.path.join(workdir, 'transformers.png')}")
  progress.log(f"done: test error {results['test_error']:.2f}% after {config.steps} steps; "
               f"results in {os.path.join(workdir, 'results.json')}")
  results["state"] = final
  return results


def _write_figure(task, eval_graph, state, images, config, workdir) -> None:
  from stn_jax import plotting
  model = nnx.merge(eval_graph, state.params, state.rest)
  n = config.figure_examples
  x = jnp.asarray(images[:n], jnp.float32)
  outputs, grids, titles = task.views(model, x)
  plotting.save_transformer_figure(
      os.path.join(workdir, "transformers.png"), np.asarray(x),
      [np.asarray(o) for o in outputs], [None if g is None else np.asarray(g) for g in grids],
      titles=titles, suptitle=config.get("name", ""))
