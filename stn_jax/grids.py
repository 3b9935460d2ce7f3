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

All generators are pure, differentiable with respect to the transform
parameters, and work under ``jit``, ``vmap`` and ``grad``.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stn_jax import _validation as v

# Below this magnitude the homogeneous coordinate of a projective transform is
# treated as zero: the point lies on (or near) the line at infinity and is
# marked as outside the image.
PROJECTIVE_EPS = 1e-6


def _linspace(n: int, align_corners: bool) -> np.ndarray:
  """Normalised pixel-centre positions along one axis, in float64."""
  if align_corners:
    return np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1)
  return (2.0 * np.arange(n) + 1.0) / n - 1.0


def to_pixel(coord, size: int, align_corners: bool):
  """Normalised coordinates along an axis of ``size`` pixels to pixel coordinates.

  Pixel ``i``'s centre is at ``i``. With ``align_corners=True`` and ``size == 1``
  every coordinate maps to 0.
  """
  if align_corners:
    return (coord + 1) * (0.5 * (size - 1))
  return ((coord + 1) * size - 1) * 0.5


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
  ho, wo = v.check_hw("out_hw", out_hw)
  xs = _linspace(wo, align_corners)
  ys = _linspace(ho, align_corners)
  grid = np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1)
  return jnp.asarray(grid, dtype=dtype)


def _float_dtype(x) -> jnp.dtype:
  return jnp.promote_types(jnp.result_type(x), jnp.float32)


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
  dtype = _float_dtype(matrix)
  base = identity_grid(out_hw, align_corners=align_corners, dtype=dtype)
  x, y = base[None, ..., 0], base[None, ..., 1]
  m = matrix.astype(dtype)[:, None, None]  # [B, 1, 1, rows, 3]
  return [m[..., r, 0] * x + m[..., r, 1] * y + m[..., r, 2] for r in range(shape[0])]


def projective_grid(homography: jax.Array, out_hw: Sequence[int], *,
                    align_corners: bool = False) -> jax.Array:
  """Sampling grid of a batch of projective transforms (homographies).

  ``(u, v, w) = H @ (x, y, 1)`` and the grid holds ``(u / w, v / w)``. Where
  ``|w| < PROJECTIVE_EPS`` (the output point maps to the line at infinity) the
  grid holds ``+inf``, which the sampler treats as outside the image: no NaN
  reaches the output or any gradient.

  Args:
    homography: ``[B, 3, 3]`` matrices acting on normalised ``(x, y, 1)``.
    out_hw: output size ``(Ho, Wo)``.
    align_corners: see the module docstring.

  Returns:
    ``[B, Ho, Wo, 2]`` grid, differentiable with respect to ``homography``.
  """
  u, vv, w = _apply_rows("homography", homography, (3, 3), out_hw, align_corners)
  valid = jnp.abs(w) > PROJECTIVE_EPS
  w_safe = jnp.where(valid, w, 1.0)  # Double where: no NaN in the gradient.
  grid = jnp.stack([u / w_safe, vv / w_safe], axis=-1)
  return jnp.where(valid[..., None], grid, jnp.inf)


def control_grid(ny: int, nx: int, *, dtype=jnp.float32) -> jax.Array:
  """Regular ``ny x nx`` control points spanning ``[-1, 1]^2``.

  Returns:
    ``[ny * nx, 2]`` points ``(x, y)``, row-major (``y`` varies slowest), with
    the corner points at ``(+-1, +-1)``.
  """
  return jnp.asarray(_control_grid_np(*v.check_hw("(ny, nx)", (ny, nx))), dtype=dtype)


def _control_grid_np(ny: int, nx: int) -> np.ndarray:
  xs = np.linspace(-1.0, 1.0, nx) if nx > 1 else np.zeros(1)
  ys = np.linspace(-1.0, 1.0, ny) if ny > 1 else np.zeros(1)
  return np.stack(np.meshgrid(xs, ys, indexing="xy"), axis=-1).reshape(-1, 2)


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
  """
  xp = jnp if isinstance(points, jax.Array) or isinstance(target_points, jax.Array) else np
  k = target_points.shape[0]
  system = _tps_system(target_points)
  # Rows K.. of the right-hand side are zero, so only the first K columns of
  # the inverse matter: solve for them directly.
  rhs = xp.concatenate([xp.eye(k, dtype=system.dtype),
                        xp.zeros((3, k), dtype=system.dtype)], axis=0)
  coeffs = xp.linalg.solve(system, rhs)               # [K + 3, K]
  return _tps_features(points, target_points) @ coeffs


@functools.lru_cache(maxsize=64)
def _cached_tps_interpolation(target_bytes: bytes, k: int, out_hw: tuple[int, int],
                              align_corners: bool) -> np.ndarray:
  target = np.frombuffer(target_bytes, dtype=np.float64).reshape(k, 2)
  base = np.stack(np.meshgrid(_linspace(out_hw[1], align_corners),
                              _linspace(out_hw[0], align_corners), indexing="xy"),
                  axis=-1).reshape(-1, 2)
  m = _tps_interpolation(base, target)
  m.setflags(write=False)
  return m


def _default_target_points(k: int) -> np.ndarray:
  side = int(round(np.sqrt(k)))
  if side * side != k or k < 3:
    raise ValueError(
        f"source_points has K={k} points, which is not a square regular "
        f"control grid (4, 9, 16, 25, ...); pass target_points [K, 2] explicitly.")
  return _control_grid_np(side, side)


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

  Args:
    source_points: ``[B, K, 2]`` source control points ``(x, y)``, normalised.
    out_hw: output size ``(Ho, Wo)``.
    target_points: ``[K, 2]`` target control points; default, the regular
      ``sqrt(K) x sqrt(K)`` grid of :func:`control_grid`. May be a JAX array
      (then ``M`` is solved in the trace, in the working precision).
    align_corners: see the module docstring.

  Returns:
    ``[B, Ho, Wo, 2]`` grid, differentiable with respect to ``source_points``
    (and ``target_points`` when it is a JAX array).
  """
  v.check_rank("source_points", source_points, 3, "[B, K, 2]")
  v.check_axis("source_points", source_points, 2, 2, "[B, K, 2]")
  ho, wo = v.check_hw("out_hw", out_hw)
  source_points = jnp.asarray(source_points)
  k = source_points.shape[1]
  dtype = _float_dtype(source_points)
  if target_points is None:
    target_points = _default_target_points(k)
  v.check_rank("target_points", target_points, 2, f"[{k}, 2]")
  if np.shape(target_points) != (k, 2):
    raise ValueError(
        f"target_points must have shape [{k}, 2] to match source_points "
        f"{v.shape_str(source_points.shape)}; got {v.shape_str(np.shape(target_points))}.")
  if isinstance(target_points, jax.Array):
    base = identity_grid((ho, wo), align_corners=align_corners, dtype=dtype).reshape(-1, 2)
    interp = _tps_interpolation(base, target_points.astype(dtype))
  else:
    target = np.ascontiguousarray(target_points, dtype=np.float64)
    interp = jnp.asarray(
        _cached_tps_interpolation(target.tobytes(), k, (ho, wo), align_corners), dtype=dtype)
  grid = jnp.einsum("nk,bkd->bnd", interp, source_points.astype(dtype),
                    precision=jax.lax.Precision.HIGHEST)
  return grid.reshape(-1, ho, wo, 2)
