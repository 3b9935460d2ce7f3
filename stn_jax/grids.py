"""Grid generators: where each output pixel samples the input.

Conventions (the same as PyTorch's ``affine_grid``/``grid_sample``, except that
images are channels-last):

* A grid has shape ``[B, Ho, Wo, 2]``; its last axis is ``(x, y)`` in
  normalised coordinates: ``x`` runs along the width and ``y`` along the height,
  from -1 (left/top) to +1 (right/bottom).
* ``align_corners=True``: -1 and +1 are the centres of the corner pixels.
  ``align_corners=False`` (the default): they are the outer edges of the corner
  pixels, so the grid does not depend on the image resolution.
* A transform maps output (target) coordinates to input (source) coordinates,
  ``x_s = T_theta(x_t)``, as in the paper: the grid holds, for each output
  pixel, the point of the input it reads.

The coordinate conventions themselves (pixel centres, ``align_corners``,
normalised <-> pixel conversion, the float dtype rule) live in
:mod:`stn_jax.coordinates`. A grid is computed in the promoted dtype of the
transform (at least float32: float64 in, float64 out). Sizes must be pairs of
positive ints (0 or negative raises ``ValueError`` naming the argument); an
empty batch (``B = 0``) gives an empty grid.

All generators are pure, differentiable with respect to the transform
parameters, and work under ``jit``, ``vmap`` and ``grad``. A transform with a
non-finite entry gives non-finite grid points (which the samplers read as
outside) and finite gradients for the other entries.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stn_jax import _validation as v
from stn_jax import coordinates

# Below this magnitude the homogeneous coordinate of a projective transform is
# treated as zero: the point lies on (or near) the line at infinity and is
# marked as outside the image.
PROJECTIVE_EPS = 1e-6


def identity_grid(out_hw: Sequence[int], *, align_corners: bool = False,
                  dtype=jnp.float32) -> jax.Array:
  """The grid of the identity transform.

  Args:
    out_hw: output size ``(Ho, Wo)``.
    align_corners: see the module docstring.
    dtype: floating dtype of the result.

  Returns:
    ``[Ho, Wo, 2]`` array of ``(x, y)`` normalised pixel-centre coordinates.
  """
  grid = coordinates.pixel_centres(v.check_hw("out_hw", out_hw), align_corners)
  return jnp.asarray(grid, dtype=dtype)


def affine_grid(theta: jax.Array, out_hw: Sequence[int], *,
                align_corners: bool = False) -> jax.Array:
  """Sampling grid of a batch of affine transforms.

  ``grid[b, i, j] = theta[b] @ (x_j, y_i, 1)``.

  Args:
    theta: ``[B, 2, 3]`` affine matrices acting on normalised ``(x, y, 1)``.
    out_hw: output size ``(Ho, Wo)``.
    align_corners: see the module docstring.

  Returns:
    ``[B, Ho, Wo, 2]`` grid, differentiable with respect to ``theta``.
  """
  gx, gy = _apply_rows("theta", theta, (2, 3), out_hw, align_corners)
  return jnp.stack([gx, gy], axis=-1)


def _apply_rows(name: str, matrix, shape: tuple[int, int], out_hw, align_corners):
  """Each row of ``matrix [B, *shape]`` applied to the output pixels' ``(x, y, 1)``.

  Returns one ``[B, Ho, Wo]`` array per row. Written out rather than as a
  matmul: exact in every precision mode, and a few fused multiply-adds per
  output pixel.
  """
  expected = f"[B, {shape[0]}, {shape[1]}]"
  v.check_rank(name, matrix, 3, expected)
  if jnp.shape(matrix)[1:] != shape:
    raise ValueError(f"{name} must have shape {expected}; got {v.shape_str(jnp.shape(matrix))}.")
  matrix = jnp.asarray(matrix)
  dtype = coordinates.float_dtype(matrix)
  base = identity_grid(out_hw, align_corners=align_corners, dtype=dtype)
  x, y = base[None, ..., 0], base[None, ..., 1]
  m = matrix.astype(dtype)[:, None, None]  # [B, 1, 1, rows, 3]
  return [m[..., r, 0] * x + m[..., r, 1] * y + m[..., r, 2] for r in range(shape[0])]


def projective_grid(homography: jax.Array, out_hw: Sequence[int], *,
                    align_corners: bool = False) -> jax.Array:
  """Sampling grid of a batch of projective transforms (homographies).

  ``(u, v, w) = H @ (x, y, 1)`` and the grid holds ``(u / w, v / w)``. Where
  ``|w| < PROJECTIVE_EPS`` (the output point maps to the line at infinity) the
  grid holds ``+inf``, and where ``u``, ``v`` or ``w`` is not finite (a
  non-finite entry of ``homography``) it holds NaN; the sampler treats both as
  outside the image. No NaN reaches the gradient of the finite entries: the
  division is guarded on both sides (double ``where``).

  Args:
    homography: ``[B, 3, 3]`` matrices acting on normalised ``(x, y, 1)``.
    out_hw: output size ``(Ho, Wo)``.
    align_corners: see the module docstring.

  Returns:
    ``[B, Ho, Wo, 2]`` grid, differentiable with respect to ``homography``.
  """
  u, vv, w = _apply_rows("homography", homography, (3, 3), out_hw, align_corners)
  finite = jnp.isfinite(u) & jnp.isfinite(vv) & jnp.isfinite(w)
  valid = finite & (jnp.abs(w) > PROJECTIVE_EPS)
  # Double where: the division only sees safe values, so the cotangent of an
  # invalid point (zero) never meets an infinite partial derivative.
  w_safe = jnp.where(valid, w, 1.0)
  grid = jnp.stack([jnp.where(valid, u, 0.0) / w_safe, jnp.where(valid, vv, 0.0) / w_safe],
                   axis=-1)
  outside = jnp.where(finite, jnp.inf, jnp.nan).astype(grid.dtype)
  return jnp.where(valid[..., None], grid, outside[..., None])


def control_grid(ny: int, nx: int, *, dtype=jnp.float32) -> jax.Array:
  """Regular ``ny x nx`` control points spanning ``[-1, 1]^2``.

  Returns:
    ``[ny * nx, 2]`` points ``(x, y)``, row-major (``y`` varies slowest), with
    the corner points at ``(+-1, +-1)``; :func:`stn_jax.coordinates.control_points`
    in ``dtype``.
  """
  return jnp.asarray(coordinates.control_points(ny, nx), dtype=dtype)


def tps_kernel(sq_dist):
  """Thin-plate spline radial basis ``U(r) = r^2 log r^2`` from ``r^2``, with ``U(0) = 0``.

  Works on NumPy and JAX arrays; safe (finite value and gradient) at 0.
  """
  xp = jnp if isinstance(sq_dist, jax.Array) else np
  positive = sq_dist > 0
  safe = xp.where(positive, sq_dist, 1.0)
  return xp.where(positive, safe * xp.log(safe), 0.0)


def _tps_features(points, target_points):
  """``[N, K + 3]`` features ``(U(|p - t_k|) for k, 1, x, y)`` of points ``[N, 2]``."""
  xp = jnp if isinstance(points, jax.Array) or isinstance(target_points, jax.Array) else np
  diff = points[:, None, :] - target_points[None, :, :]
  radial = tps_kernel((diff ** 2).sum(-1))
  ones = xp.ones((points.shape[0], 1), dtype=radial.dtype)
  return xp.concatenate([radial, ones, points], axis=1)


def _tps_system(target_points):
  """The ``(K+3) x (K+3)`` thin-plate spline system matrix for target points ``[K, 2]``."""
  xp = jnp if isinstance(target_points, jax.Array) else np
  k = target_points.shape[0]
  feats = _tps_features(target_points, target_points)   # [K, K + 3]
  bottom = xp.concatenate([feats[:, k:].T, xp.zeros((3, 3), feats.dtype)], axis=1)
  return xp.concatenate([feats, bottom], axis=0)


def _tps_interpolation(points, target_points):
  """``[N, K]`` matrix ``M`` with ``f(points) = M @ source_points``.

  ``f`` is the thin-plate spline that maps each target point onto its source
  point, so ``M`` depends only on the target points and the query points.
  For JAX target points that are degenerate (:func:`_tps_degeneracy`), ``M``
  is NaN, with a zero gradient: the system is swapped for the identity
  before the solve (double ``where``), so no NaN reaches any gradient.
  """
  xp = jnp if isinstance(points, jax.Array) or isinstance(target_points, jax.Array) else np
  k = target_points.shape[0]
  system = _tps_system(target_points)
  if xp is jnp:
    same, collinear = _tps_degeneracy(jnp.asarray(target_points))
    degenerate = same.any() | collinear | ~jnp.isfinite(system).all()
    system = jnp.where(degenerate, jnp.eye(k + 3, dtype=system.dtype), system)
  # Rows K.. of the right-hand side are zero, so only the first K columns of
  # the inverse matter: solve for them directly.
  rhs = xp.concatenate([xp.eye(k, dtype=system.dtype),
                        xp.zeros((3, k), dtype=system.dtype)], axis=0)
  coeffs = xp.linalg.solve(system, rhs)               # [K + 3, K]
  interp = _tps_features(points, target_points) @ coeffs
  if xp is jnp:
    interp = jnp.where(degenerate, jnp.nan, interp)
  return interp


def _tps_degeneracy(points):
  """``(same, collinear)`` of target points ``[K, 2]`` (NumPy or JAX).

  ``same [K, K]`` marks pairs ``i < j`` of equal points; ``collinear`` is
  whether all points lie on one line (every pair of offsets from the centroid
  has a cross product within a few rounding errors of 0; always true for
  ``K < 3``). The spline system is invertible exactly when neither holds.
  """
  xp = jnp if isinstance(points, jax.Array) else np
  same = xp.triu((points[:, None, :] == points[None, :, :]).all(-1), k=1)
  mean = points.mean(axis=0)
  centred = points - mean
  cross = centred[:, None, 0] * centred[None, :, 1] - centred[:, None, 1] * centred[None, :, 0]
  spread = xp.sqrt((centred ** 2).sum(-1).max())
  tol = 16 * xp.finfo(points.dtype).eps * spread * (spread + xp.sqrt((mean ** 2).sum()))
  return same, xp.abs(cross).max() <= tol


def check_tps_target_points(target_points, name: str = "target_points") -> None:
  """Raises ``ValueError`` unless concrete ``[K, 2]`` points make a solvable spline.

  The thin-plate spline system is invertible exactly when the points are
  finite, pairwise distinct and not all on one line (so that the affine part
  through them is unique); the message names the offending points.
  """
  points = np.asarray(target_points, np.float64)
  finite = np.isfinite(points).all(-1)
  if not finite.all():
    raise ValueError(f"{name} must be finite; points {np.nonzero(~finite)[0].tolist()} are not.")
  same, collinear = _tps_degeneracy(points)
  if same.any():
    pairs = ", ".join(f"{i} and {j}" for i, j in zip(*np.nonzero(same)))
    raise ValueError(
        f"{name} has duplicate points (indices {pairs}); a thin-plate spline needs "
        "distinct control points.")
  if collinear:
    raise ValueError(
        f"{name}: all {len(points)} points lie on one line; a thin-plate spline needs "
        "at least 3 control points that are not collinear.")


@functools.lru_cache(maxsize=64)
def _cached_tps_interpolation(target_bytes: bytes, k: int, out_hw: tuple[int, int],
                              align_corners: bool) -> np.ndarray:
  target = np.frombuffer(target_bytes, dtype=np.float64).reshape(k, 2)
  check_tps_target_points(target)
  base = coordinates.pixel_centres(out_hw, align_corners).reshape(-1, 2)
  m = _tps_interpolation(base, target)
  m.setflags(write=False)
  return m


def _default_target_points(k: int) -> np.ndarray:
  side = int(round(np.sqrt(k)))
  if side * side != k or k < 3:
    raise ValueError(
        f"source_points has K={k} points, which is not a square regular "
        f"control grid (4, 9, 16, 25, ...); pass target_points [K, 2] explicitly.")
  return coordinates.control_points(side, side)


def tps_grid(source_points: jax.Array, out_hw: Sequence[int], *,
             target_points: Optional[jax.Array] = None,
             align_corners: bool = False) -> jax.Array:
  """Sampling grid of a batch of thin-plate spline transforms.

  The spline ``f(p) = a_0 + A p + sum_k w_k U(|p - t_k|)`` with
  ``U(r) = r^2 log r^2`` maps each target control point ``t_k`` exactly onto its
  source point ``s_k`` and has minimal bending energy. ``f`` is linear in the
  source points, ``grid = M @ s`` with an ``[Ho * Wo, K]`` matrix ``M`` that
  depends only on the target points and the output size; for target points
  given as NumPy arrays (or the default control grid), ``M`` is computed once in
  float64 and cached, so a call costs one small matrix product.

  The spline exists only for distinct target points that are not all on one
  line: concrete (NumPy or non-traced JAX) target points that are duplicated,
  collinear or non-finite raise ``ValueError`` naming them
  (:func:`check_tps_target_points`). Target points traced under ``jit`` or
  ``grad`` cannot raise: the same test runs in the trace and a degenerate
  target gives an all-NaN grid (every point reads as outside, so the output
  is 0) with zero, finite gradients.

  Args:
    source_points: ``[B, K, 2]`` source control points ``(x, y)``, normalised.
    out_hw: output size ``(Ho, Wo)``.
    target_points: ``[K, 2]`` target control points; default, the regular
      ``sqrt(K) x sqrt(K)`` grid of :func:`control_grid`. May be a JAX array
      (then ``M`` is solved in the trace, in the working precision).
    align_corners: see the module docstring.

  Returns:
    ``[B, Ho, Wo, 2]`` grid in the promoted dtype of ``source_points`` and JAX
    ``target_points`` (at least float32), differentiable with respect to ``source_points`` (and
    ``target_points`` when it is a JAX array).
  """
  v.check_rank("source_points", source_points, 3, "[B, K, 2]")
  v.check_axis("source_points", source_points, 2, 2, "[B, K, 2]")
  ho, wo = v.check_hw("out_hw", out_hw)
  source_points = jnp.asarray(source_points)
  b, k = source_points.shape[:2]
  if target_points is None:
    target_points = _default_target_points(k)
  v.check_rank("target_points", target_points, 2, f"[{k}, 2]")
  if np.shape(target_points) != (k, 2):
    raise ValueError(
        f"target_points must have shape [{k}, 2] to match source_points "
        f"{v.shape_str(source_points.shape)}; got {v.shape_str(np.shape(target_points))}.")
  interp, degenerate = _interpolation_matrix(source_points, target_points, (ho, wo),
                                             align_corners)
  grid = jnp.einsum("nk,bkd->bnd", interp, source_points.astype(interp.dtype),
                    precision=jax.lax.Precision.HIGHEST)
  if degenerate is not None:
    grid = jnp.where(degenerate, jnp.nan, grid)
  return grid.reshape(b, ho, wo, 2)


def _interpolation_matrix(source_points, target_points, out_hw, align_corners):
  """``(M, degenerate)`` of :func:`tps_grid`: ``M [Ho * Wo, K]`` in the working dtype.

  NumPy target points: ``M`` from the float64 cache (``degenerate`` is None).
  JAX target points: ``M`` solved in the trace; ``degenerate`` is a traced
  bool, and ``M`` is zero where it holds, so that the NaN the caller puts in
  the grid stays out of the source points' gradient (double where).
  """
  k = source_points.shape[1]
  if not isinstance(target_points, jax.Array):
    dtype = coordinates.float_dtype(source_points)
    target = np.ascontiguousarray(target_points, dtype=np.float64)
    cached = _cached_tps_interpolation(target.tobytes(), k, out_hw, align_corners)
    return jnp.asarray(cached, dtype=dtype), None
  dtype = coordinates.float_dtype(source_points, target_points)
  if not isinstance(target_points, jax.core.Tracer):
    check_tps_target_points(target_points)
  base = identity_grid(out_hw, align_corners=align_corners, dtype=dtype).reshape(-1, 2)
  interp = _tps_interpolation(base, target_points.astype(dtype))
  degenerate = jnp.isnan(interp).any()  # _tps_interpolation's mark of a degenerate target.
  return jnp.where(degenerate, 0.0, interp), degenerate
