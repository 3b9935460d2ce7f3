"""Compares stn_jax.sample with PyTorch's grid_sample: values and both gradients.

  python -m experiments.benchmarks.check_against_torch

Float64, every method x padding mode x align_corners, on random grids with
points far outside the image; prints the largest absolute differences and
fails if any exceeds 1e-10. Needs torch (``pip install -e '.[bench]'``).
"""

import itertools

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

import stn_jax  # noqa: E402
from stn_jax import sampling  # noqa: E402


def main():
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, 7, 9, 3))
  grid = rng.uniform(-1.6, 1.6, (2, 5, 4, 2))
  grid[0, 0, 0] = (40.3, -77.1)
  grid[1, 1, 1] = (-1e6, 3.3)
  cotangent = rng.standard_normal((2, 5, 4, 3))
  worst = 0.0
  print("| method | padding | align_corners | value | d images | d grid |\n|---|---|---|---|---|---|")
  for method, padding, align in itertools.product(sampling.METHODS, sampling.PADDING_MODES,
                                                  (False, True)):
    x = torch.tensor(images).permute(0, 3, 1, 2).requires_grad_()
    g = torch.tensor(grid).requires_grad_()
    out = torch.nn.functional.grid_sample(x, g, mode=method, padding_mode=padding,
                                          align_corners=align).permute(0, 2, 3, 1)
    (out * torch.tensor(cotangent)).sum().backward()
    loss = lambda a, b: stn_jax.sample(a, b, method=method, padding_mode=padding,
                                       align_corners=align)
    ours = loss(jnp.asarray(images), jnp.asarray(grid))
    d_images, d_grid = jax.grad(lambda a, b: (loss(a, b) * cotangent).sum(), (0, 1))(
        jnp.asarray(images), jnp.asarray(grid))
    diffs = (np.abs(out.detach().numpy() - np.asarray(ours)).max(),
             np.abs(x.grad.permute(0, 2, 3, 1).numpy() - np.asarray(d_images)).max(),
             np.abs(g.grad.numpy() - np.asarray(d_grid)).max())
    worst = max(worst, *diffs)
    print(f"| {method} | {padding} | {align} | " + " | ".join(f"{d:.1e}" for d in diffs) + " |")
  print(f"largest difference: {worst:.2e} (torch {torch.__version__}, jax {jax.__version__})")
  if worst > 1e-10:
    raise SystemExit("stn_jax and torch disagree")


if __name__ == "__main__":
  main()
