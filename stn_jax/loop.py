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

import contextlib
import dataclasses
import datetime
import json
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
from stn_jax import guards, objectives, optim, steps
from stn_jax import workdir as workdir_files


# The loss, a parameter or a transform became NaN or infinite (the name callers catch).
NonFiniteLossError = guards.NonFiniteError


@dataclasses.dataclass
class Task:
  """What the loop trains and on what (built from a config by :mod:`stn_jax.tasks`).

  Attributes:
    make_model: ``rngs -> nnx.Module``; called once with ``nnx.Rngs(params=seed, dropout=seed)``.
    train_batches: ``start_step -> iterator`` of this process's shard
      ``(images, labels)`` of each global training batch, from ``start_step``
      on; it must be a pure function of the step (for exact resumption).
    test_set: ``() -> (images [N, ...], labels)`` the whole test set (labels may be a pytree).
    terms: per-example training loss terms (:mod:`stn_jax.objectives`).
    views: ``(model, images) -> (outputs, grids, titles)`` for the figure,
      or ``None`` for models without a spatial transformer.
    evaluation: how the test set is scored (:class:`stn_jax.objectives.Evaluation`):
      the named results and which one is the headline; by default
      :func:`stn_jax.objectives.error_rate` of ``terms``.
  """
  make_model: Callable[[nnx.Rngs], nnx.Module]
  train_batches: Callable[[int], Iterator[tuple[Any, Any]]]
  test_set: Callable[[], tuple[np.ndarray, Any]]
  terms: objectives.Terms = objectives.classification_terms
  views: Optional[Callable[[nnx.Module, jax.Array], tuple]] = None
  evaluation: Optional[objectives.Evaluation] = None

  def __post_init__(self):
    if self.evaluation is None:
      self.evaluation = (objectives.CLASSIFICATION if self.terms is objectives.classification_terms
                         else objectives.error_rate(self.terms))


# --- Pieces of the loop -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Periodic:
  """Due at every multiple of ``every`` steps and at step ``last``."""
  every: int
  last: int

  def __call__(self, step: int) -> bool:
    return step % self.every == 0 or step == self.last


class Stopwatch:
  """Training time: wall time minus what is spent inside :meth:`paused` blocks."""

  def __init__(self):
    self._mark = time.perf_counter()
    self._paused = 0.0
    self.total = 0.0

  @contextlib.contextmanager
  def paused(self):
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self._paused += time.perf_counter() - t0

  def lap(self) -> float:
    """Seconds of training since the previous lap (added to :attr:`total`)."""
    now = time.perf_counter()
    elapsed = now - self._mark - self._paused
    self._mark, self._paused = now, 0.0
    self.total += elapsed
    return elapsed


def rounded(value: float, digits: int = 6) -> float:
  """``value`` to ``digits`` significant digits (what metrics.jsonl and results.json hold)."""
  return float(f"{float(value):.{digits}g}")


def _in_notebook() -> bool:
  """Whether this process is a Jupyter (IPython) kernel."""
  ipython = sys.modules.get("IPython")
  shell = ipython.get_ipython() if ipython is not None else None
  return shell is not None and hasattr(shell, "kernel")


class _Progress:
  """A progress bar on a terminal or in a notebook (``tqdm.auto``), plain log lines otherwise
  (logs, pipes); silent off process 0."""

  def __init__(self, total: int, initial: int, enabled: bool, bar: bool):
    self.enabled = enabled
    self.bar = None
    if enabled and bar and (sys.stderr.isatty() or _in_notebook()):
      from tqdm.auto import tqdm
      self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

  def update(self, n: int = 1) -> None:
    if self.bar is not None:
      self.bar.update(n)

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


