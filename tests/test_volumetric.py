"""Tests of stn_jax.volumetric: 3-D grids and trilinear sampling against a NumPy oracle."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from stn_jax import modules3d, sampling, volumetric
from tests import oracle

OPTIONS = list(itertools.product(volumetric.METHODS_3D, sampling.PADDING_MODES, (False, True)))
LINEAR_OPTIONS = [o for o in OPTIONS if o[0] == "trilinear"]


def oracle_sample_volume(volumes, grid, method, padding_mode, align_corners):
  """Point by point: the product of the 2-D oracle's per-axis weights over x, y and z."""
  volumes = np.asarray(volumes, np.float64)
  grid = np.asarray(grid, np.float64)
  b, d, h, w, c = volumes.shape
  kind = "bilinear" if method == "trilinear" else "nearest"
  out = np.zeros(grid.shape[:-1] + (c,))
  for idx in np.ndindex(*grid.shape[:-1]):
    point = grid[idx]
    if not np.all(np.isfinite(point)):
      continue
    per_axis = [oracle.axis_weights(oracle.to_pixel(float(p), size, align_corners), size, kind,
                                    padding_mode, align_corners)
                for p, size in zip(point, (w, h, d))]
    for (nx, ax), (ny, ay), (nz, az) in itertools.product(*per_axis):
      out[idx] += ax * ay * az * volumes[idx[0], nz, ny, nx]
  return out


def to_normalised(pixels, size, align_corners):
  if align_corners:
    return 2 * pixels / (size - 1) - 1
  return (2 * pixels + 1) / size - 1


def kink_free_grid(rng, shape, dhw, align_corners, outside):
  """Points whose voxel coordinates keep 0.1 voxel away from every kink of the kernel."""
  lo, hi = (-3, 3) if outside else (0, 0)
  axes = []
  for size in dhw[::-1]:  # x (width), y (height), z (depth)
    whole = rng.integers(lo, size - 1 + hi, shape)
    frac = rng.choice([-1, 1], shape) * rng.uniform(0.1, 0.4, shape)
    axes.append(to_normalised(whole + 0.5 + frac, size, align_corners))
  return np.stack(axes, -1)


def random_grid(rng, shape, far=True):
  grid = rng.uniform(-1.5, 1.5, shape + (3,))
  if far:
    grid[:, 0, 0, 0] = (7.3, -3.1, 0.2)
    grid[:, 0, 0, 1] = (-0.3, 40.2, -250.0)
    grid[:, -1, -1, -1] = (1.3e6, -2.2e5, 3e7)
  return grid


@pytest.mark.parametrize("method,padding_mode,align_corners", OPTIONS)
def test_values_match_oracle(method, padding_mode, align_corners):
  rng = np.random.default_rng(0)
  volumes = rng.standard_normal((2, 4, 5, 3, 2))
  grid = random_grid(rng, (2, 2, 3, 2))
  expected = oracle_sample_volume(volumes, grid, method, padding_mode, align_corners)
  with jax.enable_x64(True):
    got = volumetric.sample_volume(jnp.asarray(volumes), jnp.asarray(grid), method=method,
                                   padding_mode=padding_mode, align_corners=align_corners)
    assert got.dtype == jnp.float64 and got.shape == (2, 2, 3, 2, 2)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-12)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("method", volumetric.METHODS_3D)
def test_identity_transform_returns_input(align_corners, method):
  volumes = np.random.default_rng(1).standard_normal((2, 4, 6, 5, 3)).astype(np.float32)
  params = jnp.broadcast_to(volumetric.identity_params_3d("affine"), (2, 12))
  got = volumetric.warp_volume(volumes, params, (4, 6, 5), method=method,
                               align_corners=align_corners)
  np.testing.assert_allclose(np.asarray(got), volumes, atol=1e-5)


