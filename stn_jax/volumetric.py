"""3-D spatial transformers: affine grids and trilinear sampling of volumes.

The volumetric counterpart of :mod:`stn_jax.grids` and :mod:`stn_jax.sampling`
(the paper's appendix A.3), with the same conventions extended by one axis,
which are also PyTorch's for 5-D ``affine_grid``/``grid_sample`` (except that
volumes are channels-last):

* Volumes are ``[B, D, H, W, C]``: depth, height, width, channels.
* A grid is ``[B, Do, Ho, Wo, 3]``; its last axis is ``(x, y, z)`` in
  normalised coordinates, ``x`` along the width, ``y`` along the height and
  ``z`` along the depth, each from -1 to +1.
* ``align_corners=True``: -1 and +1 are the centres of the corner voxels;
  ``False`` (default): their outer faces.
* A transform maps output coordinates to input coordinates: the grid holds,
  for each output voxel, the point of the input it reads. An affine transform
  is a ``[B, 3, 4]`` matrix acting on ``(x, y, z, 1)``.

Sampling (:func:`sample_volume`) reads ``volumes`` at the grid's points with
``'trilinear'`` (the product of the paper's kernel ``max(0, 1 - |x|)`` along
the three axes) or ``'nearest'`` interpolation, and the padding modes of
:mod:`stn_jax.sampling` (``'zeros'``, ``'border'``, ``'reflection'``).

Guarantees, as in 2-D:

* Non-finite grid points (NaN, +-inf) read 0 in every padding mode; no NaN
  reaches the output or any gradient. Finite coordinates beyond
  :data:`stn_jax.sampling.COORD_LIMIT` are clamped to it.
* Gradients flow to ``volumes`` and to ``grid`` (zero through ``'nearest'``)
  under ``jit``, ``vmap`` and ``grad``, to any order (the trilinear value is
  piecewise multilinear).
* The gradient at voxel centres follows the project's rule (issue 13): where
  a coordinate lies within :data:`PIXEL_CENTRE_TOLERANCE` voxels of an
  integer ``n``, its derivative is the mean of the two one-sided ones,
  ``0.5 * (v[n + 1] - v[n - 1])`` (the padding mode's values outside),
  while the value is the ordinary trilinear value. Each axis therefore reads
  three taps ``n - 1, n, n + 1`` around the nearest voxel ``n``.
* Arguments are checked at trace time (``ValueError`` naming the argument,
  the shape or value got and the one expected). Volumes may be float32,
  bfloat16, float16 or float64; weights and sums are computed in at least
  float32 and the result has the volumes' dtype.

Values match PyTorch's 5-D ``grid_sample(mode='bilinear'|'nearest')`` and
``affine_grid`` (``experiments/benchmarks/check_3d_against_torch.py``).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stn_jax import _validation as v
from stn_jax import coordinates
from stn_jax import sampler_axes
from stn_jax import sampling

METHODS_3D = ("trilinear", "nearest")
# The 2-D sampler's rule (issue 13), the same constant: within this many voxels
# of a voxel centre a coordinate's derivative is the central difference.
PIXEL_CENTRE_TOLERANCE = sampling.PIXEL_CENTRE_TOLERANCE


# --- Argument checks ----------------------------------------------------------------------


def check_dhw(name: str, dhw) -> tuple[int, int, int]:
  """Returns ``dhw`` as three positive Python ints ``(D, H, W)``, or raises."""
  try:
    d, h, w = dhw
    ok = all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0
             for s in (d, h, w))
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"{name} must be three positive integers (depth, height, width); "
                     f"got {dhw!r}.")
  return int(d), int(h), int(w)


def check_sample_volume_args(volumes, grid, method: str, padding_mode: str) -> None:
  """Raises ``ValueError`` for arguments :func:`sample_volume` cannot take."""
  v.check_rank("volumes", volumes, 5, "[B, D, H, W, C]")
  v.check_floating("volumes", volumes)
  v.check_rank("grid", grid, 5, "[B, Do, Ho, Wo, 3]")
  v.check_axis("grid", grid, 4, 3, "[B, Do, Ho, Wo, 3] (last axis (x, y, z))")
  v.check_floating("grid", grid)
  v.check_same_batch("volumes", volumes, "grid", grid)
  v.check_choice("method", method, METHODS_3D)
  v.check_choice("padding_mode", padding_mode, sampling.PADDING_MODES)


# --- Grids --------------------------------------------------------------------------------


def identity_grid_3d(out_dhw: Sequence[int], *, align_corners: bool = False,
                     dtype=jnp.float32) -> jax.Array:
  """The grid of the identity transform: ``[Do, Ho, Wo, 3]`` voxel centres ``(x, y, z)``."""
  d, h, w = check_dhw("out_dhw", out_dhw)
  zs, ys, xs = np.meshgrid(*(coordinates.linspace(n, align_corners) for n in (d, h, w)),
                           indexing="ij")
  return jnp.asarray(np.stack([xs, ys, zs], axis=-1), dtype=dtype)


def affine_grid_3d(theta: jax.Array, out_dhw: Sequence[int], *,
                   align_corners: bool = False) -> jax.Array:
  """Sampling grid of a batch of 3-D affine transforms.

  ``grid[b, k, i, j] = theta[b] @ (x_j, y_i, z_k, 1)``.

  Args:
    theta: ``[B, 3, 4]`` matrices acting on normalised ``(x, y, z, 1)``.
    out_dhw: output size ``(Do, Ho, Wo)``.
    align_corners: see the module docstring.

  Returns:
    ``[B, Do, Ho, Wo, 3]`` grid (at least float32), differentiable with
    respect to ``theta``.
  """
  v.check_rank("theta", theta, 3, "[B, 3, 4]")
  if np.shape(theta)[1:] != (3, 4):
    raise ValueError(f"theta must have shape [B, 3, 4]; got {v.shape_str(np.shape(theta))}.")
  theta = jnp.asarray(theta)
  dtype = coordinates.float_dtype(theta)
  base = identity_grid_3d(out_dhw, align_corners=align_corners, dtype=dtype)
  x, y, z = (base[None, ..., i] for i in range(3))
  m = theta.astype(dtype)[:, None, None, None]     # [B, 1, 1, 1, 3, 4]
  # Written out rather than as a matmul: exact in every precision mode.
  rows = [m[..., r, 0] * x + m[..., r, 1] * y + m[..., r, 2] * z + m[..., r, 3]
          for r in range(3)]
  return jnp.stack(rows, axis=-1)


# --- 3-D transform kinds ------------------------------------------------------------------

# kind -> number of raw parameters. affine: the [3, 4] matrix row-major;
# attention: (s, tx, ty, tz), isotropic scale and translation;
# translation: (tx, ty, tz).
KINDS_3D = {"affine": 12, "attention": 4, "translation": 3}


def identity_params_3d(kind: str = "affine", dtype=jnp.float32) -> jax.Array:
  """The raw ``[P]`` vector of ``kind`` (:data:`KINDS_3D`) whose transform is the identity."""
  v.check_choice("transform", kind, tuple(KINDS_3D))
  vec = {"affine": np.eye(3, 4).reshape(-1), "attention": [1, 0, 0, 0],
         "translation": [0, 0, 0]}[kind]
  return jnp.asarray(vec, dtype=dtype)


def params_to_matrix_3d(kind: str, params: jax.Array) -> jax.Array:
  """Raw parameters ``[B, P]`` of ``kind`` to ``[B, 3, 4]`` affine matrices."""
  v.check_choice("transform", kind, tuple(KINDS_3D))
  p = KINDS_3D[kind]
  v.check_rank("params", params, 2, f"[B, {p}]")
  if np.shape(params)[1] != p:
    raise ValueError(f"params for 3-D transform {kind!r} must have shape [B, {p}]; "
                     f"got {v.shape_str(np.shape(params))}.")
  params = jnp.asarray(params)
  if kind == "affine":
    return params.reshape(-1, 3, 4)
  b = params.shape[0]
  eye = jnp.broadcast_to(jnp.eye(3, dtype=params.dtype), (b, 3, 3))
  if kind == "attention":
    return jnp.concatenate([eye * params[:, :1, None], params[:, 1:, None]], axis=-1)
  return jnp.concatenate([eye, params[:, :, None]], axis=-1)


def rotation_matrix_3d(angles: jax.Array) -> jax.Array:
  """Rotations ``[B, 3, 3]`` from angles ``[B, 3]`` (radians) about x, y and z: ``Rz Ry Rx``."""
  v.check_rank("angles", angles, 2, "[B, 3]")
  v.check_axis("angles", angles, 1, 3, "[B, 3]")
  angles = jnp.asarray(angles)
  c, s = jnp.cos(angles), jnp.sin(angles)
  one, zero = jnp.ones_like(c[:, 0]), jnp.zeros_like(c[:, 0])

  def mat(*rows):
    return jnp.stack([jnp.stack(r, -1) for r in rows], -2)
  rx = mat((one, zero, zero), (zero, c[:, 0], -s[:, 0]), (zero, s[:, 0], c[:, 0]))
  ry = mat((c[:, 1], zero, s[:, 1]), (zero, one, zero), (-s[:, 1], zero, c[:, 1]))
  rz = mat((c[:, 2], -s[:, 2], zero), (s[:, 2], c[:, 2], zero), (zero, zero, one))
  hp = jax.lax.Precision.HIGHEST
  return jnp.matmul(rz, jnp.matmul(ry, rx, precision=hp), precision=hp)


# --- Sampling -----------------------------------------------------------------------------


def _clamp(coord, size: int):
  """Clamps to ``[0, size - 1]``; derivative 1 on the closed interval, 0 outside."""
  return jnp.where(coord < 0, 0.0, jnp.where(coord > size - 1, size - 1.0, coord))


def _pad(coord, size: int, padding_mode: str, align_corners: bool):
  if padding_mode == "border":
    return _clamp(coord, size)
  if padding_mode == "reflection":
    return _clamp(sampler_axes.reflect(coord, size, align_corners), size)
  # 'zeros': beyond 2 voxels out every tap reads 0, so clamping there changes
  # neither values nor gradients and keeps the integer conversion in range.
  return jnp.clip(coord, -3.0, size + 2.0)


def _axis_taps(coord, size: int, method: str, padding_mode: str, align_corners: bool):
  """Voxel indices and weights read along one axis: lists of ``[...]`` arrays.

  ``'trilinear'``: taps ``n - 1, n, n + 1`` around ``n = round(c)`` with the
  value ``hat(c - k)`` each and the derivative of the centre rule (module
  docstring): the weight is ``hat(c0 - k) + slope_k * (c - c0)`` with
  ``c0 = stop_gradient(c)``, so values are exact and ``d weight / dc`` is
  ``slope_k`` (second derivatives 0, as for a piecewise linear kernel).
  """
  c = _pad(coord, size, padding_mode, align_corners)
  c0 = jax.lax.stop_gradient(c)
  n = jnp.round(c0)
  if method == "nearest":
    offsets, weights = [0], [jnp.ones_like(c)]
  else:
    near = jnp.abs(c0 - n) <= PIXEL_CENTRE_TOLERANCE
    offsets, weights = [-1, 0, 1], []
    for d in offsets:
      dist = c0 - (n + d)
      slope = jnp.where(near, 0.5 * d, jnp.where(jnp.abs(dist) < 1, -jnp.sign(dist), 0.0))
      weights.append(jnp.maximum(0.0, 1.0 - jnp.abs(dist)) + slope * (c - c0))
  index = []
  for i, d in enumerate(offsets):
    pos = n + d
    if padding_mode == "zeros":
      weights[i] = jnp.where((pos >= 0) & (pos <= size - 1), weights[i], 0.0)
    elif padding_mode == "reflection":
      pos = _clamp(sampler_axes.reflect(pos, size, align_corners), size)
    index.append(_clamp(pos, size).astype(jnp.int32))  # Border; keeps gathers in bounds.
  return index, weights


def sample_volume(volumes: jax.Array, grid: jax.Array, *, method: str = "trilinear",
                  padding_mode: str = "zeros", align_corners: bool = False) -> jax.Array:
  """Samples ``volumes`` at the normalised points of ``grid``.

  Args:
    volumes: ``[B, D, H, W, C]`` floating-point volumes.
    grid: ``[B, Do, Ho, Wo, 3]`` points ``(x, y, z)`` in normalised coordinates.
    method: ``'trilinear'`` (default) or ``'nearest'``.
    padding_mode: ``'zeros'`` (default), ``'border'`` or ``'reflection'``.
    align_corners: whether -1 and 1 are corner voxel centres (True) or faces.

  Returns:
    ``[B, Do, Ho, Wo, C]`` in the dtype of ``volumes``; differentiable with
    respect to ``volumes`` and ``grid`` (see the module docstring).
  """
  check_sample_volume_args(volumes, grid, method, padding_mode)
  volumes, grid = jnp.asarray(volumes), jnp.asarray(grid)
  b, d, h, w, c = volumes.shape
  _, do, ho, wo, _ = grid.shape
  dtype = coordinates.float_dtype(volumes, grid)
  grid = grid.astype(dtype).reshape(b, do * ho * wo, 3)
  finite = jnp.isfinite(grid).all(axis=-1)
  grid = jnp.where(finite[..., None], grid, 0.0)   # No NaN in any branch.
  grid = jnp.clip(grid, -sampling.COORD_LIMIT, sampling.COORD_LIMIT)
  taps = [_axis_taps(coordinates.to_pixel(grid[..., a], size, align_corners), size, method,
                     padding_mode, align_corners)
          for a, size in enumerate((w, h, d))]
  (ix, wx), (iy, wy), (iz, wz) = taps
  index = jnp.stack([(kz * h + ky) * w + kx for kz in iz for ky in iy for kx in ix], -1)
  weight = jnp.stack([az * ay * ax for az in wz for ay in wy for ax in wx], -1)
  weight = jnp.where(finite[..., None], weight, 0.0)      # [B, P, T]
  flat = volumes.reshape(b, d * h * w, c)
  values = jax.vmap(lambda vol, idx: vol[idx])(flat, index.reshape(b, -1))
  values = values.reshape(b, do * ho * wo, -1, c).astype(dtype)
  out = jnp.einsum("bptc,bpt->bpc", values, weight, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(b, do, ho, wo, c).astype(volumes.dtype)


def warp_volume(volumes: jax.Array, params: jax.Array, out_dhw: Sequence[int], *,
                transform: str = "affine", method: str = "trilinear",
                padding_mode: str = "zeros", align_corners: bool = False) -> jax.Array:
  """Warps ``volumes [B, D, H, W, C]`` by raw 3-D parameters ``[B, P]`` of kind ``transform``.

  Returns ``[B, *out_dhw, C]``; differentiable with respect to both.
  """
  theta = params_to_matrix_3d(transform, params)
  grid = affine_grid_3d(theta, out_dhw, align_corners=align_corners)
  return sample_volume(volumes, grid, method=method, padding_mode=padding_mode,
                       align_corners=align_corners)


# --- Data: the paper's 3-D MNIST (appendix A.3) ----------------------------------------------


def extruded_digits(key: jax.Array, digits: jax.Array, *, size: int = 60,
                    thickness: float = 6.0, max_degrees: float = 45.0,
                    max_shift: float = 8.0) -> jax.Array:
  """Digits extruded into ``size^3`` volumes, randomly rotated and translated in 3-D.

  Each digit ``[28, 28, 1]`` becomes a slab ``thickness`` voxels deep
  (one-voxel linear ramps at its faces) centred in the volume, then rotated
  by angles uniform in ``+-max_degrees`` about x, y and z (``Rz Ry Rx``) and
  shifted by up to ``+-max_shift`` voxels along each axis. Every output voxel
  reads the rotated slab through the inverse transform (bilinear in the
  digit's plane), so the volume is smooth and jit-friendly. With no rotation
  and shift, summing the volume along depth gives ``thickness`` times the
  digit, centred.

  Args:
    key: PRNG key; the same key gives the same volumes.
    digits: ``[B, 28, 28, 1]`` uint8 or float digits.

  Returns:
    float32 ``[B, size, size, size, 1]`` volumes in ``[0, 1]``.
  """
  v.check_rank("digits", digits, 4, "[B, 28, 28, 1]")
  if tuple(np.shape(digits)[1:]) != (28, 28, 1):
    raise ValueError(f"digits must have shape [B, 28, 28, 1]; got {v.shape_str(np.shape(digits))}.")
  digits = jnp.asarray(digits)
  digits = (digits.astype(jnp.float32) / 255.0 if digits.dtype == jnp.uint8
            else digits.astype(jnp.float32))
  b = digits.shape[0]
  k_angle, k_shift = jax.random.split(key)
  angles = jnp.deg2rad(jax.random.uniform(k_angle, (b, 3), minval=-max_degrees,
                                          maxval=max_degrees))
  shift = jax.random.uniform(k_shift, (b, 3), minval=-max_shift, maxval=max_shift)
  rot = rotation_matrix_3d(angles)
  # Output voxel p (voxels from the centre, (x, y, z)) reads q = R^T (p - shift) of the slab.
  centre = (size - 1) / 2
  axis = jnp.arange(size, dtype=jnp.float32) - centre
  zs, ys, xs = jnp.meshgrid(axis, axis, axis, indexing="ij")
  p = jnp.stack([xs, ys, zs], -1).reshape(-1, 3)                        # [P, 3]
  q = jnp.einsum("bji,bpj->bpi", rot, p[None] - shift[:, None],
                 precision=jax.lax.Precision.HIGHEST)                  # [B, P, 3]
  plane = coordinates.from_pixel(q[..., :2] + 13.5, 28, False)         # digit centre 13.5
  inplane = sampling.sample(digits, plane.reshape(b, size * size, size, 2))
  slab = jnp.clip(thickness / 2 + 0.5 - jnp.abs(q[..., 2]), 0.0, 1.0)
  volumes = inplane.reshape(b, size ** 3) * slab
  return jnp.clip(volumes, 0.0, 1.0).reshape(b, size, size, size, 1)
