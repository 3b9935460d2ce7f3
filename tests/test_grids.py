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
from stn_jax import coordinates
from stn_jax import grids
from stn_jax import sampling


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


# --- stn_jax.coordinates ------------------------------------------------------------------

@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size", [1, 2, 7])
def test_coordinates_pixel_centres_and_round_trip(size, align_corners):
  centres = coordinates.linspace(size, align_corners)
  np.testing.assert_allclose(coordinates.to_pixel(centres, size, align_corners), np.arange(size),
                             atol=1e-12)
  pix = np.random.default_rng(0).uniform(-3, size + 3, 20)
  back = coordinates.to_pixel(coordinates.from_pixel(pix, size, align_corners), size,
                              align_corners)
  if size == 1 and align_corners:   # The whole axis is the one pixel 0.
    np.testing.assert_array_equal(back, 0.0)
  else:
    np.testing.assert_allclose(back, pix, atol=1e-12)
  # The edges: -1 and 1 are the corner centres (True) or the outer edges (False).
  edges = coordinates.to_pixel(np.asarray([-1.0, 1.0]), size, align_corners)
  np.testing.assert_allclose(edges, [0, size - 1] if align_corners else [-0.5, size - 0.5])


def test_coordinates_matrices_agree_with_elementwise_conversions():
  rng = np.random.default_rng(1)
  pix = rng.uniform(-2, 10, (6, 2))
  with jax.enable_x64(True):
    for align_corners in (False, True):
      n = np.asarray(coordinates.normalization_matrix((5, 9), align_corners=align_corners,
                                                      dtype=jnp.float64))
      homog = np.concatenate([pix, np.ones((6, 1))], 1) @ n.T
      expected = np.stack([coordinates.from_pixel(pix[:, 0], 9, align_corners),
                           coordinates.from_pixel(pix[:, 1], 5, align_corners)], -1)
      np.testing.assert_allclose(homog[:, :2], expected, atol=1e-14)
      np.testing.assert_allclose(
          coordinates.pixel_to_normalized(jnp.asarray(pix), (5, 9), align_corners=align_corners),
          expected, atol=1e-14)
  centres = coordinates.pixel_centres((2, 3), align_corners=False)
  np.testing.assert_allclose(centres, stn_jax.identity_grid((2, 3), dtype=jnp.float32), atol=1e-7)
  np.testing.assert_allclose(coordinates.control_points(2, 3), stn_jax.control_grid(2, 3))


def test_float_dtype_rule():
  with jax.enable_x64(True):
    assert coordinates.float_dtype(jnp.zeros(2, jnp.float64)) == jnp.float64
    assert coordinates.float_dtype(jnp.zeros(2, jnp.float32), jnp.zeros(2, jnp.float64)) == jnp.float64
    assert coordinates.float_dtype(jnp.zeros(2, jnp.bfloat16)) == jnp.float32
    assert coordinates.float_dtype(jnp.zeros(2, jnp.float16)) == jnp.float32
    assert coordinates.float_dtype(jnp.zeros(2, jnp.int32)) == jnp.float32


# --- Edge sizes: a zero size raises, an empty batch gives an empty grid. --------------------

GRID_FUNCTIONS = {
    "affine": (lambda b, hw: stn_jax.affine_grid(jnp.zeros((b, 2, 3)), hw)),
    "projective": (lambda b, hw: stn_jax.projective_grid(jnp.tile(jnp.eye(3), (b, 1, 1)), hw)),
    "tps": (lambda b, hw: stn_jax.tps_grid(jnp.zeros((b, 4, 2)), hw)),
    "transform_grid": (lambda b, hw: stn_jax.transform_grid(jnp.zeros((b, 3)), hw,
                                                            transform="attention")),
}


@pytest.mark.parametrize("name", GRID_FUNCTIONS)
def test_zero_sizes_raise_and_empty_batch_is_empty(name):
  make = GRID_FUNCTIONS[name]
  assert make(0, (3, 4)).shape == (0, 3, 4, 2)
  for hw in ((0, 4), (3, 0), (-1, 2)):
    with pytest.raises(ValueError, match=r"out_hw must be a pair of positive integers"):
      make(2, hw)


