"""Per-class localisation and figures of a co-localisation run (the paper's appendix A.2).

  python -m experiments.colocalisation_report --workdir=runs/coloc_translated \\
      --results=experiments/results/colocalisation/<budget>/translated \\
      --images=docs/images/colocalisation

Restores the run's newest checkpoint, predicts a box for every test canvas,
and writes ``<results>/localisation.json`` (percentage of digits localised,
IoU > 0.5, per class and overall) next to copies of the run's results.json
and metrics.jsonl; then ``<images>/<name>_boxes.png`` (test canvases, the
predicted box in red, the true one dashed green) and, from every checkpoint
kept, ``<images>/<name>_over_training.png`` (the box of a few test canvases
at each checkpoint, light to dark as training goes on).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from stn_jax import checkpoints, runs, tasks
from stn_jax import colocalisation as coloc


def predict_boxes(model, images: np.ndarray, batch: int = 500) -> np.ndarray:
  params = [np.asarray(model(jnp.asarray(images[i:i + batch]))["params"])
            for i in range(0, len(images), batch)]
  return np.asarray(coloc.box_from_attention(jnp.asarray(np.concatenate(params))))


def draw_box(ax, box, **style) -> None:
  x0, y0, x1, y1 = box
  ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, **style))


def boxes_figure(images, boxes, true_boxes, title: str) -> Figure:
  n = len(images)
  fig = Figure(figsize=(1.6 * n, 1.9))
  for i in range(n):
    ax = fig.add_subplot(1, n, i + 1)
    ax.imshow(images[i, ..., 0], cmap="gray", vmin=0, vmax=1)
    draw_box(ax, true_boxes[i], edgecolor="lime", linestyle="--", linewidth=1)
    draw_box(ax, boxes[i], edgecolor="red", linewidth=1.5)
    ax.set_axis_off()
  fig.suptitle(title, fontsize=9)
  return fig


def over_training_figure(images, boxes_per_step, step_numbers, title: str) -> Figure:
  n = len(images)
  fig = Figure(figsize=(1.8 * n, 2.1))
  shades = np.linspace(0.25, 1.0, len(step_numbers))
  for i in range(n):
    ax = fig.add_subplot(1, n, i + 1)
    ax.imshow(images[i, ..., 0], cmap="gray", vmin=0, vmax=1)
    for shade, boxes in zip(shades, boxes_per_step):
      draw_box(ax, boxes[i], edgecolor=(1.0, 1.0 - shade, 0.0), linewidth=1)
    ax.set_axis_off()
  fig.suptitle(f"{title}: the box at steps {', '.join(map(str, step_numbers))} "
               "(yellow to red)", fontsize=8)
  return fig


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--results", required=True)
  parser.add_argument("--images", default="docs/images/colocalisation")
  parser.add_argument("--examples", type=int, default=8)
  args = parser.parse_args()
  config = runs.load_config(args.workdir)
  task = tasks.build_task(config)
  images, labels = task.test_set()
  model = runs.restore_model(args.workdir, task=task)
  boxes = predict_boxes(model, images)
  localised = np.asarray(coloc.iou(jnp.asarray(boxes), jnp.asarray(labels["boxes"]))) \
      > coloc.IOU_THRESHOLD
  report = coloc.localised_by_class(localised, labels["classes"])
  os.makedirs(args.results, exist_ok=True)
  for name in ("results.json", "metrics.jsonl"):
    shutil.copy(os.path.join(args.workdir, name), os.path.join(args.results, name))
  with open(os.path.join(args.results, "localisation.json"), "w") as f:
    json.dump({"localised_percent": report, "test_examples": len(images),
               "iou_threshold": coloc.IOU_THRESHOLD}, f, indent=2)
  print(json.dumps(report))
  os.makedirs(args.images, exist_ok=True)
  n = args.examples
  boxes_figure(images[:n], boxes[:n], labels["boxes"][:n],
               f"co-localisation, {config.name}: predicted (red) and true (green) boxes; "
               f"{report['all']:.1f}% localised").savefig(
      os.path.join(args.images, f"{config.name}_boxes.png"), dpi=100)
  store = checkpoints.Checkpoints(args.workdir)
  step_numbers = sorted(store.manager.all_steps())
  store.close()
  per_step = [predict_boxes(runs.restore_model(args.workdir, task=task, step=s), images[:n])
              for s in step_numbers]
  over_training_figure(images[:n], per_step, step_numbers, config.name).savefig(
      os.path.join(args.images, f"{config.name}_over_training.png"), dpi=100)


if __name__ == "__main__":
  main()