@pytest.mark.parametrize("align_corners", [False, True])
def test_affine_grid_is_theta_times_voxel_centres(align_corners):
  rng = np.random.default_rng(2)
  theta = rng.standard_normal((2, 3, 4))
  d, h, w = 3, 4, 5
  centres = [to_normalised(np.arange(n, dtype=np.float64), n, align_corners) for n in (w, h, d)]
  with jax.enable_x64(True):
    grid = np.asarray(volumetric.affine_grid_3d(jnp.asarray(theta), (d, h, w),
                                                align_corners=align_corners))
  assert grid.shape == (2, d, h, w, 3)
  for b, k, i, j in itertools.product(range(2), range(d), range(h), range(w)):
    point = np.array([centres[0][j], centres[1][i], centres[2][k], 1.0])
    np.testing.assert_allclose(grid[b, k, i, j], theta[b] @ point, atol=1e-12)


def test_one_voxel_translation_along_each_axis():
  volumes = np.random.default_rng(3).standard_normal((1, 4, 5, 6, 1)).astype(np.float32)
  d, h, w = 4, 5, 6
  for axis, size in enumerate((w, h, d)):
    shift = np.zeros((1, 3), np.float32)
    shift[0, axis] = 2 / size   # x_s = x_t + one voxel: the content moves back by one voxel.
    got = np.asarray(volumetric.warp_volume(volumes, shift, (d, h, w), transform="translation"))
    vol_axis = 3 - axis         # x -> W (axis 3), y -> H (2), z -> D (1)
    kept = [slice(None)] * 5
    kept[vol_axis] = slice(0, -1)
    moved = [slice(None)] * 5
    moved[vol_axis] = slice(1, None)
    np.testing.assert_allclose(got[tuple(kept)], volumes[tuple(moved)], atol=1e-5)


def test_quarter_turn_about_z_is_rot90_in_each_slice():
  volumes = np.random.default_rng(4).standard_normal((2, 3, 7, 7, 2)).astype(np.float32)
  rot = volumetric.rotation_matrix_3d(jnp.asarray([[0.0, 0.0, np.pi / 2]] * 2))
  theta = jnp.concatenate([rot, jnp.zeros((2, 3, 1))], -1)
  got = volumetric.sample_volume(volumes, volumetric.affine_grid_3d(theta, (3, 7, 7)))
  np.testing.assert_allclose(np.asarray(got), np.rot90(volumes, k=1, axes=(2, 3)), atol=1e-5)


def test_rotation_matrices_are_proper_rotations():
  angles = jnp.asarray(np.random.default_rng(5).uniform(-3, 3, (4, 3)))
  r = np.asarray(volumetric.rotation_matrix_3d(angles), np.float64)
  np.testing.assert_allclose(r @ r.transpose(0, 2, 1), np.broadcast_to(np.eye(3), r.shape),
                             atol=1e-5)
  np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", list(volumetric.KINDS_3D))
def test_params_to_matrix_kinds(kind):
  rng = np.random.default_rng(6)
  params = rng.standard_normal((3, volumetric.KINDS_3D[kind])).astype(np.float32)
  m = np.asarray(volumetric.params_to_matrix_3d(kind, params))
  assert m.shape == (3, 3, 4)
  if kind == "affine":
    np.testing.assert_array_equal(m.reshape(3, 12), params)
  elif kind == "attention":
    np.testing.assert_allclose(m[:, :, :3], params[:, :1, None] * np.eye(3), atol=0)
    np.testing.assert_array_equal(m[:, :, 3], params[:, 1:])
  else:
    np.testing.assert_array_equal(m[:, :, :3], np.broadcast_to(np.eye(3), (3, 3, 3)))
    np.testing.assert_array_equal(m[:, :, 3], params)
  ident = volumetric.params_to_matrix_3d(kind, volumetric.identity_params_3d(kind)[None])
  np.testing.assert_array_equal(np.asarray(ident)[0], np.eye(3, 4))


