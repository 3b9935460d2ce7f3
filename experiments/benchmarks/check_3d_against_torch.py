"""Compares stn_jax.volumetric with PyTorch's 5-D ``affine_grid`` and ``grid_sample``.

  python -m experiments.benchmarks.check_3d_against_torch

Float64, every method (``trilinear`` = torch's 5-D ``'bilinear'``, and
``nearest``) x padding mode x align_corners, volumes channels-last here and
``[B, C, D, H, W]`` in torch; random grids with points far outside the
volume, kept 0.1 voxel away from voxel centres and kernel kinks for the grid
gradient (at a voxel centre our gradient is the central difference, the
project's rule, while torch's is one-sided). Prints the largest absolute
differences of the values, the volume gradient and the grid gradient, and of
``affine_grid_3d`` against torch's ``affine_grid``; fails if any exceeds
1e-10. Needs torch (``pip install -e '.[bench]'``).
"""

import itertools

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from stn_jax import sampling, volumetric  # noqa: E402

TORCH_MODE = {"trilinear": "bilinear", "nearest": "nearest"}


def off_centre_grid(rng, shape, dhw, align_corners):
  """Normalised points whose voxel coordinates are 0.1-0.4 voxel from a centre, some far out."""
  axes = []
  for size in dhw[::-1]:
    voxel = rng.integers(-3, size + 3, shape) + rng.choice([-1, 1], shape) * rng.uniform(
        0.1, 0.4, shape)
    axes.append(2 * voxel / (size - 1) - 1 if align_corners else (2 * voxel + 1) / size - 1)
  grid = np.stack(axes, -1)
  grid[0, 0, 0, 0] = (40.3, -77.1, 0.33)
  return grid


def main():
  rng = np.random.default_rng(0)
  dhw = (5, 6, 7)
  volumes = rng.standard_normal((2, *dhw, 3))
  worst = 0.0
  print("| method | padding | align_corners | value | d volumes | d grid |\n"
        "|---|---|---|---|---|---|")
  for method, padding, align in itertools.product(volumetric.METHODS_3D, sampling.PADDING_MODES,
                                                  (False, True)):
    grid = off_centre_grid(rng, (2, 4, 3, 5), dhw, align)
    cotangent = rng.standard_normal((2, 4, 3, 5, 3))
    x = torch.tensor(volumes).permute(0, 4, 1, 2, 3).requires_grad_()
    g = torch.tensor(grid).requires_grad_()
    out = torch.nn.functional.grid_sample(x, g, mode=TORCH_MODE[method], padding_mode=padding,
                                          align_corners=align).permute(0, 2, 3, 4, 1)
    (out * torch.tensor(cotangent)).sum().backward()
    sample = lambda a, b: volumetric.sample_volume(a, b, method=method,  # noqa: E731
                                                   padding_mode=padding, align_corners=align)
    ours = sample(jnp.asarray(volumes), jnp.asarray(grid))
    d_vol, d_grid = jax.grad(lambda a, b: (sample(a, b) * cotangent).sum(), (0, 1))(
        jnp.asarray(volumes), jnp.asarray(grid))
    diffs = (np.abs(out.detach().numpy() - np.asarray(ours)).max(),
             np.abs(x.grad.permute(0, 2, 3, 4, 1).numpy() - np.asarray(d_vol)).max(),
             np.abs(g.grad.numpy() - np.asarray(d_grid)).max())
    worst = max(worst, *diffs)
    print(f"| {method} | {padding} | {align} | " + " | ".join(f"{d:.1e}" for d in diffs) + " |")
  theta = rng.standard_normal((2, 3, 4))
  for align in (False, True):
    theirs = torch.nn.functional.affine_grid(torch.tensor(theta), (2, 1, *dhw),
                                             align_corners=align).numpy()
    ours = np.asarray(volumetric.affine_grid_3d(jnp.asarray(theta), dhw, align_corners=align))
    diff = np.abs(theirs - ours).max()
    worst = max(worst, diff)
    print(f"affine_grid_3d, align_corners={align}: {diff:.1e}")
  print(f"largest difference: {worst:.2e} (torch {torch.__version__}, jax {jax.__version__})")
  if worst > 1e-10:
    raise SystemExit("stn_jax.volumetric disagrees with torch beyond 1e-10")


if __name__ == "__main__":
  main()
