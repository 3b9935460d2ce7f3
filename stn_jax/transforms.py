"""Transform parameterisations, composition, inversion and coordinate helpers.

A localisation net predicts a raw vector ``params [B, P]``; a *kind* names how
that vector becomes a transform of one of three *families*:

============  ==  =========================================  ===========
kind           P  transform (acting on normalised (x, y))     family
============  ==  =========================================  ===========
affine         6  ``[[a, b, tx], [c, d, ty]]`` (row-major)     affine
attention      3  ``(s, tx, ty)``: ``[[s, 0, tx], [0, s, ty]]``  affine
translation    2  ``(tx, ty)``: ``[[1, 0, tx], [0, 1, ty]]``     affine
rotation       1  ``(phi,)`` radians, about the centre          affine
similarity     4  ``(a, b, tx, ty)``: ``[[a, -b, tx], [b, a, ty]]``
                  with ``a = s cos phi``, ``b = s sin phi``     affine
projective     8  ``[[h0, h1, h2], [h3, h4, h5], [h6, h7, 1]]``   projective
tps           2K  source control points ``[K, 2]`` (x, y)      tps
============  ==  =========================================  ===========

The affine family's transforms are ``[B, 2, 3]`` matrices, the projective
family's ``[B, 3, 3]`` homographies and the tps family's ``[B, K, 2]`` source
control points (see :func:`stn_jax.grids.tps_grid`). As in the paper, a
transform maps output (target) coordinates to input (source) coordinates.

``attention`` is the paper's constrained transform for CUB-200 and
co-localisation (isotropic scale plus translation: it crops and zooms).
Rotations act on normalised coordinates, so they are rigid in pixel space only
for square images.

Every function here is pure and differentiable with respect to its array
arguments.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stn_jax import _validation as v
from stn_jax import grids

KINDS = ("affine", "attention", "translation", "rotation", "similarity",
         "projective", "tps")
_FAMILY = {"affine": "affine", "attention": "affine", "translation": "affine",
           "rotation": "affine", "similarity": "affine",
           "projective": "projective", "tps": "tps"}
_FIXED_SIZES = {"affine": 6, "attention": 3, "translation": 2, "rotation": 1,
                "similarity": 4, "projective": 8}
DEFAULT_CONTROL_SHAPE = (4, 4)  # The paper's TPS: a 4x4 grid of control points.


def family(kind: str) -> str:
  """``'affine'``, ``'projective'`` or ``'tps'``: the form of ``kind``'s transforms."""
  v.check_choice("transform", kind, KINDS)
  return _FAMILY[kind]


def num_params(kind: str, *, control_shape: Sequence[int] = DEFAULT_CONTROL_SHAPE) -> int:
  """Length ``P`` of the raw parameter vector of ``kind``."""
  v.check_choice("transform", kind, KINDS)
  if kind == "tps":
    ny, nx = v.check_hw("control_shape", control_shape)
    return 2 * ny * nx
  return _FIXED_SIZES[kind]


def identity_params(kind: str, *, control_shape: Sequence[int] = DEFAULT_CONTROL_SHAPE,
                    dtype=jnp.float32) -> jax.Array:
  """The raw ``[P]`` vector whose transform is the identity.

  Used as the bias of a localisation net's last layer (whose weights start at
  zero), so that a fresh spatial transformer is the identity map.
  """
  v.check_choice("transform", kind, KINDS)
  if kind == "tps":
    ny, nx = v.check_hw("control_shape", control_shape)
    vec = grids._control_grid_np(ny, nx).reshape(-1)
  else:
    vec = {"affine": [1, 0, 0, 0, 1, 0], "attention": [1, 0, 0],
           "translation": [0, 0], "rotation": [0], "similarity": [1, 0, 0, 0],
           "projective": [1, 0, 0, 0, 1, 0, 0, 0]}[kind]
  return jnp.asarray(vec, dtype=dtype)


def params_to_transform(kind: str, params: jax.Array, *,
                        control_shape: Sequence[int] = DEFAULT_CONTROL_SHAPE) -> jax.Array:
  """Maps raw parameters ``[B, P]`` to ``kind``'s transform (see the module table).

  Returns:
    ``[B, 2, 3]`` for the affine family, ``[B, 3, 3]`` for ``projective`` and
    ``[B, K, 2]`` source control points for ``tps``.
  """
  p = num_params(kind, control_shape=control_shape)
  v.check_rank("params", params, 2, f"[B, {p}]")
  if np.shape(params)[1] != p:
    extra = f" (a {control_shape[0]}x{control_shape[1]} control grid)" if kind == "tps" else ""
    raise ValueError(
        f"params for transform {kind!r}{extra} must have shape [B, {p}]; "
        f"got {v.shape_str(np.shape(params))}.")
  params = jnp.asarray(params)
  if not jnp.issubdtype(params.dtype, jnp.floating):
    params = params.astype(jnp.float32)
  b = params.shape[0]
  zero = jnp.zeros((b,), params.dtype)
  one = jnp.ones((b,), params.dtype)

  def rows(*entries):
    return jnp.stack(entries, axis=-1).reshape(b, 2, 3)

  if kind == "affine":
    return params.reshape(b, 2, 3)
  if kind == "attention":
    s, tx, ty = params.T
    return rows(s, zero, tx, zero, s, ty)
  if kind == "translation":
    tx, ty = params.T
    return rows(one, zero, tx, zero, one, ty)
  if kind == "rotation":
    c, s = jnp.cos(params[:, 0]), jnp.sin(params[:, 0])
    return rows(c, -s, zero, s, c, zero)
  if kind == "similarity":
    a, bb, tx, ty = params.T
    return rows(a, -bb, tx, bb, a, ty)
  if kind == "projective":
    return jnp.concatenate([params, one[:, None]], axis=1).reshape(b, 3, 3)
  return params.reshape(b, -1, 2)  # tps


