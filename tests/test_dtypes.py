"""Dtypes across the public functional API (issue 13): float64 is never silently float32.

One table, one test: each row is a public function (coordinates, grids,
transforms, warping, sampling, distortions), how to build its arguments in a
given float dtype, the dtype its result must have, and an independent float64
NumPy/SciPy reference. Every row runs with float32 and float64 inputs (under
``jax_enable_x64``); float64 results must match the float64 reference to
~1e-12, float32 results to float32 rounding. Rows for samplers and warps also
run with bfloat16/float16 images, which are computed in float32 and returned
in the images' dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.interpolate import RBFInterpolator

import stn_jax
from stn_jax import coordinates
from stn_jax import distortions
from stn_jax import grids
from stn_jax import transforms
from tests import oracle

RNG = np.random.default_rng(0)
IMAGES = RNG.uniform(0, 1, (2, 6, 7, 3))
THETA = np.asarray([[1, 0, 0, 0, 1, 0.]]) + 0.2 * RNG.standard_normal((2, 6))
HOMOGRAPHY = np.eye(3) + 0.1 * RNG.standard_normal((2, 3, 3))
CONTROLS = np.stack(np.meshgrid(np.linspace(-1, 1, 3), np.linspace(-1, 1, 3)), -1).reshape(9, 2)
SOURCE = CONTROLS[None] + 0.1 * RNG.standard_normal((2, 9, 2))
POINTS = RNG.uniform(-2, 9, (5, 2))
DIGITS = RNG.uniform(0, 1, (2, 28, 28, 1))
KEY = 7


# --- Independent float64 references --------------------------------------------------------

def centres(n, align_corners):
  """Normalised pixel-centre positions along an axis, written from the definition."""
  j = np.arange(n, dtype=np.float64)
  if align_corners:
    return -1 + 2 * j / (n - 1) if n > 1 else np.zeros(1)
  return (2 * j + 1) / n - 1


def base_grid(hw, align_corners=False):
  return np.stack(np.meshgrid(centres(hw[1], align_corners), centres(hw[0], align_corners)), -1)


def apply_np(matrix, hw):
  """``[B, 2|3, 3]`` matrices applied to the normalised pixel centres of ``hw``."""
  homog = np.concatenate([base_grid(hw), np.ones(tuple(hw) + (1,))], -1)
  out = np.einsum("bij,hwj->bhwi", matrix, homog)
  return out if matrix.shape[1] == 2 else out[..., :2] / out[..., 2:]


def tps_np(source, hw, target=CONTROLS):
  query = base_grid(hw).reshape(-1, 2)
  return np.stack([RBFInterpolator(target, s, kernel="thin_plate_spline", degree=1)(query)
                   for s in source]).reshape((len(source),) + tuple(hw) + (2,))


def to_normalized_np(hw):
  m = np.eye(3)
  for axis, n in enumerate(hw[::-1]):
    m[axis, axis], m[axis, 2] = 2 / n, 1 / n - 1
  return m


def params_np(kind, p):
  """Raw parameters -> transform, from the documented table."""
  if kind == "rotation":
    c, s = np.cos(p[:, 0]), np.sin(p[:, 0])
    return np.stack([c, -s, 0 * c, s, c, 0 * c], -1).reshape(-1, 2, 3)
  if kind == "similarity":
    a, b, tx, ty = p.T
    return np.stack([a, -b, tx, b, a, ty], -1).reshape(-1, 2, 3)
  return np.concatenate([p, np.ones((len(p), 1))], 1).reshape(-1, 3, 3)   # projective


def rotate_np(digits, key):
  """distortions.rotate from its definition: rotation about the centre, bilinear, zeros."""
  angle = np.deg2rad(np.asarray(jax.random.uniform(jax.random.key(key), (len(digits),),
                                                   dtype=jnp.float64, minval=-90, maxval=90)))
  px = np.stack(np.meshgrid(np.arange(28.0), np.arange(28.0)), -1) - 13.5    # output pixels
  c, s = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
  src = np.stack([c * px[..., 0] + s * px[..., 1], -s * px[..., 0] + c * px[..., 1]], -1) + 13.5
  return oracle.sample(digits, (2 * src + 1) / 28 - 1)


def elastic_np(digits, key):
  """distortions.elastic from its definition (its random draws, then a float64 spline)."""
  k_scale, k_noise = jax.random.split(jax.random.key(key))
  scale = np.asarray(jax.random.uniform(k_scale, (len(digits), 1, 1), dtype=jnp.float64,
                                        minval=0.75, maxval=1.0))
  noise = 1.5 * np.asarray(jax.random.normal(k_noise, (len(digits), 16, 2), dtype=jnp.float64))
  target = np.stack(np.meshgrid(np.linspace(-1, 1, 4), np.linspace(-1, 1, 4)), -1).reshape(16, 2)
  source = target[None] / scale + noise * (2 / 28)
  return oracle.sample(digits, tps_np(source, (28, 28), target))


# --- The table ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  call: Callable[..., Any]              # the public function, on the cast arguments
  args: tuple                           # float64 NumPy arrays (cast to the tested dtype) or other
  reference: Optional[Callable[..., np.ndarray]]  # float64 reference on the float64 arguments
  out_dtype: Callable[[Any], Any] = lambda dtype: dtype  # result dtype for an input dtype
  images_arg: Optional[int] = None      # index of an images argument: also tried in bf16/f16
  tolerance: float = 1e-12


def _fixed(dtype):
  return lambda _: dtype


ROWS = [
    # coordinates
    Row("coordinates.to_pixel", lambda c: coordinates.to_pixel(c, 7, False), (POINTS[:, 0],),
        lambda c: oracle.to_pixel(c, 7, False)),
    Row("coordinates.from_pixel", lambda c: coordinates.from_pixel(c, 7, True), (POINTS[:, 0],),
        lambda c: 2 * c / 6 - 1),
    Row("coordinates.pixel_to_normalized",
        lambda p: coordinates.pixel_to_normalized(p, (6, 7)), (POINTS,),
        lambda p: (2 * p + 1) / np.asarray([7, 6]) - 1),
    Row("coordinates.normalized_to_pixel",
        lambda p: coordinates.normalized_to_pixel(p, (6, 7), align_corners=True), (POINTS / 9,),
        lambda p: np.stack([oracle.to_pixel(p[:, 0], 7, True),
                            oracle.to_pixel(p[:, 1], 6, True)], -1)),
    Row("coordinates.pixel_transform_to_normalized",
        lambda m: coordinates.pixel_transform_to_normalized(m, (28, 28), (42, 42)), (HOMOGRAPHY,),
        lambda m: to_normalized_np((28, 28)) @ m @ np.linalg.inv(to_normalized_np((42, 42)))),
    Row("coordinates.normalization_matrix",
        lambda: coordinates.normalization_matrix((5, 9), dtype=jnp.float64), (),
        lambda: to_normalized_np((5, 9)), _fixed(jnp.float64)),
    # grids
    Row("grids.identity_grid", lambda: grids.identity_grid((3, 5), dtype=jnp.float64), (),
        lambda: base_grid((3, 5)), _fixed(jnp.float64)),
    Row("grids.affine_grid", lambda t: grids.affine_grid(t, (4, 5)), (THETA.reshape(2, 2, 3),),
        lambda t: apply_np(t, (4, 5))),
    Row("grids.projective_grid", lambda h: grids.projective_grid(h, (4, 5)), (HOMOGRAPHY,),
        lambda h: apply_np(h, (4, 5))),
    Row("grids.control_grid", lambda: grids.control_grid(3, 3, dtype=jnp.float64), (),
        lambda: CONTROLS, _fixed(jnp.float64)),
    Row("grids.tps_grid", lambda s: grids.tps_grid(s, (4, 5)), (SOURCE,),
        lambda s: tps_np(s, (4, 5)), tolerance=1e-11),
    Row("grids.tps_grid (JAX target points)",
        lambda s, t: grids.tps_grid(s, (4, 5), target_points=t), (SOURCE, CONTROLS + 0.01),
        lambda s, t: tps_np(s, (4, 5), t), tolerance=1e-11),
    Row("grids.tps_kernel", grids.tps_kernel, (np.abs(POINTS[:, 0]),),
        lambda r2: r2 * np.log(r2)),
    # transforms
    Row("transforms.identity_params",
        lambda: transforms.identity_params("similarity", dtype=jnp.float64), (),
        lambda: np.asarray([1.0, 0, 0, 0]), _fixed(jnp.float64)),
    *[Row(f"transforms.params_to_transform[{kind}]",
          lambda p, kind=kind: transforms.params_to_transform(kind, p), (p,),
          lambda p, kind=kind: params_np(kind, p))
      for kind, p in (("rotation", POINTS[:, :1]), ("similarity", THETA[:, :4]),
                      ("projective", HOMOGRAPHY.reshape(2, 9)[:, :8]))],
    Row("transforms.to_homogeneous", transforms.to_homogeneous, (THETA.reshape(2, 2, 3),),
        lambda t: np.concatenate([t, np.tile([[[0, 0, 1.0]]], (2, 1, 1))], 1)),
    Row("transforms.compose", transforms.compose, (HOMOGRAPHY, THETA.reshape(2, 2, 3)),
        lambda h, t: h @ np.concatenate([t, np.tile([[[0, 0, 1.0]]], (2, 1, 1))], 1)),
    Row("transforms.invert", transforms.invert, (HOMOGRAPHY,),
        lambda h: np.linalg.inv(h) / np.linalg.inv(h)[:, 2:, 2:]),
    # warping
    Row("warping.transform_grid[projective]",
        lambda p: stn_jax.transform_grid(p, (4, 5), transform="projective"),
        (HOMOGRAPHY.reshape(2, 9)[:, :8],),
        lambda p: apply_np(params_np("projective", p), (4, 5))),
    Row("warping.transform_grid[tps]",
        lambda p: stn_jax.transform_grid(p, (4, 5), transform="tps", control_shape=(3, 3)),
        (SOURCE.reshape(2, 18),), lambda p: tps_np(p.reshape(2, 9, 2), (4, 5)), tolerance=1e-11),
    Row("warping.warp", lambda im, t: stn_jax.warp(im, t, (5, 4)), (IMAGES, THETA),
        lambda im, t: oracle.sample(im, apply_np(t.reshape(2, 2, 3), (5, 4))), images_arg=0),
    # sampling: every method, and the gather-free implementation
    *[Row(f"sampling.sample[{method}, {implementation}]",
          lambda im, g, method=method, implementation=implementation: stn_jax.sample(
              im, g, method=method, padding_mode="reflection" if method == "bicubic" else "zeros",
              implementation=implementation),
          (IMAGES, apply_np(THETA.reshape(2, 2, 3), (5, 4))),
          lambda im, g, method=method: oracle.sample(
              im, g, method, "reflection" if method == "bicubic" else "zeros"), images_arg=0)
      for method, implementation in (("bilinear", "auto"), ("bilinear", "xla"),
                                     ("bilinear", "matmul"), ("nearest", "auto"),
                                     ("bicubic", "auto"))],
    # distortions: the generators follow the digits' dtype; the pipeline is float32.
    Row("distortions.rotate", lambda d: distortions.rotate(jax.random.key(KEY), d), (DIGITS,),
        lambda d: rotate_np(d, KEY), tolerance=1e-11),
    Row("distortions.elastic", lambda d: distortions.elastic(jax.random.key(KEY), d), (DIGITS,),
        lambda d: elastic_np(d, KEY), tolerance=1e-11),
    Row("distortions.translate", lambda d: distortions.translate(jax.random.key(KEY), d),
        (DIGITS,), None),
    *[Row(f"distortions.distort[{variant}]",
          lambda d, variant=variant: distortions.distort(jax.random.key(KEY), d, variant),
          (DIGITS,), None, _fixed(jnp.float32))
      for variant in ("R", "E")],   # The pipeline's float32 contract (two variants: time).
    Row("distortions.to_float", distortions.to_float, (DIGITS,), lambda d: d,
        _fixed(jnp.float32), tolerance=1e-7),
]


def _cases():
  for row in ROWS:
    for dtype in ("float32", "float64"):
      yield pytest.param(row, dtype, id=f"{row.name}-{dtype}")
    if row.images_arg is not None:
      for dtype in ("bfloat16", "float16"):
        yield pytest.param(row, dtype, id=f"{row.name}-{dtype} images")


@pytest.mark.parametrize("row,dtype", list(_cases()))
def test_public_function_keeps_dtype(row, dtype):
  half = dtype in ("bfloat16", "float16")
  with jax.enable_x64(True):
    if half:  # Half-precision images, float32 everything else.
      args = [jnp.asarray(a, jnp.float32) for a in row.args]
      args[row.images_arg] = jnp.asarray(row.args[row.images_arg], dtype)
      expected_dtype = jnp.dtype(dtype)
    else:
      args = [jnp.asarray(a, dtype) for a in row.args]
      expected_dtype = jnp.dtype(row.out_dtype(jnp.dtype(dtype)))
    out = row.call(*args)
    assert out.dtype == expected_dtype, f"{row.name}: {out.dtype} != {expected_dtype}"
    if row.reference is None:
      return
    # The reference sees exactly the values the function got (rounded to dtype).
    expected = row.reference(*[np.asarray(a, np.float64) for a in args])
  if dtype == "float64":
    np.testing.assert_allclose(np.asarray(out), expected, rtol=0, atol=row.tolerance)
  else:
    scale = max(1.0, float(np.abs(expected).max()))
    tol = {"float32": 2e-5, "bfloat16": 1e-2, "float16": 2e-3}[dtype] * scale
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=0, atol=tol)
