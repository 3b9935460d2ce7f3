"""How often the P distortion folds or crushes a digit: statistics of its corner quads.

  python -m experiments.p_distortion_stats [--samples 100000] [--sigmas 5,3,2]

:func:`stn_jax.distortions.projective` moves the four corners of the (scaled)
28x28 digit by independent N(0, sigma px) noise per coordinate and warps the
digit onto the quad they make. This draws the same corners
(:func:`stn_jax.distortions.projective_corners`) and reports, per
sigma, the share of quads that are not convex (the warp folds the digit over
the line at infinity: mirrored or cut fragments) and the share whose area is
under 40% of the image (the digit shrunk to a few pixels along one side).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from stn_jax import distortions


def quad_statistics(sigma: float, samples: int, seed: int = 0) -> dict[str, float]:
  """``{'not_convex': share, 'area_below_40pct': share}`` of ``samples`` P corner quads."""
  h, w = distortions.DIGIT_HW
  moved = np.asarray(distortions.projective_corners(jax.random.key(seed), samples, sigma),
                     np.float64)                                  # [N, 4, 2]
  edge = np.roll(moved, -1, axis=1) - moved                       # edge k -> k+1
  next_edge = np.roll(edge, -1, axis=1)
  turn = edge[..., 0] * next_edge[..., 1] - edge[..., 1] * next_edge[..., 0]
  convex = np.all(turn > 0, axis=1) | np.all(turn < 0, axis=1)
  x, y = moved[..., 0], moved[..., 1]
  area = 0.5 * np.abs(np.sum(x * np.roll(y, -1, 1) - np.roll(x, -1, 1) * y, axis=1))
  return {"not_convex": float(np.mean(~convex)),
          "area_below_40pct": float(np.mean(area < 0.4 * (w - 1) * (h - 1)))}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--samples", type=int, default=100_000)
  parser.add_argument("--sigmas", default="5,3,2", help="corner noise, pixels, comma-separated")
  args = parser.parse_args(argv)
  print("| corner sigma (px) | quads not convex | quad area < 40% |")
  print("|---|---|---|")
  for sigma in (float(s) for s in args.sigmas.split(",")):
    stats = quad_statistics(sigma, args.samples)
    print(f"| {sigma:g} | {100 * stats['not_convex']:.2f}% | {100 * stats['area_below_40pct']:.2f}% |")


if __name__ == "__main__":
  main()