def _check_matrix(name: str, m) -> None:
  if np.ndim(m) < 2 or np.shape(m)[-2:] not in ((2, 3), (3, 3)):
    raise ValueError(
        f"{name} must be an affine [..., 2, 3] or projective [..., 3, 3] matrix; "
        f"got shape {v.shape_str(np.shape(m))}.")


def to_homogeneous(matrix: jax.Array) -> jax.Array:
  """``[..., 2, 3]`` affine matrices to ``[..., 3, 3]`` (appends ``(0, 0, 1)``); 3x3 unchanged."""
  _check_matrix("matrix", matrix)
  matrix = jnp.asarray(matrix)
  if matrix.shape[-2] == 3:
    return matrix
  last = jnp.broadcast_to(jnp.asarray([0, 0, 1], matrix.dtype), matrix.shape[:-2] + (1, 3))
  return jnp.concatenate([matrix, last], axis=-2)


def _matmul(a, b):
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def compose(outer: jax.Array, inner: jax.Array) -> jax.Array:
  """The transform ``x -> outer(inner(x))``.

  Both are affine ``[..., 2, 3]`` or projective ``[..., 3, 3]`` matrices (batch
  axes broadcast). The result is affine if both are, projective otherwise.
  Since transforms map output to input coordinates, warping with ``inner`` and
  then warping the result with ``outer`` equals one warp with
  ``compose(inner, outer)``.
  """
  _check_matrix("outer", outer)
  _check_matrix("inner", inner)
  both_affine = np.shape(outer)[-2] == 2 and np.shape(inner)[-2] == 2
  product = _matmul(to_homogeneous(outer), to_homogeneous(inner))
  return product[..., :2, :] if both_affine else product


def invert(matrix: jax.Array) -> jax.Array:
  """Inverse of affine ``[..., 2, 3]`` or projective ``[..., 3, 3]`` matrices.

  An affine inverse is affine. A projective inverse is returned scaled so its
  bottom-right entry is 1 where that entry is not ~0 (homographies are defined
  up to scale). Singular matrices give non-finite entries.
  """
  _check_matrix("matrix", matrix)
  matrix = jnp.asarray(matrix)
  if matrix.shape[-2] == 2:
    linear, shift = matrix[..., :2], matrix[..., 2:]
    inv_linear = jnp.linalg.inv(linear)
    return jnp.concatenate([inv_linear, -_matmul(inv_linear, shift)], axis=-1)
  inv = jnp.linalg.inv(matrix)
  scale = inv[..., 2:, 2:]
  ok = jnp.abs(scale) > grids.PROJECTIVE_EPS
  return inv / jnp.where(ok, scale, 1.0)


def normalization_matrix(hw: Sequence[int], *, align_corners: bool = False,
                         dtype=jnp.float32) -> jax.Array:
  """``[3, 3]`` matrix taking pixel ``(x, y, 1)`` to normalised ``(x, y, 1)``.

  Pixel coordinates put the centre of pixel ``(row i, column j)`` at
  ``(x, y) = (j, i)``. Its inverse (:func:`invert`) goes back; a pixel-space
  transform ``P`` becomes ``N_in @ P @ inv(N_out)`` in normalised coordinates.
  """
  h, w = v.check_hw("hw", hw)
  def axis(n):
    if align_corners:
      return (2.0 / (n - 1), -1.0) if n > 1 else (0.0, 0.0)
    return 2.0 / n, 1.0 / n - 1.0
  (sx, ox), (sy, oy) = axis(w), axis(h)
  return jnp.asarray([[sx, 0, ox], [0, sy, oy], [0, 0, 1]], dtype=dtype)


def pixel_transform_to_normalized(matrix: jax.Array, in_hw: Sequence[int],
                                  out_hw: Sequence[int], *,
                                  align_corners: bool = False) -> jax.Array:
  """An output-pixel -> input-pixel transform ``[..., 3, 3]`` in normalised coordinates.

  Returns ``N_in @ matrix @ inv(N_out)`` (:func:`normalization_matrix`): the
  same map acting on normalised coordinates, ready for the grid generators
  (take ``[..., :2, :]`` for an affine ``theta``).
  """
  n_in = normalization_matrix(in_hw, align_corners=align_corners)
  n_out_inv = invert(normalization_matrix(out_hw, align_corners=align_corners))
  return compose(compose(n_in, matrix), n_out_inv)


def pixel_to_normalized(points: jax.Array, hw: Sequence[int], *,
                        align_corners: bool = False) -> jax.Array:
  """Pixel ``(x, y)`` points ``[..., 2]`` of an ``hw`` image to normalised coordinates."""
  v.check_axis("points", points, -1, 2, "[..., 2]")
  m = normalization_matrix(hw, align_corners=align_corners,
                           dtype=grids._float_dtype(points))
  return points * jnp.diagonal(m)[:2] + m[:2, 2]


def normalized_to_pixel(points: jax.Array, hw: Sequence[int], *,
                        align_corners: bool = False) -> jax.Array:
  """Normalised ``(x, y)`` points ``[..., 2]`` to pixel coordinates of an ``hw`` image.

  With ``align_corners=True`` and a side of one pixel, every point maps to 0.
  """
  v.check_axis("points", points, -1, 2, "[..., 2]")
  h, w = v.check_hw("hw", hw)
  points = jnp.asarray(points).astype(grids._float_dtype(points))
  return jnp.stack([grids.to_pixel(points[..., 0], w, align_corners),
                    grids.to_pixel(points[..., 1], h, align_corners)], axis=-1)
