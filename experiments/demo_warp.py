"""Warps MNIST digits with every transform family and writes a PNG.

  python -m experiments.demo_warp --out demo_warp.png

Reads MNIST through TFDS from ``--data_dir`` (default: $TFDS_DATA_DIR, else
../shared/data/tfds when present); without data it draws a synthetic digit.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import stn_jax  # noqa: E402
from stn_jax.tasks import default_data_dir  # noqa: E402
from stn_jax import datasets  # noqa: E402


def load_digits(n: int, data_dir: str | None) -> np.ndarray:
  """``[n, 28, 28, 1]`` float32 MNIST test digits in [0, 1], or synthetic ones without data."""
  try:
    images, _ = datasets.load_mnist("test", data_dir=default_data_dir(data_dir))
    return images[:n].astype(np.float32) / 255.0
  except datasets.DataNotFoundError as error:
    print(f"{error}\nUsing a synthetic digit instead.")
  yy, xx = np.mgrid[:28, :28]
  ring = np.exp(-((np.hypot(yy - 14, xx - 14) - 8) ** 2) / 4)   # A "0".
  return np.repeat(ring[None, ..., None], n, 0).astype(np.float32)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="demo_warp.png")
  parser.add_argument("--data_dir", default=None)
  args = parser.parse_args(argv)

  digits = jnp.asarray(load_digits(4, args.data_dir))
  rng = np.random.default_rng(0)
  examples = {
      "input": None,
      "rotation 45°": ("rotation", np.full((4, 1), np.pi / 4)),
      "attention (zoom)": ("attention", np.tile([0.6, 0.2, 0.1], (4, 1))),
      "affine": ("affine", np.tile([0.9, 0.3, 0.0, -0.2, 1.1, 0.0], (4, 1))),
      "projective": ("projective", np.tile([1, 0.1, 0, 0, 1, 0, 0.4, 0.3], (4, 1))),
      "tps": ("tps", np.asarray(stn_jax.identity_params("tps"))[None]
              + 0.15 * rng.standard_normal((4, 32))),
  }
  fig, axes = plt.subplots(4, len(examples), figsize=(2 * len(examples), 8))
  for col, (title, spec) in enumerate(examples.items()):
    out = digits if spec is None else stn_jax.warp(
        digits, jnp.asarray(spec[1], jnp.float32), transform=spec[0], method="bilinear")
    for row in range(4):
      axes[row, col].imshow(np.asarray(out[row, ..., 0]), cmap="gray", vmin=0, vmax=1)
      axes[row, col].axis("off")
    axes[0, col].set_title(title)
  fig.tight_layout()
  fig.savefig(args.out, dpi=80)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
