"""Grid generation plus sampling in one call.

:func:`transform_grid` looks the transform up in the tables of
:mod:`stn_jax.transforms` (its kind, then its family's grid function) and
:func:`warp` samples the images there with :func:`stn_jax.sampling.sample`;
nothing here is specific to one kind or family.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np

from stn_jax import _validation as v
from stn_jax import sampling
from stn_jax import transforms


def transform_grid(theta: jax.Array, out_hw: Sequence[int], *, transform: str = "affine",
                   control_shape: Sequence[int] = transforms.DEFAULT_CONTROL_SHAPE,
                   align_corners: bool = False) -> jax.Array:
  """The sampling grid ``[B, Ho, Wo, 2]`` of a batch of transforms.

  Args:
    theta: either raw parameters ``[B, P]`` of the parameterisation
      ``transform`` (see :mod:`stn_jax.transforms`), or, for the names of the
      three families, the transform itself: ``[B, 2, 3]`` for ``'affine'``,
      ``[B, 3, 3]`` for ``'projective'``, ``[B, K, 2]`` source points for
      ``'tps'`` (on the regular ``sqrt(K) x sqrt(K)`` control grid).
    out_hw: output size ``(Ho, Wo)``, positive ints (else ``ValueError``).
    transform: a name from ``stn_jax.transforms.KINDS``.
    control_shape: ``(ny, nx)`` of the TPS control grid, when ``theta`` is raw
      TPS parameters ``[B, 2 * ny * nx]``.
    align_corners: see :mod:`stn_jax.coordinates`.

  Returns:
    The grid in the dtype of ``theta`` (at least float32), differentiable with
    respect to ``theta``; an empty batch gives an empty grid.
  """
  fam = transforms.FAMILIES[transforms.family(transform)]
  if np.ndim(theta) == 2:
    matrix = transforms.params_to_transform(transform, theta, control_shape=control_shape)
    return fam.grid(matrix, out_hw, align_corners, tuple(control_shape))
  if transform == fam.name and fam.accepts(np.shape(theta)):
    return fam.grid(theta, out_hw, align_corners, None)
  allowed = f"[B, {transforms.num_params(transform, control_shape=control_shape)}]"
  if transform == fam.name:
    allowed += f" or {fam.shape_str()}"
  raise ValueError(
      f"theta for transform {transform!r} must have shape {allowed}; "
      f"got {v.shape_str(np.shape(theta))}.")


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
