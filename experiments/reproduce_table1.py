"""Reproduces the paper's Table 1 (distorted MNIST) at a chosen budget, and reports it.

  python -m experiments.reproduce_table1 --cells=minimum --steps=2000 --batch_size=128

runs each cell (``<model>_<distortion>`` of stn_jax/configs/distorted_mnist.py)
with ``--steps`` steps of ``--batch_size`` (the paper: 150000 x 256; the
learning-rate decay keeps its shape, x0.1 at each third), writes each run's
work directory under ``--workdir/<budget>/<cell>``, and copies its
results.json and metrics.jsonl to ``experiments/results/table1/<budget>/``.
Cells whose results already exist there are skipped, so the command can be
re-run to continue a partly finished matrix. Then (and with
``--report_only``) it writes from every stored result:

  docs/results.md                       the table: ours next to the paper's
  docs/images/table1/error_vs_steps.png test error against steps, CNN vs ST-CNN
  docs/images/table1/st_<variant>.png   inputs beside affine/projective/TPS ST outputs
                                        (when the runs' checkpoints are in --workdir)

``--cells``: ``minimum`` (RTS: CNN and the three ST-CNNs; R: CNN and ST-CNN
affine), ``all`` (the 32 cells), or a comma-separated list of cell names.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import time

import numpy as np

from stn_jax import host_memory
from stn_jax.configs import distorted_mnist

# The paper's Table 1, test error (%), as recorded in ../shared/reference/paper.md.
PAPER = {
    "fcn": (2.1, 5.2, 3.1, 3.2), "cnn": (1.2, 0.8, 1.5, 1.4),
    "st_fcn_affine": (1.2, 0.8, 1.5, 2.7), "st_fcn_projective": (1.3, 0.9, 1.4, 2.6),
    "st_fcn_tps": (1.1, 0.8, 1.4, 2.4), "st_cnn_affine": (0.7, 0.5, 0.8, 1.2),
    "st_cnn_projective": (0.8, 0.6, 0.8, 1.3), "st_cnn_tps": (0.7, 0.5, 0.8, 1.1),
}
VARIANTS = ("r", "rts", "p", "e")
LABELS = {"fcn": "FCN", "cnn": "CNN", "st_fcn_affine": "ST-FCN Aff",
          "st_fcn_projective": "ST-FCN Proj", "st_fcn_tps": "ST-FCN TPS",
          "st_cnn_affine": "ST-CNN Aff", "st_cnn_projective": "ST-CNN Proj",
          "st_cnn_tps": "ST-CNN TPS"}
MINIMUM = ("cnn_rts", "st_cnn_affine_rts", "st_cnn_projective_rts", "st_cnn_tps_rts",
           "cnn_r", "st_cnn_affine_r")
RESULTS = os.path.join("experiments", "results", "table1")


def budget_tag(args) -> str:
  tag = f"steps{args.steps}_batch{args.batch_size}"
  if args.schedule != "step":
    tag += f"_{args.schedule}"
  if args.learning_rate is not None:
    tag += f"_lr{args.learning_rate:g}"
  return tag


def cells_from(arg: str) -> list[str]:
  if arg == "minimum":
    return list(MINIMUM)
  if arg == "all":
    return list(distorted_mnist.NAMES)
  cells = [c.strip() for c in arg.split(",") if c.strip()]
  unknown = [c for c in cells if c not in distorted_mnist.NAMES]
  if unknown:
    raise SystemExit(f"unknown cells {unknown}; choose from {', '.join(distorted_mnist.NAMES)}")
  return cells


def run_cell(cell: str, args) -> None:
  from stn_jax import loop, tasks
  tag = budget_tag(args)
  out_dir = os.path.join(RESULTS, tag)
  if os.path.exists(os.path.join(out_dir, f"{cell}.json")):
    print(f"{cell}: results exist in {out_dir}; skipped")
    return
  config = distorted_mnist.get_config(cell)
  config.steps = args.steps
  config.batch_size = args.batch_size
  config.eval_every = max(args.steps // args.evals, 1)
  config.checkpoint_every = config.eval_every
  config.log_every = min(100, config.eval_every)
  config.seed = args.seed
  config.optimizer.schedule = args.schedule
  if args.learning_rate is not None:
    config.optimizer.learning_rate = args.learning_rate
  workdir = os.path.join(args.workdir, tag, cell)
  print(f"=== {cell}: {args.steps} steps of {args.batch_size} -> {workdir}", flush=True)
  loop.train_and_evaluate(config, tasks.build_task(config), workdir)
  os.makedirs(out_dir, exist_ok=True)
  shutil.copy(os.path.join(workdir, "metrics.jsonl"), os.path.join(out_dir, f"{cell}.metrics.jsonl"))
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  results["command"] = args.command
  with open(os.path.join(out_dir, f"{cell}.json"), "w") as f:
    json.dump(results, f, indent=2)


def load_results() -> dict:
  """``{budget tag: {cell: results}}`` of every stored run."""
  found: dict = {}
  for path in sorted(glob.glob(os.path.join(RESULTS, "*", "*.json"))):
    tag = os.path.basename(os.path.dirname(path))
    cell = os.path.basename(path)[:-len(".json")]
    with open(path) as f:
      found.setdefault(tag, {})[cell] = json.load(f)
  return found


def write_table(found: dict, path: str) -> None:
  lines = ["# Table 1 (distorted MNIST): our test error next to the paper's", "",
           "Written by `python -m experiments.reproduce_table1 --report_only` from the runs "
           "stored in `experiments/results/table1/`. Each cell: **ours** / paper (test "
           "error, %). Paper: 150,000 steps of batch 256. Runs at a smaller budget are "
           "labelled with it; `not run` means no stored result at that budget.", ""]
  for tag, cells in sorted(found.items()):
    any_result = next(iter(cells.values()))
    optimizer = any_result["config"]["optimizer"]
    lines += [f"## Budget: {any_result['steps']} steps x batch {any_result['global_batch']}, "
              f"{optimizer['name'].upper()} lr {optimizer['learning_rate']:g} "
              f"({optimizer['schedule']} schedule)"
              f" ({100 * any_result['steps'] * any_result['global_batch'] / (150000 * 256):.1f}% "
              "of the paper's examples seen)", ""]
    lines += ["| model | R | RTS | P | E |", "|---|---|---|---|---|"]
    for model, paper in PAPER.items():
      row = [LABELS[model]]
      for variant, reference in zip(VARIANTS, paper):
        r = cells.get(f"{model}_{variant}")
        row.append(f"**{r['test_error']:.2f}** / {reference}" if r else f"not run / {reference}")
      lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| cell | test error % | paper % | steps x batch | train s | wall s | "
              "machine | date |", "|---|---|---|---|---|---|---|---|"]
    for cell, r in sorted(cells.items()):
      model, variant = cell.rsplit("_", 1)
      lines.append(f"| {cell} | {r['test_error']:.2f} | {PAPER[model][VARIANTS.index(variant)]}"
                   f" | {r['steps']} x {r['global_batch']} | {r['train_seconds_this_run']:.0f}"
                   f" | {r['wall_seconds_this_run']:.0f} | {r.get('machine', r['device_kind'])}"
                   f" | {r['date'][:10]} |")
    commands = sorted({r.get("command", "") for r in cells.values()} - {""})
    lines += ["", "Commands:", ""] + [f"    {c}" for c in commands] + [""]
  # Only the Table 1 part is ours: sections written by hand after it (the first
  # top-level heading after the first line) are kept as they are.
  kept = ""
  if os.path.exists(path):
    with open(path) as f:
      existing = f.read().split("\n")
    later = [i for i, line in enumerate(existing) if i > 0 and line.startswith("# ")]
    kept = "\n".join(existing[later[0]:]).rstrip("\n") + "\n" if later else ""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n" + kept)
  print(f"wrote {path}")


def plot_curves(found: dict, path: str) -> None:
  from matplotlib.figure import Figure
  tags = sorted(found)
  variants = [v for v in VARIANTS if any(c.rsplit("_", 1)[1] == v for t in tags for c in found[t])]
  if not variants:
    return
  fig = Figure(figsize=(4.5 * len(variants), 3.4))
  axes = fig.subplots(1, len(variants), squeeze=False)
  for ax, variant in zip(axes[0], variants):
    for tag in tags:
      for cell in sorted(found[tag]):
        if cell.rsplit("_", 1)[1] != variant:
          continue
        metrics = os.path.join(RESULTS, tag, f"{cell}.metrics.jsonl")
        if not os.path.exists(metrics):
          continue
        with open(metrics) as f:
          test = [json.loads(l) for l in f if '"test"' in l]
        model = cell.rsplit("_", 1)[0]
        ax.plot([r["step"] for r in test], [r["error"] for r in test], marker=".",
                label=LABELS[model], ls="--" if model in ("cnn", "fcn") else "-")
    ax.set_yscale("log")
    ax.set_title(f"{variant.upper()}: test error vs steps")
    ax.set_xlabel("step")
    ax.set_ylabel("test error (%)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path, dpi=90)
  print(f"wrote {path}")


def plot_transformers(workdir: str, tag: str, out_dir: str, examples: int = 6) -> None:
  """Figure 3 style: per distortion, inputs beside the affine, projective and TPS ST-CNN outputs."""
  import jax.numpy as jnp
  from stn_jax import plotting, runs, tasks
  for variant in VARIANTS:
    outputs, grids, titles, inputs = [], [], [], None
    for transform in ("affine", "projective", "tps"):
      run = os.path.join(workdir, tag, f"st_cnn_{transform}_{variant}")
      if not os.path.isdir(os.path.join(run, "checkpoints")):
        continue
      task = tasks.build_task(runs.load_config(run))
      model = runs.restore_model(run, task=task)
      if inputs is None:
        inputs = jnp.asarray(task.test_set()[0][:examples])
      warped, params = model.st(inputs)
      outputs.append(np.asarray(warped))
      grids.append(np.asarray(model.st.grid(params)))
      titles.append(f"ST-CNN {transform}")
    if inputs is None:
      continue
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"st_{variant}.png")
    plotting.save_transformer_figure(path, np.asarray(inputs), outputs, grids, titles=titles,
                                     suptitle=f"{variant.upper()} ({tag})")
    print(f"wrote {path}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cells", default="minimum")
  parser.add_argument("--steps", type=int, default=150_000)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--evals", type=int, default=10, help="test evaluations per run")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--schedule", default="step", choices=("step", "cosine", "constant"),
                      help="learning-rate schedule (the paper's: step, x0.1 at each third)")
  parser.add_argument("--learning_rate", type=float, default=None,
                      help="base learning rate (default: the config's, the paper's 0.01)")
  parser.add_argument("--workdir", default="runs/table1")
  parser.add_argument("--report_only", action="store_true")
  args = parser.parse_args(argv)
  host_memory.reuse_freed_host_memory()  # before the first computation
  args.command = ("python -m experiments.reproduce_table1 " + " ".join(
      f"--{k}={v}" for k, v in [("cells", args.cells), ("steps", args.steps),
                               ("batch_size", args.batch_size), ("evals", args.evals),
                               ("seed", args.seed), ("schedule", args.schedule)]
      + ([("learning_rate", args.learning_rate)] if args.learning_rate is not None else [])))
  if not args.report_only:
    started = time.time()
    for cell in cells_from(args.cells):
      run_cell(cell, args)
    print(f"all cells done in {time.time() - started:.0f} s")
  found = load_results()
  write_table(found, os.path.join("docs", "results.md"))
  plot_curves(found, os.path.join("docs", "images", "table1", "error_vs_steps.png"))
  for tag in sorted(found):
    plot_transformers(args.workdir, tag, os.path.join("docs", "images", "table1", tag))


if __name__ == "__main__":
  main()