@pytest.mark.parametrize("method,padding_mode,align_corners", OPTIONS)
def test_non_finite_points_read_zero_without_nan(method, padding_mode, align_corners):
  rng = np.random.default_rng(7)
  volumes = jnp.asarray(rng.standard_normal((1, 3, 4, 4, 2)), jnp.float32)
  grid = rng.uniform(-0.9, 0.9, (1, 1, 2, 3, 3)).astype(np.float32)
  grid[0, 0, 0] = [(np.nan, 0.1, 0.0), (0.2, np.inf, 0.3), (0.1, 0.1, -np.inf)]
  grid = jnp.asarray(grid)
  sample = functools.partial(volumetric.sample_volume, method=method,
                             padding_mode=padding_mode, align_corners=align_corners)
  out = np.asarray(sample(volumes, grid))
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(out[0, 0, 0], 0.0)
  d_vol, d_grid = jax.grad(lambda a, g: (sample(a, g) ** 2).sum(), (0, 1))(volumes, grid)
  assert np.all(np.isfinite(d_vol)) and np.all(np.isfinite(d_grid))
  np.testing.assert_array_equal(np.asarray(d_grid)[0, 0, 0], 0.0)


@pytest.mark.parametrize("method,padding_mode,align_corners",
                         [("trilinear", "zeros", False), ("trilinear", "reflection", True)])
def test_check_grads_float64(method, padding_mode, align_corners):
  """Orders 1 and 2 in reverse mode (what training uses), float64."""
  rng = np.random.default_rng(8)
  with jax.enable_x64(True):
    volumes = jnp.asarray(rng.standard_normal((1, 3, 4, 3, 1)))
    grid = jnp.asarray(kink_free_grid(rng, (1, 1, 2, 2), (3, 4, 3), align_corners,
                                      outside=True))
    f = jax.jit(functools.partial(volumetric.sample_volume, method=method,
                                  padding_mode=padding_mode, align_corners=align_corners))
    check_grads(f, (volumes, grid), order=2, modes=["rev"], eps=1e-4, atol=1e-5, rtol=1e-5)
    theta = jnp.asarray(np.eye(3, 4) + 0.1 * rng.standard_normal((1, 3, 4)))
    check_grads(jax.jit(lambda t: volumetric.affine_grid_3d(t, (2, 3, 2))), (theta,), order=2,
                modes=["rev"])


@pytest.mark.parametrize("method,padding_mode,align_corners", LINEAR_OPTIONS)
def test_gradients_match_oracle(method, padding_mode, align_corners):
  """Volume gradient: the oracle's interpolation weights; grid gradient: its central differences."""
  rng = np.random.default_rng(9)
  dhw = (3, 4, 5)
  volumes = rng.standard_normal((1, *dhw, 2))
  grid = kink_free_grid(rng, (1, 2, 2, 2), dhw, align_corners, outside=True)
  cotangent = rng.standard_normal((1, 2, 2, 2, 2))
  sample = functools.partial(volumetric.sample_volume, method=method,
                             padding_mode=padding_mode, align_corners=align_corners)
  with jax.enable_x64(True):
    d_vol, d_grid = jax.grad(lambda a, g: (sample(a, g) * cotangent).sum(), (0, 1))(
        jnp.asarray(volumes), jnp.asarray(grid))
  loss = lambda a, g: (oracle_sample_volume(a, g, method, padding_mode,  # noqa: E731
                                            align_corners) * cotangent).sum()
  expected_vol = np.zeros_like(volumes)
  for idx in np.ndindex(*volumes.shape):   # The loss is linear in the volume.
    unit = np.zeros_like(volumes)
    unit[idx] = 1.0
    expected_vol[idx] = loss(unit, grid)
  np.testing.assert_allclose(np.asarray(d_vol), expected_vol, atol=1e-12)
  eps = 1e-6
  expected_grid = np.zeros_like(grid)
  for idx in np.ndindex(*grid.shape):
    up, down = grid.copy(), grid.copy()
    up[idx] += eps
    down[idx] -= eps
    expected_grid[idx] = (loss(volumes, up) - loss(volumes, down)) / (2 * eps)
  np.testing.assert_allclose(np.asarray(d_grid), expected_grid, atol=1e-7)


