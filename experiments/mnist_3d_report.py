"""Figure and stored results of the 3-D runs (the paper's appendix A.3).

  python -m experiments.mnist_3d_report --st_workdir=runs/st3d_cnn --cnn_workdir=runs/cnn \\
      --results=experiments/results/mnist_3d/<budget> --images=docs/images/mnist_3d

Copies each run's results.json and metrics.jsonl to ``<results>/<name>/`` and
draws ``<images>/projections.png``: test volumes summed along depth (what
the CNN without a transformer classifies, at 60x60) beside the depth-summed
output of the trained 3-D transformer (what the ST3D-CNN classifies).
"""

from __future__ import annotations

import argparse
import os
import shutil

import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from stn_jax import runs, tasks


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--st_workdir", required=True)
  parser.add_argument("--cnn_workdir", default="")
  parser.add_argument("--results", required=True)
  parser.add_argument("--images", default="docs/images/mnist_3d")
  parser.add_argument("--examples", type=int, default=8)
  args = parser.parse_args()
  for workdir in filter(None, (args.st_workdir, args.cnn_workdir)):
    out = os.path.join(args.results, runs.load_config(workdir).name)
    os.makedirs(out, exist_ok=True)
    for name in ("results.json", "metrics.jsonl"):
      shutil.copy(os.path.join(workdir, name), os.path.join(out, name))
  config = runs.load_config(args.st_workdir)
  config.test_examples = args.examples
  task = tasks.build_task(config)
  volumes, labels = task.test_set()
  model = runs.restore_model(args.st_workdir, task=task)
  warped, _ = model.project(jnp.asarray(volumes))
  n = args.examples
  fig = Figure(figsize=(1.5 * n, 3.4))
  for i in range(n):
    for row, (image, title) in enumerate(((volumes[i].sum(0)[..., 0], "input, depth sum"),
                                          (np.asarray(warped[i, ..., 0]), "3-D ST, depth sum"))):
      ax = fig.add_subplot(2, n, row * n + i + 1)
      ax.imshow(image, cmap="gray")
      ax.set_axis_off()
      if i == 0:
        ax.set_title(title, fontsize=7, loc="left")
  fig.suptitle(f"3-D MNIST (labels {', '.join(map(str, labels[:n]))})", fontsize=9)
  os.makedirs(args.images, exist_ok=True)
  fig.savefig(os.path.join(args.images, "projections.png"), dpi=100)


if __name__ == "__main__":
  main()