def evaluate(eval_step, state, images, labels, *, batch_size: int,
             evaluation: objectives.Evaluation = objectives.CLASSIFICATION) -> dict:
  """``evaluation``'s named results over a whole set, each example counted once, and ``count``.

  ``eval_step`` is :func:`stn_jax.steps.pmap_eval_step` of the same
  ``evaluation``; ``batch_size`` is the global evaluation batch; each process
  evaluates its contiguous shard of the (padded) set.
  """
  count = jax.process_count()
  if batch_size % (count * jax.local_device_count()):
    raise ValueError(f"eval_batch_size {batch_size} must divide by the "
                     f"{count * jax.local_device_count()} devices.")
  local = batch_size // count
  totals: dict[str, float] = {}
  for x, y, mask in steps.padded_batches(images, labels, local,
                                         shard=(jax.process_index(), count)):
    sums = eval_step(state, *steps.shard_batch((x, y, mask)))
    for k, value in host_values(sums).items():
      totals[k] = totals.get(k, 0.0) + float(value)
  n = totals.pop("count")
  return {**evaluation.summarise(totals, n), "count": n}


def host_values(replicated_tree):
  """The first device's copy of a replicated tree (metrics, state), as numpy on the host."""
  return jax.device_get(steps.unreplicate(replicated_tree))


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


def transformer_figure(task: Task, model: nnx.Module, images, labels=None, *, title: str = ""):
  """A ``matplotlib.figure.Figure``: test inputs (captioned with true and predicted labels
  when ``labels`` are given) beside what the model's spatial transformers make of them.

  ``model`` is called on ``images [N, ...]``; ``task.views`` must not be None.
  """
  from stn_jax import plotting
  x = jnp.asarray(images, jnp.float32)
  outputs, grids, titles = task.views(model, x)
  captions = None
  if labels is not None and task.evaluation.describe is not None:
    captions = task.evaluation.describe(jax.device_get(model(x)), labels)
  return plotting.transformer_figure(
      np.asarray(x), [np.asarray(o) for o in outputs],
      [None if g is None else np.asarray(g) for g in grids],
      titles=titles, row_labels=captions, suptitle=title)


# --- The loop -----------------------------------------------------------------------------


def train_and_evaluate(config, task: Task, workdir: str, *,
                       hooks: Sequence[Callable[[int, steps.TrainState], None]] = (),
                       callbacks: Sequence[Callable[[dict], None]] = ()) -> dict:
  """Trains ``task`` as ``config`` says, continuing from ``workdir``'s newest checkpoint.

  ``config`` (an ``ml_collections.ConfigDict``) needs ``seed``, ``steps``,
  ``batch_size`` (global), ``optimizer`` (see :func:`stn_jax.optim.make_schedule_and_optimizer`),
  ``eval_every``, ``eval_batch_size``, ``log_every``, ``checkpoint_every``
  and may have ``keep_checkpoints``, ``progress``, ``figure_examples``.

  ``hooks`` are called as ``hook(step, state)`` after every step (tests use
  one to simulate a kill). ``callbacks`` are called as ``callback(record)``
  with each record written to ``metrics.jsonl`` (``{"step", "split":
  "train" | "test", <named values>}``), e.g. to draw a live curve in a
  notebook.

  Returns the results written to ``results.json`` (``test_<name>`` for each
  of ``task.evaluation``'s results, ``headline`` naming the main one) plus
  ``state`` (the final :class:`~stn_jax.steps.TrainState` on the host) and
  ``model`` (the trained ``nnx`` model in evaluation mode, ready to call).

  ``config.init_from`` (a work directory) starts a new run from another
  run's newest checkpoint: its model's weights and state, at step 0 with a
  fresh optimiser (e.g. a transformer trained on easier data); a run that
  resumes from its own checkpoints ignores it.

  Running again with more ``steps`` in the same work directory trains on
  from the newest checkpoint; settings that change what the checkpoints
  mean are refused (:class:`stn_jax.workdir.ConfigMismatchError`).

  Before anything is written, the configuration is validated
  (:func:`stn_jax.guards.validate_config`) and the work directory's lock is
  taken (:class:`stn_jax.workdir.WorkdirLock`; a second run is refused). A
  rerun of a finished run returns its stored results and changes nothing.
  SIGINT/SIGTERM stop the run after the current step with a checkpoint of
  it (:class:`stn_jax.guards.RunInterrupted`).
  """
  guards.validate_config(config)
  lock = workdir_files.acquire_lock(workdir)
  try:
    return _Run(config, task, workdir, callbacks).run(hooks)
  finally:
    lock.release()


