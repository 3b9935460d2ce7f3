"""Work directories anywhere: local paths and ``gs://`` buckets, through one path type.

Every file the training loop reads or writes goes through here (and
:mod:`stn_jax.checkpoints`): :func:`resolve` turns a work directory into an
``etils.epath.Path`` (local: absolute; ``gs://bucket/dir``: unchanged, read
and written with ``gcsfs``). What lives in a work directory::

  config.json          the run's configuration (a resumed run must match it)
  checkpoints/<step>/  verified orbax checkpoints (:mod:`stn_jax.checkpoints`)
  metrics.jsonl        one JSON object per log or evaluation
  tensorboard/         TensorBoard event files (process 0)
  results.json         the final results (a rerun of a finished run only reports them)
  transformers.png     the figure of the spatial transformers
  lock.json            the writer's lock while a run is going (:class:`WorkdirLock`)

Writes are whole-file and atomic: a local file is written next to its place
and renamed over it; a Cloud Storage object appears only when its upload is
complete. Cloud Storage has no append, so on ``gs://`` ``metrics.jsonl`` is
rewritten whole at each record (it stays small: one line per log).
TensorBoard's own ``gs://`` writer (tensorboardX's) is broken, so on
``gs://`` the event files are written to a local staging directory and
copied to ``tensorboard/`` at each record.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from typing import Iterator, Optional

import fsspec
from etils import epath

# Directory listings of gs:// are not cached: other writers (orbax's tensorstore, the other
# hosts of a run) change the directories behind gcsfs's back. A user's own setting wins.
fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)
# Config fields that may change when a run is resumed: the bookkeeping ones (they do not change
# the result), and `steps`, so that a run can be continued for longer in place (a schedule
# defined by the run's length, cosine or a decay_fraction, then stretches over the new length
# for the steps still to come). Every other field changes what the checkpoints mean (model,
# task, data, seed, batch, optimiser) and is refused.
RESUMABLE_FIELDS = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                    "progress", "figure_examples", "eval_batch_size", "data_dir", "steps")
# Fields added after runs were stored: a stored config without one means this value.
ADDED_FIELDS = {"init_from": "", "encoder_clutter": 0}
LOCK_NAME = "lock.json"


class ConfigMismatchError(ValueError):
  """The work directory holds a run of a different configuration."""


class WorkdirLockedError(RuntimeError):
  """Another run holds the work directory's lock."""


# --- Paths --------------------------------------------------------------------------------


def is_remote(path) -> bool:
  """Whether ``path`` is a URI such as ``gs://bucket/dir`` (not a local path)."""
  return "://" in os.fspath(path)


def resolve(path) -> epath.Path:
  """``path`` as an ``epath.Path``: local paths made absolute, ``gs://`` URIs unchanged."""
  text = os.fspath(path)
  return epath.Path(text if is_remote(text) else os.path.abspath(os.path.expanduser(text)))


def write_text(path: epath.Path, text: str) -> None:
  """Writes ``text`` to ``path`` whole and atomically (readers see the old or the new file)."""
  if is_remote(path):
    path.write_text(text)   # An object appears only once its upload is complete.
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
  temporary.write_text(text)
  os.replace(temporary, path)


def create_exclusive(path: epath.Path, text: str) -> None:
  """Creates ``path`` holding ``text``; raises ``FileExistsError`` if it exists.

  Local: ``O_EXCL``. Cloud Storage: an upload with ``ifGenerationMatch=0``
  (``gcsfs`` mode ``'xb'``), which the service refuses if the object exists.
  """
  if is_remote(path):
    with fsspec.open(os.fspath(path), "xb") as f:
      f.write(text.encode())
  else:
    with open(path, "x") as f:
      f.write(text)


def read_json(path: epath.Path) -> Optional[dict]:
  """The JSON object in ``path``, or ``None`` when there is no such file."""
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    return None


@contextlib.contextmanager
def local_file(path: epath.Path) -> Iterator[str]:
  """A local file name to write ``path`` through (for writers that need one, e.g. matplotlib).

  Local ``path``: its own name. Remote: a temporary file, uploaded on exit.
  """
  if not is_remote(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    yield os.fspath(path)
    return
  with tempfile.TemporaryDirectory() as tmp:
    name = os.path.join(tmp, path.name)
    yield name
    path.write_bytes(epath.Path(name).read_bytes())


def sync_processes(name: str) -> None:
  """A barrier across the processes of a multi-host run (nothing with one process)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# --- Configuration bookkeeping ------------------------------------------------------------


def flatten_config(tree: dict, prefix: str = "") -> dict:
  """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: the dotted field names of a nested config dict."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten_config(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_to_dict(config) -> dict:
  """A JSON-able dict of an ``ml_collections.ConfigDict`` (or a plain dict)."""
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(d, default=str))


