"""Work-directory files: the run's ``config.json`` (and the resume check) and the metrics.

``config.json`` holds the run's configuration; a resumed run must match it
(except :data:`RESUMABLE_FIELDS`). ``metrics.jsonl`` holds one JSON object per
log or evaluation; ``tensorboard/`` the same as TensorBoard summaries.
"""

from __future__ import annotations

import json
import os
import sys

# Config fields that may change when a run is resumed (they do not change the result).
RESUMABLE_FIELDS = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                    "progress", "figure_examples", "eval_batch_size", "data_dir")


class ConfigMismatchError(ValueError):
  """The work directory holds a run of a different configuration."""



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


def check_config_matches(workdir: str, config: dict) -> None:
  """Raises :class:`ConfigMismatchError` when ``workdir`` holds a different run.

  Fields in :data:`RESUMABLE_FIELDS` may differ. A work directory with
  checkpoints but no ``config.json`` is refused too.
  """
  path = os.path.join(workdir, "config.json")
  ckpt = os.path.join(workdir, "checkpoints")
  if not os.path.exists(path):
    if os.path.isdir(ckpt) and os.listdir(ckpt):
      raise ConfigMismatchError(f"{workdir} holds checkpoints but no config.json; "
                                "use a new --workdir.")
    return
  with open(path) as f:
    stored = flatten_config(json.load(f))
  current = flatten_config(config)
  differ = sorted(k for k in set(stored) | set(current)
                  if k.split(".")[0] not in RESUMABLE_FIELDS and stored.get(k) != current.get(k))
  if differ:
    lines = [f"  {k}: {stored.get(k, '<absent>')!r} in the work directory, "
             f"{current.get(k, '<absent>')!r} now" for k in differ]
    raise ConfigMismatchError(
        f"{workdir} holds a run of a different configuration; nothing was changed.\n"
        + "\n".join(lines) + "\nUse a new --workdir, or the stored configuration to resume.")


# --- Metrics ------------------------------------------------------------------------------


class MetricWriter:
  """JSON lines (``metrics.jsonl``) and TensorBoard summaries; silent off process 0."""

  def __init__(self, workdir: str, *, enabled: bool, resume_step: int = 0):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    if os.path.exists(self.path):  # Drop what a killed run logged after its last checkpoint.
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(kept)
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=resume_step + 1)
    except ImportError:  # pragma: no cover - tensorboardX is a dependency
      print("tensorboardX is not installed: no TensorBoard summaries.", file=sys.stderr)

  def write(self, step: int, split: str, values: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: float(x) for k, x in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for key, x in values.items():
        self._tb.add_scalar(f"{split}/{key}", float(x), int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """The records of ``<workdir>/metrics.jsonl``."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]