class _Run:
  """One call of :func:`train_and_evaluate`: its model, steps, writers and clocks."""

  def __init__(self, config, task: Task, workdir: str, callbacks):
    self.started = time.time()
    self.config, self.task, self.workdir, self.callbacks = config, task, workdir, callbacks
    self.primary = jax.process_index() == 0
    self.config_dict = workdir_files.config_to_dict(config)
    workdir_files.check_config_matches(workdir, self.config_dict)
    model = task.make_model(nnx.Rngs(params=config.seed, dropout=config.seed))
    self.schedule, self.optimizer = optim.make_schedule_and_optimizer(config)
    self.graphdef, self.initial = steps.create_train_state(model, self.optimizer)
    self.eval_graph = steps.eval_graphdef(model)
    self.checkpoints = checkpoints_lib.Checkpoints(
        workdir, keep=config.get("keep_checkpoints", 2), sampler=guards.sampler_fingerprint())

  def model_of(self, state: steps.TrainState) -> nnx.Module:
    """The model with ``state``'s weights, in evaluation mode."""
    return nnx.merge(self.eval_graph, state.params, state.rest)

  def record(self, step: int, split: str, values: dict) -> None:
    """Writes one record (rounded) to metrics.jsonl/TensorBoard and gives it to the callbacks."""
    values = {k: rounded(x) for k, x in values.items()}
    self.writer.write(step, split, values)
    for callback in self.callbacks:
      callback({"step": int(step), "split": split, **values})

  def run(self, hooks) -> dict:
    config = self.config
    stored = workdir_files.finished_results(self.workdir, self.config_dict)
    final = self.checkpoints.restore_verified(self.initial, config.steps) if stored else None
    if final is not None:   # A finished run: report it, change nothing.
      self.checkpoints.close()
      if self.primary:
        headline = stored.get("headline", "error")
        print(f"{self.workdir} holds this finished run: test {headline} "
              f"{stored['test_' + headline]:.4g} after {stored['steps']} steps; nothing was "
              "changed.", flush=True)
      final = jax.device_get(final)
      return {**stored, "state": final, "model": self.model_of(final)}
    restored, self.start_step = self.checkpoints.restore_newest_intact(self.initial)
    if self.start_step > config.steps:
      self.checkpoints.close()
      raise ValueError(f"the work directory {self.workdir} holds a checkpoint at step "
                       f"{self.start_step}, beyond steps={config.steps}; ask for at least "
                       f"{self.start_step} steps, or use a new work directory.")
    state = self.initial if restored is None else restored
    source = config.get("init_from") or ""
    if restored is None and source:
      state, source_step = self.initialised_from(source)
    if self.primary:
      workdir_files.write_config(self.workdir, self.config_dict)
    self.writer = workdir_files.MetricWriter(self.workdir, enabled=self.primary,
                                             resume_step=self.start_step)
    self.progress = _Progress(config.steps, self.start_step, self.primary,
                              config.get("progress", True))
    self.progress.log(
        f"{'resuming at' if self.start_step else 'starting at'} step {self.start_step} of "
        f"{config.steps}; {jax.process_count()} process(es) x {jax.local_device_count()} "
        f"{jax.devices()[0].device_kind} device(s); global batch {config.batch_size}; "
        f"{sum(x.size for x in jax.tree.leaves(state.params)):,} parameters")
    if restored is None and source:
      self.progress.log(f"the model starts from {source} (its checkpoint of step "
                        f"{source_step}); the optimiser starts afresh")
    self.eval_step = steps.pmap_eval_step(self.eval_graph, evaluation=self.task.evaluation)
    self.test_images, self.test_labels = self.task.test_set()
    self.writer.write_text("config", "```\n" + json.dumps(self.config_dict, indent=2,
                                                         sort_keys=True) + "\n```")
    try:
      replicated, result = self.train(steps.replicate(state, jax.local_device_count()), hooks)
      return self.finish(host_values(replicated), result)
    finally:
      self.progress.close()
      self.writer.close()
      self.checkpoints.close()

  def initialised_from(self, source: str) -> tuple[steps.TrainState, int]:
    """Step 0 of this run with the model of ``source``'s newest verified checkpoint.

    The trainable parameters and the model's other state (e.g. a frozen
    encoder) come from ``source``, a work directory of a run of the same
    model and optimiser; the step is 0 and the optimiser state is fresh.
    Returns ``(state, source_step)``. Raises ``ValueError`` when ``source`` is
    this run's own directory, holds no checkpoint, or holds another model.
    """
    if workdir_files.resolve(source) == workdir_files.resolve(self.workdir):
      raise ValueError(f"config.init_from names this run's own work directory {source}; "
                       "a run resumes from its own checkpoints without it.")
    if not (workdir_files.resolve(source) / "checkpoints").exists():
      raise ValueError(f"config.init_from: {source} holds no checkpoints directory.")
    found = checkpoints_lib.Checkpoints(source, keep=None)
    try:
      restored, step = found.restore_newest_intact(self.initial)
    except checkpoints_lib.CheckpointError as error:
      raise ValueError(f"config.init_from: {error}") from None
    except Exception as error:  # orbax raises many types for a tree of another shape
      raise ValueError(
          f"config.init_from: {source}'s checkpoint does not fit this run's model and "
          f"optimiser ({type(error).__name__}: {' '.join(str(error).split())[:300]}); it "
          "must be a run of the same model and optimiser.") from None
    finally:
      found.close()
    if restored is None:
      raise ValueError(f"config.init_from: {source} holds no checkpoint.")
    shapes = lambda tree: [(jax.tree_util.keystr(k), np.shape(x), np.asarray(x).dtype)  # noqa: E731
                           for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
    there, here = shapes(restored.params), shapes(self.initial.params)
    differ = [f"parameter {a[0]} has shape {a[1]} {a[2]} there, {b[1]} {b[2]} here"
              for a, b in zip(there, here) if a != b]
    if len(there) != len(here):
      differ.insert(0, f"{len(there)} parameter arrays there, {len(here)} here")
    if differ:
      raise ValueError(f"config.init_from: {source}'s checkpoint does not fit this run's "
                       f"model: {differ[0]}; it must be a run of the same model and optimiser.")
    start = self.initial._replace(params=restored.params, rest=restored.rest)
    return start, step

  def evaluate(self, replicated, step: int) -> dict:
    t0 = time.time()
    evaluation = self.task.evaluation
    result = evaluate(self.eval_step, replicated, self.test_images, self.test_labels,
                      batch_size=self.config.eval_batch_size, evaluation=evaluation)
    self.record(step, "test", {k: v for k, v in result.items() if k != "count"})
    others = ", ".join(f"{k} {v:.4g}" for k, v in result.items()
                       if k not in (evaluation.headline, "count"))
    self.progress.log(f"step {step}: test {evaluation.headline} {result[evaluation.headline]:.4g}"
                      f" ({others}; {int(result['count'])} examples, {time.time() - t0:.1f} s)")
    return result

  def log_train(self, done: int, host: dict, window_steps: int, seconds: float) -> None:
    values = {"loss": float(host["loss"]), "accuracy": float(host["accuracy"]),
              "grad_norm": float(host["grad_norm"]), "learning_rate": float(self.schedule(done - 1)),
              "images_per_second": window_steps * self.config.batch_size / max(seconds, 1e-9)}
    self.record(done, "train", values)
    self.progress.log(f"step {done}: loss {values['loss']:.4f} acc {values['accuracy']:.3f} "
                      f"lr {values['learning_rate']:.2g} {values['images_per_second']:.0f} img/s")

  def check_finite(self, host: dict, step: int, replicated) -> None:
    """Raises :class:`guards.NonFiniteError` if step ``step``'s metrics (``host``: on the
    host, unreplicated) flag a non-finite value; the parameter arrays are named from
    ``replicated``, the state the loop holds now."""
    guards.check_finite(host, step, self.checkpoints.describe_kept,
                        lambda: guards.non_finite_parameters(host_values(replicated).params))

  # The step loop stays in one piece: the order of dispatch, the deferred finiteness check
  # of the previous step and the periodic actions is what keeps the devices busy.
  def train(self, replicated, hooks):
    """Steps from ``start_step`` to ``config.steps``; ``(replicated state, last evaluation)``."""
    config, last = self.config, self.config.steps
    log, evaluate_now, checkpoint_now = (Periodic(config.log_every, last),
                                         Periodic(config.eval_every, last),
                                         Periodic(config.checkpoint_every, last))
    train_step = steps.pmap_train_step(self.graphdef, self.optimizer, terms=self.task.terms)
    rng = jax.random.key(config.seed)
    batches = self.task.train_batches(self.start_step)
    pending = None            # (step, metrics) of the last dispatched step, not yet checked.
    clock, window_start = Stopwatch(), self.start_step
    self.clock = clock
    result = None
    signals = guards.StopSignals()
    try:
      for step in range(self.start_step, last):
        images, labels = next(batches)
        x, y = steps.shard_batch((images, labels), jax.local_device_count())
        replicated, metrics = train_step(replicated, x, y, rng)
        if pending is not None:        # Check the previous step while this one runs.
          self.check_finite(host_values(pending[1]), pending[0], replicated)
        pending = (step, metrics)
        done = step + 1
        for hook in hooks:
          hook(done, replicated)
        if log(done) or checkpoint_now(done):
          host = host_values(metrics)
          self.check_finite(host, step, replicated)
          pending = None
        self.progress.update(1)
        if log(done):
          self.log_train(done, host, done - window_start, clock.lap())
          window_start = done
        if evaluate_now(done):
          with clock.paused():
            result = self.evaluate(replicated, done)
        if checkpoint_now(done):
          with clock.paused():
            self.checkpoints.save(steps.unreplicate(replicated))
        if (received := signals.requested(done)) and done != last:
          self.check_finite(host_values(metrics), step, replicated)
          self.checkpoints.save(steps.unreplicate(replicated))
          raise guards.RunInterrupted(received, done, str(self.checkpoints.directory))
      if result is None:   # Nothing left to train (a finished run): evaluate its final state.
        result = self.evaluate(replicated, last)
    finally:
      signals.close()
    return replicated, result

  def finish(self, final: steps.TrainState, result: dict) -> dict:
    """Writes results.json and the figure; returns the results with the state and the model."""
    config, evaluation = self.config, self.task.evaluation
    results = {f"test_{k}": rounded(v) for k, v in result.items() if k != "count"}
    results.update({
        "headline": evaluation.headline, "test_examples": int(result["count"]),
        "steps": config.steps, "global_batch": config.batch_size,
        "resumed_from_step": self.start_step,
        "train_seconds_this_run": round(getattr(self, "clock", Stopwatch()).total, 1),
        "wall_seconds_this_run": round(time.time() - self.started, 1),
        "device_kind": jax.devices()[0].device_kind, "platform": jax.default_backend(),
        "machine": describe_machine(),
        "num_devices": jax.device_count(), "process_count": jax.process_count(),
        "jax_version": jax.__version__, "sampler": guards.sampler_fingerprint(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": self.config_dict,
    })
    model = self.model_of(final)
    if self.primary:
      workdir_files.write_results(self.workdir, results)
      if self.task.views is not None and config.get("figure_examples", 0):
        self.write_figure(model)
    self.progress.log(f"done: test {evaluation.headline} "
                      f"{results['test_' + evaluation.headline]:.4g} after {config.steps} steps; "
                      f"results in {os.path.join(self.workdir, 'results.json')}")
    return {**results, "state": final, "model": model}

  def write_figure(self, model: nnx.Module) -> None:
    """``transformers.png``, and the same figure in TensorBoard."""
    n = self.config.figure_examples
    labels = jax.tree.map(lambda y: np.asarray(y)[:n], self.test_labels)
    figure = transformer_figure(self.task, model, self.test_images[:n], labels,
                                title=self.config.get("name", ""))
    path = workdir_files.resolve(self.workdir) / "transformers.png"
    with workdir_files.local_file(path) as local:
      figure.savefig(local, dpi=100)
    self.writer.write_figure(self.config.steps, "transformers", figure)
    self.progress.log(f"wrote {path}")