def config_differences(stored: dict, current: dict) -> list[str]:
  """The dotted fields (outside :data:`RESUMABLE_FIELDS`) whose values differ
  (a field of :data:`ADDED_FIELDS` absent on one side counts as its default)."""
  stored, current = flatten_config(stored), flatten_config(current)
  value = lambda tree, k: tree.get(k, ADDED_FIELDS.get(k))  # noqa: E731
  return sorted(k for k in set(stored) | set(current)
                if k.split(".")[0] not in RESUMABLE_FIELDS and value(stored, k) != value(current, k))


def check_config_matches(workdir: str, config: dict) -> None:
  """Raises :class:`ConfigMismatchError` when ``workdir`` holds a different run.

  Fields in :data:`RESUMABLE_FIELDS` may differ. A work directory with
  checkpoints but no ``config.json`` is refused too.
  """
  root = resolve(workdir)
  stored = read_json(root / "config.json")
  if stored is None:
    ckpt = root / "checkpoints"
    if ckpt.exists() and any(ckpt.iterdir()):
      raise ConfigMismatchError(f"{workdir} holds checkpoints but no config.json; "
                                "use a new work directory.")
    return
  differ = config_differences(stored, config)
  if differ:
    flat_stored, flat_current = flatten_config(stored), flatten_config(config)
    lines = [f"  {k}: {flat_stored.get(k, '<absent>')!r} in the work directory, "
             f"{flat_current.get(k, '<absent>')!r} now" for k in differ]
    raise ConfigMismatchError(
        f"{workdir} holds a run of a different configuration; nothing was changed.\n"
        + "\n".join(lines) + "\nUse a new work directory (--workdir, or the workdir argument in "
        "Python), or the stored configuration to continue.")


def write_config(workdir: str, config: dict) -> None:
  """Writes ``config.json`` unless it already holds exactly ``config``."""
  path = resolve(workdir) / "config.json"
  if read_json(path) != config:
    write_text(path, json.dumps(config, indent=2, sort_keys=True))


def finished_results(workdir: str, config: dict) -> Optional[dict]:
  """The stored ``results.json`` of a finished run of ``config`` in ``workdir``, else ``None``."""
  results = read_json(resolve(workdir) / "results.json")
  if results is None or results.get("steps") != config.get("steps"):
    return None
  if config_differences(results.get("config", {}), config):
    return None
  return results


def write_results(workdir: str, results: dict) -> None:
  write_text(resolve(workdir) / "results.json", json.dumps(results, indent=2))


# --- Metrics ------------------------------------------------------------------------------


class MetricWriter:
  """JSON lines (``metrics.jsonl``) and TensorBoard summaries; silent off process 0.

  On resume, records a killed run wrote after ``resume_step`` (its last
  checkpoint) are dropped, so the file reads as one uninterrupted run.
  """

  def __init__(self, workdir: str, *, enabled: bool, resume_step: int = 0):
    self.enabled = enabled
    root = resolve(workdir)
    self.path = root / "metrics.jsonl"
    self._remote = is_remote(root)
    self._tb = None
    self._tb_remote = root / "tensorboard"
    self._staging = None
    if not enabled:
      return
    kept = []
    if self.path.exists():
      kept = [line + "\n" for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line)["step"] <= resume_step]
      write_text(self.path, "".join(kept))
    self._lines = kept
    try:
      from tensorboardX import SummaryWriter
    except ImportError:  # pragma: no cover - tensorboardX is a dependency
      print("tensorboardX is not installed: no TensorBoard summaries.", file=sys.stderr)
      return
    if self._remote:
      self._staging = tempfile.mkdtemp(prefix="stn_jax_tensorboard_")
      self._tb = SummaryWriter(self._staging, purge_step=resume_step + 1)
    else:
      self._tb = SummaryWriter(os.fspath(self._tb_remote), purge_step=resume_step + 1)

  def write(self, step: int, split: str, values: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: float(x) for k, x in values.items()}}
    line = json.dumps(record) + "\n"
    self._lines.append(line)
    if self._remote:
      write_text(self.path, "".join(self._lines))
    else:
      with self.path.open("a") as f:
        f.write(line)
    if self._tb is not None:
      for key, x in values.items():
        self._tb.add_scalar(f"{split}/{key}", float(x), int(step))
      self._sync_tensorboard()

  def write_text(self, tag: str, text: str, step: int = 0) -> None:
    """A TensorBoard text summary (the loop writes the run's config as ``config``)."""
    if self._tb is not None:
      self._tb.add_text(tag, text, int(step))
      self._sync_tensorboard()

  def write_figure(self, step: int, tag: str, figure) -> None:
    """A ``matplotlib.figure.Figure`` as a TensorBoard image (the figure stays open)."""
    if self._tb is not None:
      self._tb.add_figure(tag, figure, int(step), close=False)
      self._sync_tensorboard()

  def _sync_tensorboard(self) -> None:
    """Copies the staged event files to ``tensorboard/`` (``gs://`` work directories)."""
    if self._staging is None:
      return
    self._tb.flush()
    for name in os.listdir(self._staging):
      (self._tb_remote / name).write_bytes(epath.Path(self._staging, name).read_bytes())

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      if self._staging is not None:
        self._sync_tensorboard()
        shutil.rmtree(self._staging, ignore_errors=True)
        self._staging = None
      self._tb = None


