"""Grid generation plus sampling in one call."""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np

from stn_jax import _validation as v
from stn_jax import grids
from stn_jax import sampling
from stn_jax import transforms

_MATRIX_SHAPES = {"affine": "[B, 2, 3]", "projective": "[B, 3, 3]", "tps": "[B, K, 2]"}


def transform_grid(theta: jax.Array, out_hw: Sequence[int], *, transform: str = "affine",
                   control_shape: Sequence[int] = transforms.DEFAULT_CONTROL_SHAPE,
                   align_corners: bool = False) -> jax.Array:
  """The sampling grid ``[B, Ho, Wo, 2]`` of a batch of transforms.

  Args:
    theta: either raw parameters ``[B, P]`` of the parameterisation
      ``transform`` (see :mod:`stn_jax.transforms`), or, for the names of the
      three families, the transform itself: ``[B, 2, 3]`` for ``'affine'``,
      ``[B, 3, 3]`` for ``'projective'``, ``[B, K, 2]`` source points for
      ``'tps'``.
    out_hw: output size ``(Ho, Wo)``.
    transform: a name from ``stn_jax.transforms.KINDS``.
    control_shape: ``(ny, nx)`` of the TPS control grid, when ``theta`` is raw
      TPS parameters ``[B, 2 * ny * nx]``.
    align_corners: see :mod:`stn_jax.grids`.
  """
  fam = transforms.family(transform)
  matrix_trailing = {"affine": (2, 3), "projective": (3, 3), "tps": np.shape(theta)[1:]}[fam]
  if np.ndim(theta) == 3 and transform == fam and np.shape(theta)[1:] == matrix_trailing:
    matrix = theta
  elif np.ndim(theta) == 2:
    matrix = transforms.params_to_transform(transform, theta, control_shape=control_shape)
  else:
    allowed = f"[B, {transforms.num_params(transform, control_shape=control_shape)}]"
    if transform == fam:
      allowed += f" or {_MATRIX_SHAPES[fam]}"
    raise ValueError(
        f"theta for transform {transform!r} must have shape {allowed}; "
        f"got {v.shape_str(np.shape(theta))}.")
  if fam == "affine":
    return grids.affine_grid(matrix, out_hw, align_corners=align_corners)
  if fam == "projective":
    return grids.projective_grid(matrix, out_hw, align_corners=align_corners)
  target = grids._control_grid_np(*control_shape) if np.ndim(theta) == 2 else None
  return grids.tps_grid(matrix, out_hw, target_points=target, align_corners=align_corners)


def warp(images: jax.Array, theta: jax.Array, out_hw: Optional[Sequence[int]] = None, *,
         transform: str = "affine", method: str = "bilinear", padding_mode: str = "zeros",
         align_corners: bool = False,
         control_shape: Sequence[int] = transforms.DEFAULT_CONTROL_SHAPE) -> jax.Array:
  """Warps ``images [B, H, W, C]`` by a batch of transforms: grid plus sampling.

  ``out[b, i, j] = images[b]`` read at ``T_b(x_j, y_i)``, where ``T_b`` maps
  output to input coordinates. ``theta`` is as in :func:`transform_grid`;
  ``out_hw`` defaults to the input size. Differentiable with respect to
  ``images`` and ``theta``.

  Returns:
    ``[B, Ho, Wo, C]`` in the dtype of ``images``.
  """
  v.check_rank("images", images, 4, "[B, H, W, C]")
  if out_hw is None:
    out_hw = np.shape(images)[1:3]
  if np.ndim(theta) >= 1:
    v.check_same_batch("images", images, "theta", theta)
  grid = transform_grid(theta, out_hw, transform=transform, control_shape=control_shape,
                        align_corners=align_corners)
  return sampling.sample(images, grid, method=method, padding_mode=padding_mode,
                         align_corners=align_corners)
