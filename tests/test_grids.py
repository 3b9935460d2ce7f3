"""Tests of stn_jax.grids."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

import stn_jax
from stn_jax import grids


def test_identity_grid_pixel_centres():
  g = np.asarray(stn_jax.identity_grid((2, 4)))
  assert g.shape == (2, 4, 2) and g.dtype == np.float32
  np.testing.assert_allclose(g[0, :, 0], [-0.75, -0.25, 0.25, 0.75])
  np.testing.assert_allclose(g[:, 0, 1], [-0.5, 0.5])
  g = np.asarray(stn_jax.identity_grid((3, 4), align_corners=True))
  np.testing.assert_allclose(g[0, :, 0], [-1, -1 / 3, 1 / 3, 1], atol=1e-7)
  np.testing.assert_allclose(g[:, 0, 1], [-1, 0, 1])
  # A single row or column sits at the centre.
  np.testing.assert_allclose(stn_jax.identity_grid((1, 1), align_corners=True), [[[0, 0]]])


def test_affine_grid_matches_formula():
  rng = np.random.default_rng(0)
  theta = rng.standard_normal((3, 2, 3)).astype(np.float32)
  got = np.asarray(stn_jax.affine_grid(theta, (4, 5)))
  base = np.asarray(stn_jax.identity_grid((4, 5)))
  homog = np.concatenate([base, np.ones((4, 5, 1))], -1)
  expected = np.einsum("bij,hwj->bhwi", theta.astype(np.float64), homog)
  np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("align_corners", [False, True])
def test_projective_with_affine_last_row_equals_affine(align_corners):
  rng = np.random.default_rng(1)
  theta = rng.standard_normal((2, 2, 3)).astype(np.float32)
  h = np.concatenate([theta, np.tile([[[0, 0, 1]]], (2, 1, 1))], 1).astype(np.float32)
  np.testing.assert_allclose(stn_jax.projective_grid(h, (5, 6), align_corners=align_corners),
                             stn_jax.affine_grid(theta, (5, 6), align_corners=align_corners),
                             atol=1e-6)


def test_projective_grid_divides_by_w():
  h = np.asarray([[[2.0, 0, 0], [0, 1, 0], [0, 0, 2]]])  # x -> x, y -> y / 2
  got = np.asarray(stn_jax.projective_grid(h, (3, 3), align_corners=True))
  base = np.asarray(stn_jax.identity_grid((3, 3), align_corners=True))
  np.testing.assert_allclose(got[0, ..., 0], base[..., 0], atol=1e-7)
  np.testing.assert_allclose(got[0, ..., 1], base[..., 1] / 2, atol=1e-7)


def test_projective_zero_denominator_is_outside_without_nan():
  # w = x: the middle column of a 3-wide grid (x = 0) maps to infinity.
  h = jnp.asarray([[[1.0, 0, 0], [0, 1, 0], [1, 0, 0]]])
  grid = stn_jax.projective_grid(h, (3, 3), align_corners=True)
  assert np.all(np.isinf(grid[0, :, 1])) and not np.any(np.isnan(grid))
  images = jnp.ones((1, 3, 3, 1))
  out = stn_jax.sample(images, grid, align_corners=True)
  np.testing.assert_array_equal(out[0, :, 1], 0.0)
  d_h = jax.grad(lambda m: stn_jax.sample(
      images, stn_jax.projective_grid(m, (3, 3), align_corners=True), align_corners=True).sum())(h)
  assert np.all(np.isfinite(d_h))


def test_control_grid_order():
  pts = np.asarray(stn_jax.control_grid(2, 3))
  np.testing.assert_allclose(pts, [[-1, -1], [0, -1], [1, -1], [-1, 1], [0, 1], [1, 1]])


def test_tps_maps_control_points_exactly():
  # With a 7x7 output and align_corners=True, pixels 0, 2, 4, 6 of each axis sit
  # on the 4x4 control grid, so the grid there must equal the source points.
  rng = np.random.default_rng(2)
  target = np.asarray(stn_jax.control_grid(4, 4))
  source = target[None] + 0.2 * rng.standard_normal((2, 16, 2))
  with jax.enable_x64(True):
    grid = np.asarray(stn_jax.tps_grid(jnp.asarray(source), (7, 7), align_corners=True))
  on_controls = grid[:, ::2, ::2].reshape(2, 16, 2)
  np.testing.assert_allclose(on_controls, source, atol=1e-10)


def test_tps_custom_target_points_mapped_exactly():
  rng = np.random.default_rng(3)
  target = rng.uniform(-1, 1, (6, 2))
  # Evaluated at the target points themselves, the interpolation matrix must
  # be the identity (each target point maps onto its own source point), on
  # both the traced (JAX) and the cached (NumPy) path.
  with jax.enable_x64(True):
    m = grids._tps_interpolation(jnp.asarray(target), jnp.asarray(target))
    np.testing.assert_allclose(np.asarray(m), np.eye(6), atol=1e-10)
    np_m = grids._tps_interpolation(target, target)
    np.testing.assert_allclose(np_m, np.eye(6), atol=1e-10)


@pytest.mark.parametrize("align_corners", [False, True])
def test_tps_of_affine_source_points_is_affine(align_corners):
  rng = np.random.default_rng(4)
  theta = np.asarray([[[0.9, 0.2, 0.1], [-0.15, 1.1, -0.05]]])
  target = np.asarray(stn_jax.control_grid(3, 3), np.float64)
  source = target @ theta[0, :, :2].T + theta[0, :, 2]
  with jax.enable_x64(True):
    got = stn_jax.tps_grid(jnp.asarray(source[None]), (5, 6), align_corners=align_corners)
    expected = stn_jax.affine_grid(jnp.asarray(theta), (5, 6), align_corners=align_corners)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-10)


def test_tps_traced_target_points_match_cached_numpy_path():
  rng = np.random.default_rng(5)
  target = np.asarray(stn_jax.control_grid(3, 3))
  source = jnp.asarray(target[None] + 0.1 * rng.standard_normal((2, 9, 2)), jnp.float32)
  cached = stn_jax.tps_grid(source, (6, 5), target_points=target)
  traced = jax.jit(lambda s, t: stn_jax.tps_grid(s, (6, 5), target_points=t))(
      source, jnp.asarray(target))
  np.testing.assert_allclose(np.asarray(traced), np.asarray(cached), atol=1e-4)


def test_tps_system_is_solved_once():
  grids._cached_tps_interpolation.cache_clear()
  source = jnp.zeros((1, 16, 2))
  for _ in range(3):
    stn_jax.tps_grid(source, (8, 8))
  info = grids._cached_tps_interpolation.cache_info()
  assert info.misses == 1 and info.hits == 2


def test_grad_checks_of_grid_generators():
  rng = np.random.default_rng(6)
  with jax.enable_x64(True):
    theta = jnp.asarray(rng.standard_normal((2, 2, 3)))
    check_grads(lambda t: stn_jax.affine_grid(t, (3, 4)), (theta,), order=2)
    h = jnp.asarray(np.eye(3)[None] + 0.1 * rng.standard_normal((2, 3, 3)))
    check_grads(lambda m: stn_jax.projective_grid(m, (3, 4)), (h,), order=2)
    source = jnp.asarray(rng.standard_normal((2, 9, 2)))
    check_grads(lambda s: stn_jax.tps_grid(s, (3, 4)), (source,), order=2)
    target = jnp.asarray(np.asarray(stn_jax.control_grid(3, 3)) + 0.05 * rng.standard_normal((9, 2)))
    check_grads(lambda t: stn_jax.tps_grid(source, (3, 4), target_points=t), (target,), order=1,
                atol=1e-5, rtol=1e-5)


class GridVariantsTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_generators(self):
    rng = np.random.default_rng(7)
    theta = jnp.asarray(rng.standard_normal((2, 2, 3)), jnp.float32)
    h = jnp.asarray(np.eye(3)[None] + 0.1 * rng.standard_normal((2, 3, 3)), jnp.float32)
    src = jnp.asarray(rng.standard_normal((2, 16, 2)), jnp.float32)
    affine = self.variant(functools.partial(stn_jax.affine_grid, out_hw=(4, 5)))(theta)
    proj = self.variant(functools.partial(stn_jax.projective_grid, out_hw=(4, 5)))(h)
    tps = self.variant(functools.partial(stn_jax.tps_grid, out_hw=(4, 5)))(src)
    chex.assert_shape([affine, proj, tps], (2, 4, 5, 2))
    chex.assert_tree_all_finite([affine, proj, tps])
    np.testing.assert_allclose(affine, stn_jax.affine_grid(theta, (4, 5)), atol=1e-6)


BAD_GRID_CASES = [
    (lambda: stn_jax.identity_grid((0, 3)), r"out_hw must be a pair of positive integers \(height, width\); got \(0, 3\)"),
    (lambda: stn_jax.identity_grid(5), r"out_hw must be a pair of positive integers"),
    (lambda: stn_jax.affine_grid(np.zeros((2, 6)), (3, 3)), r"theta must have rank 3 with shape \[B, 2, 3\]; got rank 2 with shape \[2, 6\]"),
    (lambda: stn_jax.affine_grid(np.zeros((2, 3, 3)), (3, 3)), r"theta must have shape \[B, 2, 3\]; got \[2, 3, 3\]"),
    (lambda: stn_jax.projective_grid(np.zeros((2, 2, 3)), (3, 3)), r"homography must have shape \[B, 3, 3\]; got \[2, 2, 3\]"),
    (lambda: stn_jax.tps_grid(np.zeros((2, 16, 3)), (3, 3)), r"source_points must have shape \[B, K, 2\]; got \[2, 16, 3\]"),
    (lambda: stn_jax.tps_grid(np.zeros((2, 10, 2)), (3, 3)), r"K=10 points, which is not a square regular control grid"),
    (lambda: stn_jax.tps_grid(np.zeros((2, 9, 2)), (3, 3), target_points=np.zeros((8, 2))), r"target_points must have shape \[9, 2\] to match source_points \[2, 9, 2\]; got \[8, 2\]"),
]


@pytest.mark.parametrize("call,message", BAD_GRID_CASES)
def test_bad_input_raises_value_error(call, message):
  with pytest.raises(ValueError, match=message):
    call()
