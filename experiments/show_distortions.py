"""Writes one PNG per distorted-MNIST variant and composite task: 64 samples with labels.

  python -m experiments.show_distortions --outdir docs/images/distortions

Reads MNIST test digits through TFDS (--data_dir, else $TFDS_DATA_DIR, else
../shared/data/tfds when present).
"""

from __future__ import annotations

import argparse
import os

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from stn_jax.tasks import default_data_dir  # noqa: E402
from stn_jax import datasets, distortions  # noqa: E402


def save_grid(path, images, titles, suptitle):
  fig, axes = plt.subplots(8, 8, figsize=(8, 8.8))
  for ax, img, title in zip(axes.ravel(), images, titles):
    ax.imshow(img[..., 0] if img.shape[-1] == 1 else np.concatenate([img[..., 0], img[..., 1]], 1),
              cmap="gray", vmin=0, vmax=1)
    ax.set_title(title, fontsize=7)
    ax.axis("off")
  fig.suptitle(suptitle)
  fig.tight_layout()
  fig.savefig(path, dpi=72)
  plt.close(fig)
  print(f"wrote {path}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--outdir", default="docs/images/distortions")
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  os.makedirs(args.outdir, exist_ok=True)
  images, labels = datasets.load_mnist("test", data_dir=default_data_dir(args.data_dir))
  key = jax.random.key(args.seed)
  digits, digit_labels = images[:64], labels[:64]
  for i, variant in enumerate(distortions.VARIANTS):
    out = np.asarray(distortions.distort(jax.random.fold_in(key, i), digits, variant))
    save_grid(os.path.join(args.outdir, f"{variant}.png"), out, [str(l) for l in digit_labels],
              f"distorted MNIST: {variant} {out.shape[1]}x{out.shape[2]}")
  pairs, sums = distortions.addition_pairs(jax.random.fold_in(key, 100), images[:64],
                                           images[64:128], labels[:64], labels[64:128])
  save_grid(os.path.join(args.outdir, "addition.png"), np.asarray(pairs),
            [f"{a}+{b}={s}" for a, b, s in zip(labels[:64], labels[64:128], np.asarray(sums))],
            "MNIST addition (2 channels side by side)")
  seq_digits = images[:320].reshape(64, 5, 28, 28, 1)
  seq, lengths, seq_labels = distortions.digit_sequences(
      jax.random.fold_in(key, 200), seq_digits, labels[:320].reshape(64, 5))
  titles = ["".join(str(d) for d in row[:n]) for row, n in zip(np.asarray(seq_labels),
                                                                 np.asarray(lengths))]
  save_grid(os.path.join(args.outdir, "sequences.png"), np.asarray(seq), titles,
            "multi-digit sequences 64x64")


if __name__ == "__main__":
  main()