# --- Degenerate thin-plate splines. --------------------------------------------------------

DEGENERATE_TARGETS = [
    ("duplicate", np.asarray([[-1, -1], [1, -1], [0.2, 0.3], [-1, 1], [1, 1], [0.2, 0.3]]),
     r"target_points has duplicate points \(indices 2 and 5\); a thin-plate spline needs distinct"),
    ("collinear", np.asarray([[-1, -1], [1 / 3, 1 / 3], [1, 1], [0.7, 0.7]]),
     r"target_points: all 4 points lie on one line; a thin-plate spline needs at least 3"),
    ("two points", np.asarray([[-1.0, 0.5], [0.3, 0.2]]), r"all 2 points lie on one line"),
    ("not finite", np.asarray([[-1, -1], [1, -1], [np.nan, 0], [1, 1]]),
     r"target_points must be finite; points \[2\] are not"),
]


@pytest.mark.parametrize("name,target,message", DEGENERATE_TARGETS, ids=[d[0] for d in DEGENERATE_TARGETS])
def test_degenerate_tps_target_raises_for_concrete_points(name, target, message):
  source = jnp.asarray(target[None] + 0.1, jnp.float32)
  for points in (target, jnp.asarray(target, jnp.float32)):   # cached NumPy and JAX paths
    with pytest.raises(ValueError, match=message):
      stn_jax.tps_grid(source, (4, 4), target_points=points)


@jax.jit
def _traced_tps(source, target):
  """Grid, sampled sum and its gradients, with the target points traced."""
  images = jnp.ones((1, 4, 4, 1))
  def loss(s, t):
    return sampling.sample(images, stn_jax.tps_grid(s, (3, 3), target_points=t)).sum()
  value, grads = jax.value_and_grad(loss, (0, 1))(source, target)
  return stn_jax.tps_grid(source, (3, 3), target_points=target), value, grads


@pytest.mark.parametrize("name,target", [(d[0], d[1]) for d in DEGENERATE_TARGETS[:2]],
                         ids=[d[0] for d in DEGENERATE_TARGETS[:2]])
def test_degenerate_traced_tps_target_is_outside_with_zero_gradient(name, target):
  target = jnp.asarray(target, jnp.float32)
  grid, value, grads = _traced_tps(target[None] + 0.1, target)
  assert np.all(np.isnan(grid)) and value == 0.0
  for g in grads:
    np.testing.assert_array_equal(g, 0.0)
  # Regular target points of the same shape, on the same traced path, are unaffected.
  bend = np.arange(len(target))[:, None] ** 2 * np.asarray([0.02, -0.01])
  regular = jnp.asarray(np.asarray(target) + bend, jnp.float32)
  grid, value, grads = _traced_tps(regular[None], regular)
  assert np.all(np.isfinite(grid)) and value > 0 and all(np.all(np.isfinite(g)) for g in grads)


def test_tps_control_shape_of_one_row_is_refused():
  with pytest.raises(ValueError, match=r"control_shape must be at least \(2, 2\)"):
    stn_jax.transform_grid(jnp.zeros((1, 8)), (4, 4), transform="tps", control_shape=(1, 4))


# --- Non-finite transform entries: no NaN in the gradient of the finite ones. ---------------

def test_projective_non_finite_entry_keeps_other_gradients_finite():
  rng = np.random.default_rng(8)
  images = jnp.asarray(rng.uniform(0, 1, (1, 5, 5, 1)), jnp.float32)
  h = jnp.asarray(np.eye(3)[None] + 0.05 * rng.standard_normal((1, 3, 3)), jnp.float32)
  grid = jax.jit(lambda m: stn_jax.projective_grid(m, (4, 4)))
  loss = lambda m: sampling.sample(images, grid(m)).sum()
  value_and_grad = jax.jit(jax.value_and_grad(loss))
  for entry in range(9):
    for value in (np.nan, np.inf):
      bad = h.at[0, entry // 3, entry % 3].set(value)
      assert not np.any(np.isfinite(grid(bad)))
      got, g = value_and_grad(bad)
      assert got == 0.0
      np.testing.assert_array_equal(g, 0.0)
