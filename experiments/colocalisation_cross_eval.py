"""A co-localisation run's transformer on both canvas variants: localised %, mean IoU, mean box offset.

  python -m experiments.colocalisation_cross_eval --workdir=runs/coloc_unit \\
      [--out=experiments/results/colocalisation/<budget>/<variant>/cross_eval.json]

Restores the run's newest checkpoint and predicts a box for every test canvas
of the translated and the cluttered variant (the run's own test sets: seed,
size and digits from its config, only ``num_clutter`` changed), then reports
the percentage of digits localised (IoU > 0.5), the mean IoU and the mean
offset of the predicted box's top-left corner from the true one in pixels
(x, y; positive is right and down). Separates what a transformer has learnt
to find from what its training loss drives it to on the other variant.
"""

from __future__ import annotations

import argparse
import json
import os

import jax.numpy as jnp
import numpy as np

from experiments.colocalisation_report import predict_boxes
from stn_jax import colocalisation as coloc
from stn_jax import runs, tasks
from stn_jax.configs import colocalisation as variants


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", default=None, help="also write the report here (JSON)")
  args = parser.parse_args(argv)
  config = runs.load_config(args.workdir)
  model = runs.restore_model(args.workdir, task=tasks.build_task(config))
  report = {"workdir": args.workdir, "trained_on": config.name}
  for variant, num_clutter in variants.VARIANTS.items():
    test_config = config.copy_and_resolve_references()
    test_config.num_clutter = num_clutter
    images, labels = tasks.build_task(test_config).test_set()
    boxes = predict_boxes(model, images)
    overlap = np.asarray(coloc.iou(jnp.asarray(boxes), jnp.asarray(labels["boxes"])))
    offset = (boxes[:, :2] - np.asarray(labels["boxes"])[:, :2]).mean(0)
    localised = 100 * float((overlap > coloc.IOU_THRESHOLD).mean())
    report[variant] = {"localised_percent": round(localised, 2),
                       "mean_iou": round(float(overlap.mean()), 4),
                       "mean_offset_xy_px": [round(float(o), 2) for o in offset],
                       "test_examples": len(images)}
  print(json.dumps(report, indent=2))
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  main()