@pytest.mark.parametrize("offset", [0.0, 5e-5, -5e-5])
@pytest.mark.parametrize("align_corners", [False, True])
def test_gradient_at_voxel_centres_is_the_central_difference(offset, align_corners):
  """Within the tolerance of a voxel centre: 0.5 (v[n+1] - v[n-1]) along each axis."""
  rng = np.random.default_rng(10)
  dhw = (5, 5, 5)
  volumes = rng.standard_normal((1, *dhw, 1))
  voxels = rng.integers(1, 4, (1, 2, 2, 2, 3)) + offset
  grid = to_normalised(voxels, 5, align_corners)
  with jax.enable_x64(True):
    d_grid = jax.grad(lambda g: volumetric.sample_volume(
        jnp.asarray(volumes), g, align_corners=align_corners).sum())(jnp.asarray(grid))
  d_pixel = 2 / (5 - 1) if align_corners else 2 / 5   # d normalised / d voxel
  step = 0.25   # The oracle is linear on each side of the centre: this is the one-sided mean.
  expected = np.zeros_like(grid)
  for idx in np.ndindex(*grid.shape):
    up, down = voxels.copy(), voxels.copy()
    up[idx] = np.round(up[idx]) + step
    down[idx] = np.round(down[idx]) - step
    f = lambda vox: oracle_sample_volume(volumes, to_normalised(vox, 5, align_corners),  # noqa: E731
                                         "trilinear", "zeros", align_corners).sum()
    expected[idx] = (f(up) - f(down)) / (2 * step) / d_pixel
  np.testing.assert_allclose(np.asarray(d_grid), expected, atol=1e-6)


@pytest.mark.parametrize("dtype,atol", [(jnp.bfloat16, 5e-2), (jnp.float16, 5e-3)])
def test_low_precision_volumes(dtype, atol):
  rng = np.random.default_rng(11)
  volumes = rng.uniform(0, 1, (1, 4, 4, 4, 2)).astype(np.float32)
  grid = random_grid(rng, (1, 3, 3, 3), far=False).astype(np.float32)
  reference = volumetric.sample_volume(volumes, grid)
  got = volumetric.sample_volume(jnp.asarray(volumes, dtype), grid)
  assert got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(reference), atol=atol)


def test_jit_and_vmap():
  rng = np.random.default_rng(12)
  volumes = rng.standard_normal((3, 2, 3, 4, 1)).astype(np.float32)
  grid = random_grid(rng, (3, 2, 2, 2), far=False).astype(np.float32)
  direct = volumetric.sample_volume(volumes, grid)
  jitted = jax.jit(volumetric.sample_volume)(volumes, grid)
  mapped = jax.vmap(lambda a, g: volumetric.sample_volume(a[None], g[None])[0])(volumes, grid)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(direct), atol=1e-6)
  np.testing.assert_allclose(np.asarray(mapped), np.asarray(direct), atol=1e-6)


BAD_SAMPLE_ARGS = [
    (dict(volumes=np.zeros((1, 3, 3, 1))), "volumes must have rank 5"),
    (dict(volumes=np.zeros((1, 3, 3, 3, 1), np.int32)), "volumes must have a floating"),
    (dict(grid=np.zeros((1, 2, 2, 3))), "grid must have rank 5"),
    (dict(grid=np.zeros((1, 2, 2, 2, 2))), r"grid must have shape \[B, Do, Ho, Wo, 3\]"),
    (dict(grid=np.zeros((1, 2, 2, 2, 3), np.int32)), "grid must have a floating"),
    (dict(grid=np.zeros((2, 2, 2, 2, 3))), "same batch size"),
    (dict(method="bicubic"), "unknown method 'bicubic'"),
    (dict(padding_mode="wrap"), "unknown padding_mode 'wrap'"),
]