def read_metrics(workdir: str) -> list[dict]:
  """The records of ``<workdir>/metrics.jsonl``."""
  text = (resolve(workdir) / "metrics.jsonl").read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- The writer's lock --------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # Alive, someone else's.
    return True
  return True


class WorkdirLock:
  """One writer per work directory: ``lock.json`` created exclusively, with a heartbeat.

  The lock file holds the holder's host, process id, start time, a random
  token and a heartbeat time, rewritten every ``heartbeat_s`` seconds by a
  daemon thread. Acquiring creates it exclusively (``open(..., 'x')``: local
  ``O_EXCL``; on Cloud Storage an upload with ``ifGenerationMatch=0``), then
  reads it back and checks its token. A lock whose holder is gone is taken
  over: on the same host, when its process no longer exists (``kill -9``
  included); anywhere, when its heartbeat is older than ``stale_s`` seconds
  (a crashed or unreachable host). Otherwise :class:`WorkdirLockedError`
  names the holder. Released (deleted) on :meth:`release`, if still ours.
  """

  def __init__(self, workdir: str, *, heartbeat_s: float = 60.0, stale_s: float = 600.0):
    self.path = resolve(workdir) / LOCK_NAME
    self.heartbeat_s = heartbeat_s
    self.stale_s = stale_s
    self.token = uuid.uuid4().hex
    self._stop = threading.Event()
    self._thread = None

  def _record(self, started: float) -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                       "started": started, "heartbeat": time.time()})

  def _holder_alive(self, holder: dict) -> bool:
    if time.time() - float(holder.get("heartbeat", 0)) > self.stale_s:
      return False
    if holder.get("host") == socket.gethostname():
      return _pid_alive(int(holder.get("pid", -1)))
    return True

  @staticmethod
  def describe(holder: dict) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(holder.get("started", 0))))
    beat = time.time() - float(holder.get("heartbeat", 0))
    return (f"process {holder.get('pid')} on host {holder.get('host')!r}, running since {when}, "
            f"last heartbeat {beat:.0f} s ago")

  def acquire(self) -> None:
    """Takes the lock or raises :class:`WorkdirLockedError` naming the holder."""
    if not is_remote(self.path):
      self.path.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    for _ in range(3):
      holder = read_json(self.path) if self.path.exists() else None
      if holder is not None:
        if holder.get("token") != self.token and self._holder_alive(holder):
          raise WorkdirLockedError(
              f"{self.path.parent} is in use by another run ({self.describe(holder)}); "
              "nothing was changed. Wait for it to finish or stop it; a lock whose process is "
              f"gone is taken over (after {self.stale_s:.0f} s without a heartbeat from "
              f"another host), or delete {self.path} if you are sure no run uses it.")
        self.path.unlink(missing_ok=True)   # A stale lock: its holder is gone.
      try:
        create_exclusive(self.path, self._record(started))
      except FileExistsError:
        continue   # Someone created it between our look and our create: look again.
      if (read_json(self.path) or {}).get("token") == self.token:
        break
    else:
      holder = read_json(self.path) or {}
      raise WorkdirLockedError(f"{self.path.parent} is in use by another run "
                               f"({self.describe(holder)}); nothing was changed.")
    self._thread = threading.Thread(target=self._beat, args=(started,), daemon=True,
                                    name="stn_jax workdir lock heartbeat")
    self._thread.start()

  def _beat(self, started: float) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        if (read_json(self.path) or {}).get("token") == self.token:
          write_text(self.path, self._record(started))
      except OSError as error:   # A transient storage error: the next beat retries.
        print(f"stn_jax: lock heartbeat failed ({error}); retrying.", file=sys.stderr)

  def release(self) -> None:
    """Stops the heartbeat and deletes the lock if it is still ours (nothing if not taken)."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
      with contextlib.suppress(FileNotFoundError, ValueError):
        if (read_json(self.path) or {}).get("token") == self.token:
          self.path.unlink()


def acquire_lock(workdir: str) -> WorkdirLock:
  """The work directory's lock, taken by process 0 for the whole run (all processes agree).

  Raises :class:`WorkdirLockedError` on every process when process 0 could
  not take it. Other processes get an untaken lock (``release`` does nothing).
  """
  import jax
  import numpy as np
  lock = WorkdirLock(workdir)
  error = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except WorkdirLockedError as refused:
      error = refused
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    taken = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not taken and error is None:
      raise WorkdirLockedError(f"{workdir} is in use by another run (process 0 says which); "
                               "nothing was changed.")
  if error is not None:
    raise error
  return lock
