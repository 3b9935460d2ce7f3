"""Coordinate conventions: the one place that says where a pixel is.

Every other module (grids, samplers, transforms, distortions, figures) converts
between coordinate systems through these functions, so the conventions live
here only:

* **Normalised coordinates** ``(x, y)``: ``x`` runs along the width and ``y``
  along the height, from -1 (left/top) to +1 (right/bottom), as PyTorch's
  ``affine_grid``/``grid_sample``.
* **Pixel coordinates** ``(x, y)``: the centre of pixel (row ``i``, column
  ``j``) is at ``(x, y) = (j, i)``.
* ``align_corners=True``: -1 and +1 are the centres of the corner pixels (an
  axis of one pixel maps every coordinate to pixel 0). ``align_corners=False``
  (the default): they are the outer edges of the corner pixels, so normalised
  positions do not depend on the resolution.
* **Float dtype rule** (:func:`float_dtype`): coordinates are computed in the
  promoted dtype of the inputs, and at least float32: float64 in gives float64
  out; float16/bfloat16 (or integer) coordinates are computed and returned in
  float32, since half precision cannot address pixels of even small images.
* Sizes are ``(height, width)`` pairs of positive ints; 0 or negative sizes
  raise ``ValueError`` naming the argument.

The NumPy helpers (:func:`linspace`, :func:`pixel_centres`,
:func:`control_points`) return float64 constants that callers cast once to
their working dtype; :func:`to_pixel`/:func:`from_pixel` are elementwise and
work on NumPy and JAX arrays alike. Everything here is differentiable where
it takes JAX arrays.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stn_jax import _validation as v


def float_dtype(*xs: Any) -> jnp.dtype:
  """The dtype coordinates derived from ``xs`` are computed in: promoted, at least float32."""
  return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def _pixel_scale_offset(size: int, align_corners: bool) -> tuple[float, float]:
  """``(scale, offset)`` with ``pixel = scale * normalised + offset`` along one axis."""
  if align_corners:
    half = 0.5 * (size - 1)
    return half, half
  return 0.5 * size, 0.5 * (size - 1)


def _normalized_scale_offset(size: int, align_corners: bool) -> tuple[float, float]:
  """``(scale, offset)`` with ``normalised = scale * pixel + offset`` along one axis."""
  if align_corners:
    return (2.0 / (size - 1), -1.0) if size > 1 else (0.0, 0.0)
  return 2.0 / size, 1.0 / size - 1.0


def to_pixel(coord, size: int, align_corners: bool):
  """Normalised coordinates along an axis of ``size`` pixels to pixel coordinates.

  Elementwise, NumPy or JAX. Pixel ``i``'s centre is at ``i``. With
  ``align_corners=True`` and ``size == 1`` every coordinate maps to 0.
  """
  if align_corners:
    return (coord + 1) * (0.5 * (size - 1))
  return ((coord + 1) * size - 1) * 0.5


def from_pixel(coord, size: int, align_corners: bool):
  """Pixel coordinates along an axis of ``size`` pixels to normalised ones.

  Elementwise, NumPy or JAX; the inverse of :func:`to_pixel` (with
  ``align_corners=True`` and ``size == 1`` every coordinate maps to 0).
  """
  scale, offset = _normalized_scale_offset(size, align_corners)
  return coord * scale + offset


def linspace(n: int, align_corners: bool) -> np.ndarray:
  """Normalised positions of the ``n`` pixel centres along one axis, float64 ``[n]``."""
  if align_corners:
    return np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1)
  return (2.0 * np.arange(n) + 1.0) / n - 1.0


def pixel_centres(hw: Sequence[int], align_corners: bool) -> np.ndarray:
  """Normalised ``(x, y)`` of every pixel centre of an ``hw`` image, float64 ``[H, W, 2]``."""
  h, w = v.check_hw("hw", hw)
  return np.stack(np.meshgrid(linspace(w, align_corners), linspace(h, align_corners),
                              indexing="xy"), axis=-1)


def control_points(ny: int, nx: int) -> np.ndarray:
  """Regular ``ny x nx`` control points spanning ``[-1, 1]^2``, float64 ``[ny * nx, 2]``.

  Points are ``(x, y)``, row-major (``y`` varies slowest), with the corners at
  ``(+-1, +-1)`` (a side of one point sits at 0).
  """
  ny, nx = v.check_hw("(ny, nx)", (ny, nx))
  return pixel_centres((ny, nx), align_corners=True).reshape(-1, 2)


def normalization_matrix(hw: Sequence[int], *, align_corners: bool = False,
                         dtype=jnp.float32) -> jax.Array:
  """``[3, 3]`` matrix taking pixel ``(x, y, 1)`` to normalised ``(x, y, 1)``.

  A pixel-space transform ``P`` becomes ``N_in @ P @ inv(N_out)`` in
  normalised coordinates (:func:`pixel_transform_to_normalized`). With
  ``align_corners=True`` an axis of one pixel maps every pixel to 0 (the
  matrix is then singular).
  """
  matrix = _axis_matrix(v.check_hw("hw", hw), align_corners, _normalized_scale_offset)
  return jnp.asarray(matrix, dtype=dtype)


def _axis_matrix(hw: tuple[int, int], align_corners: bool, scale_offset) -> np.ndarray:
  """``[3, 3]`` float64 matrix of ``scale_offset`` along x (the width) and y (the height)."""
  (sx, ox), (sy, oy) = scale_offset(hw[1], align_corners), scale_offset(hw[0], align_corners)
  return np.asarray([[sx, 0, ox], [0, sy, oy], [0, 0, 1]], np.float64)


def pixel_transform_to_normalized(matrix: jax.Array, in_hw: Sequence[int],
                                  out_hw: Sequence[int], *,
                                  align_corners: bool = False) -> jax.Array:
  """An output-pixel -> input-pixel transform ``[..., 3, 3]`` in normalised coordinates.

  Returns ``N_in @ matrix @ P_out`` where ``N_in`` is
  :func:`normalization_matrix` of the input and ``P_out`` its inverse for the
  output (the matrix of :func:`to_pixel`, exact in binary floating point): the
  same map acting on normalised coordinates, ready for the grid generators
  (take ``[..., :2, :]`` for an affine ``theta``). Computed in
  :func:`float_dtype` of ``matrix`` (float64 stays float64). Differentiable
  with respect to ``matrix``.
  """
  if np.ndim(matrix) < 2 or np.shape(matrix)[-2:] not in ((2, 3), (3, 3)):
    raise ValueError(
        "matrix must be a pixel-space affine [..., 2, 3] or projective [..., 3, 3] matrix; "
        f"got shape {v.shape_str(np.shape(matrix))}.")
  dtype = float_dtype(matrix)
  matrix = jnp.asarray(matrix, dtype)
  if matrix.shape[-2] == 2:  # Affine: append the row (0, 0, 1).
    last = jnp.broadcast_to(jnp.asarray([0, 0, 1], dtype), matrix.shape[:-2] + (1, 3))
    matrix = jnp.concatenate([matrix, last], axis=-2)
  n_in = _axis_matrix(v.check_hw("in_hw", in_hw), align_corners, _normalized_scale_offset)
  p_out = _axis_matrix(v.check_hw("out_hw", out_hw), align_corners, _pixel_scale_offset)
  n_in, p_out = jnp.asarray(n_in, dtype), jnp.asarray(p_out, dtype)
  highest = jax.lax.Precision.HIGHEST
  return jnp.matmul(jnp.matmul(n_in, matrix, precision=highest), p_out, precision=highest)


def pixel_to_normalized(points: jax.Array, hw: Sequence[int], *,
                        align_corners: bool = False) -> jax.Array:
  """Pixel ``(x, y)`` points ``[..., 2]`` of an ``hw`` image to normalised coordinates.

  Computed in :func:`float_dtype` of ``points``.
  """
  v.check_axis("points", points, -1, 2, "[..., 2]")
  h, w = v.check_hw("hw", hw)
  points = jnp.asarray(points).astype(float_dtype(points))
  return jnp.stack([from_pixel(points[..., 0], w, align_corners),
                    from_pixel(points[..., 1], h, align_corners)], axis=-1)


def normalized_to_pixel(points: jax.Array, hw: Sequence[int], *,
                        align_corners: bool = False) -> jax.Array:
  """Normalised ``(x, y)`` points ``[..., 2]`` to pixel coordinates of an ``hw`` image.

  Computed in :func:`float_dtype` of ``points``. With ``align_corners=True``
  and a side of one pixel, every point maps to 0.
  """
  v.check_axis("points", points, -1, 2, "[..., 2]")
  h, w = v.check_hw("hw", hw)
  points = jnp.asarray(points).astype(float_dtype(points))
  return jnp.stack([to_pixel(points[..., 0], w, align_corners),
                    to_pixel(points[..., 1], h, align_corners)], axis=-1)