@pytest.mark.parametrize("change,message", BAD_SAMPLE_ARGS)
def test_bad_sample_arguments(change, message):
  args = dict(volumes=np.zeros((1, 3, 3, 3, 1), np.float32),
              grid=np.zeros((1, 2, 2, 2, 3), np.float32), method="trilinear",
              padding_mode="zeros")
  args.update(change)
  with pytest.raises(ValueError, match=message):
    volumetric.sample_volume(args.pop("volumes"), args.pop("grid"), **args)


def test_bad_grid_and_transform_arguments():
  with pytest.raises(ValueError, match=r"theta must have shape \[B, 3, 4\]; got \[2, 2, 3\]"):
    volumetric.affine_grid_3d(np.zeros((2, 2, 3)), (2, 2, 2))
  with pytest.raises(ValueError, match="theta must have rank 3"):
    volumetric.affine_grid_3d(np.zeros((3, 4)), (2, 2, 2))
  for bad in [(2, 2), (2, 0, 2), (2, 2.0, 2), "abc"]:
    with pytest.raises(ValueError, match="out_dhw must be three positive integers"):
      volumetric.identity_grid_3d(bad)
  with pytest.raises(ValueError, match=r"must have shape \[B, 4\]; got \[2, 12\]"):
    volumetric.params_to_matrix_3d("attention", np.zeros((2, 12)))
  with pytest.raises(ValueError, match="unknown transform 'tps'"):
    volumetric.identity_params_3d("tps")
  with pytest.raises(ValueError, match=r"angles must have shape \[B, 3\]"):
    volumetric.rotation_matrix_3d(np.zeros((2, 2)))


def test_spatial_transformer_3d_starts_at_identity_and_trains():
  rngs = nnx.Rngs(0)
  loc = modules3d.LocalisationNet3D((6, 6, 6), 1, conv=((2, 3, True),), hidden=(4,), rngs=rngs)
  st = modules3d.SpatialTransformer3D(loc, out_dhw=(6, 6, 6))
  x = jnp.asarray(np.random.default_rng(13).uniform(0, 1, (2, 6, 6, 6, 1)), jnp.float32)
  warped, params = st(x)
  assert warped.shape == (2, 6, 6, 6, 1) and params.shape == (2, 12)
  np.testing.assert_allclose(np.asarray(warped), np.asarray(x), atol=1e-5)
  grads = nnx.grad(lambda m: (m(x)[0] * x).sum())(st)
  norms = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and sum(norms) > 0
  with pytest.raises(ValueError, match=r"x must have rank 5 with shape \[B, 6, 6, 6, 1\]"):
    st(jnp.zeros((2, 6, 6, 1)))


def test_extruded_digits():
  digits = (np.random.default_rng(14).uniform(0, 1, (2, 28, 28, 1)) > 0.7).astype(np.float32)
  plain = volumetric.extruded_digits(jax.random.key(0), digits, size=36, thickness=4.0,
                                     max_degrees=0.0, max_shift=0.0)
  assert plain.shape == (2, 36, 36, 36, 1) and plain.dtype == jnp.float32
  # No rotation or shift: depth-summed, the digit times the thickness, centred.
  np.testing.assert_allclose(np.asarray(plain).sum(1)[:, 4:32, 4:32], 4.0 * digits, atol=1e-4)
  key = jax.random.key(1)
  moved = volumetric.extruded_digits(key, digits, size=36)
  np.testing.assert_array_equal(moved, volumetric.extruded_digits(key, digits, size=36))
  assert not np.allclose(moved, volumetric.extruded_digits(jax.random.key(2), digits, size=36))
  with pytest.raises(ValueError, match=r"digits must have shape \[B, 28, 28, 1\]"):
    volumetric.extruded_digits(key, np.zeros((2, 28, 28, 3)))
