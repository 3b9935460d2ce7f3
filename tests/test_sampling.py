"""Tests of stn_jax.sampling.sample against independent oracles."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from absl.testing import parameterized
from jax.test_util import check_grads

import stn_jax
from stn_jax import sampling
from tests import oracle

ALL_OPTIONS = list(itertools.product(sampling.METHODS, sampling.PADDING_MODES, (False, True)))


def random_grid(rng, shape, far=True):
  """Uniform points over [-1.6, 1.6]^2, with some far outside the image."""
  grid = rng.uniform(-1.6, 1.6, shape + (2,))
  if far:
    grid[:, 0, 0] = (7.3, -3.1)
    grid[:, 0, 1] = (-40.7, 250.2)
    grid[:, -1, -1] = (1.3e6, -2.2e5)
  return grid


def grid_from_pixels(px, py, hw, align_corners):
  """Normalised grid from pixel coordinates (inverse of oracle.to_pixel)."""
  h, w = hw
  def norm(c, size):
    if align_corners:
      return 2 * c / (size - 1) - 1
    return (2 * c + 1) / size - 1
  return np.stack([norm(px, w), norm(py, h)], axis=-1)


def smooth_pixels(rng, shape, size, low, high):
  """Pixel coordinates in [low, high] whose fractional parts avoid kernel and reflection kinks."""
  whole = rng.integers(low, high, shape)
  frac = rng.choice([-1, 1], shape) * rng.uniform(0.1, 0.4, shape)
  return whole + 0.5 + frac


@pytest.mark.parametrize("method,padding_mode,align_corners", ALL_OPTIONS)
def test_matches_numpy_oracle(method, padding_mode, align_corners):
  rng = np.random.default_rng(0)
  images = rng.standard_normal((2, 5, 7, 3))
  grid = random_grid(rng, (2, 6, 4))
  expected = oracle.sample(images, grid, method, padding_mode, align_corners)
  with jax.enable_x64(True):
    got = stn_jax.sample(jnp.asarray(images), jnp.asarray(grid), method=method,
                         padding_mode=padding_mode, align_corners=align_corners)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-12)


@pytest.mark.parametrize("method,padding_mode,align_corners", ALL_OPTIONS)
def test_matches_numpy_oracle_float32(method, padding_mode, align_corners):
  rng = np.random.default_rng(1)
  images = rng.standard_normal((3, 6, 5, 2)).astype(np.float32)
  grid = random_grid(rng, (3, 4, 5), far=False)
  grid[:, 0, :2] = [(7.3, -3.1), (-4.7, 5.3)]  # Far points lose float32 precision past ~10.
  grid = grid.astype(np.float32)
  expected = oracle.sample(images, grid, method, padding_mode, align_corners)
  got = stn_jax.sample(images, grid, method=method, padding_mode=padding_mode,
                       align_corners=align_corners)
  assert got.dtype == jnp.float32 and got.shape == (3, 4, 5, 2)
  # Nearest may pick the other pixel at float32 rounding ties; none are drawn here.
  np.testing.assert_allclose(np.asarray(got), expected, atol=2e-5)


_SCIPY_MODES = {("zeros", False): "grid-constant", ("zeros", True): "grid-constant",
                ("border", False): "nearest", ("border", True): "nearest",
                ("reflection", False): "reflect", ("reflection", True): "mirror"}


@pytest.mark.parametrize("order,method", [(0, "nearest"), (1, "bilinear")])
@pytest.mark.parametrize("padding_mode", sampling.PADDING_MODES)
@pytest.mark.parametrize("align_corners", [False, True])
def test_matches_scipy_map_coordinates(order, method, padding_mode, align_corners):
  rng = np.random.default_rng(2)
  h, w = 6, 8
  images = rng.standard_normal((1, h, w, 2))
  grid = random_grid(rng, (1, 9, 7), far=False)
  grid[0, 0, :3] = [(5.2, 0.1), (-3.3, -9.4), (0.4, 12.9)]  # Far outside, in range of scipy.
  px = oracle.to_pixel(grid[0, ..., 0], w, align_corners)
  py = oracle.to_pixel(grid[0, ..., 1], h, align_corners)
  mode = _SCIPY_MODES[(padding_mode, align_corners)]
  expected = np.stack([
      scipy.ndimage.map_coordinates(images[0, ..., ch], [py, px], order=order, mode=mode, cval=0.0)
      for ch in range(2)], axis=-1)
  with jax.enable_x64(True):
    got = stn_jax.sample(jnp.asarray(images), jnp.asarray(grid), method=method,
                         padding_mode=padding_mode, align_corners=align_corners)
  np.testing.assert_allclose(np.asarray(got)[0], expected, atol=1e-12)


@pytest.mark.parametrize("method", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("align_corners", [False, True])
def test_identity_grid_returns_input(method, align_corners):
  images = np.random.default_rng(3).standard_normal((2, 9, 11, 3)).astype(np.float32)
  grid = jnp.broadcast_to(stn_jax.identity_grid((9, 11), align_corners=align_corners),
                          (2, 9, 11, 2))
  got = stn_jax.sample(images, grid, method=method, align_corners=align_corners)
  np.testing.assert_allclose(np.asarray(got), images, atol=1e-5)


@pytest.mark.parametrize("align_corners", [False, True])
def test_one_pixel_translation_shifts_by_one_pixel(align_corners):
  images = np.random.default_rng(4).standard_normal((2, 6, 8, 1)).astype(np.float32)
  step = 2 / (8 - 1) if align_corners else 2 / 8
  theta = jnp.asarray([[step, 0.0]] * 2)  # x_s = x_t + one pixel: the image moves left.
  got = np.asarray(stn_jax.warp(images, theta, transform="translation",
                                align_corners=align_corners))
  np.testing.assert_allclose(got[:, :, :-1], images[:, :, 1:], atol=1e-5)
  np.testing.assert_allclose(got[:, :, -1], 0.0, atol=1e-5)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_quarter_turn_equals_rot90(align_corners, method):
  images = np.random.default_rng(5).standard_normal((2, 7, 7, 2)).astype(np.float32)
  theta = jnp.full((2, 1), np.pi / 2)
  got = stn_jax.warp(images, theta, transform="rotation", method=method,
                     align_corners=align_corners)
  np.testing.assert_allclose(np.asarray(got), np.rot90(images, k=1, axes=(1, 2)), atol=1e-5)


@pytest.mark.parametrize("method,padding_mode,align_corners", ALL_OPTIONS)
def test_non_finite_points_read_zero_without_nan(method, padding_mode, align_corners):
  rng = np.random.default_rng(6)
  images = jnp.asarray(rng.standard_normal((1, 5, 5, 2)), jnp.float32)
  grid = rng.uniform(-0.9, 0.9, (1, 2, 3, 2)).astype(np.float32)
  grid[0, 0, 0] = (np.nan, 0.1)
  grid[0, 0, 1] = (0.2, np.inf)
  grid[0, 0, 2] = (-np.inf, np.nan)
  grid = jnp.asarray(grid)
  sample = functools.partial(stn_jax.sample, method=method, padding_mode=padding_mode,
                             align_corners=align_corners)
  out = sample(images, grid)
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(np.asarray(out)[0, 0], 0.0)
  d_images, d_grid = jax.grad(lambda a, g: (sample(a, g) ** 2).sum(), (0, 1))(images, grid)
  assert np.all(np.isfinite(d_images)) and np.all(np.isfinite(d_grid))
  np.testing.assert_array_equal(np.asarray(d_grid)[0, 0], 0.0)


@pytest.mark.parametrize("dtype,atol", [(jnp.bfloat16, 5e-2), (jnp.float16, 5e-3)])
@pytest.mark.parametrize("method", sampling.METHODS)
def test_low_precision_images(dtype, atol, method):
  rng = np.random.default_rng(7)
  images = rng.uniform(0, 1, (2, 8, 8, 3)).astype(np.float32)
  grid = random_grid(rng, (2, 5, 5), far=False).astype(np.float32)
  reference = stn_jax.sample(images, grid, method=method)
  got = stn_jax.sample(jnp.asarray(images, dtype), grid, method=method)
  assert got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(reference), atol=atol)
  grads = jax.grad(lambda a: stn_jax.sample(a, grid, method=method).astype(jnp.float32).sum())(
      jnp.asarray(images, dtype))
  assert grads.dtype == dtype and np.all(np.isfinite(np.asarray(grads, np.float32)))


@pytest.mark.parametrize("channels", [1, 4, 17])
def test_any_number_of_channels(channels):
  rng = np.random.default_rng(8)
  images = rng.standard_normal((2, 4, 6, channels)).astype(np.float32)
  grid = random_grid(rng, (2, 3, 3)).astype(np.float32)
  got = stn_jax.sample(images, grid)
  assert got.shape == (2, 3, 3, channels)
  np.testing.assert_allclose(np.asarray(got), oracle.sample(images, grid), atol=2e-5)


def _kink_free_grid(rng, shape, hw, align_corners, outside):
  """Points whose pixel coordinates keep away from every kink of the kernels."""
  h, w = hw
  lo, hi = (-4, 4) if outside else (0, 0)
  px = smooth_pixels(rng, shape, w, lo, w - 1 + hi)
  py = smooth_pixels(rng, shape, h, lo, h - 1 + hi)
  return grid_from_pixels(px, py, hw, align_corners)


@pytest.mark.parametrize("method,padding_mode,align_corners",
                         [o for o in ALL_OPTIONS if o[0] != "nearest"])
def test_check_grads(method, padding_mode, align_corners):
  rng = np.random.default_rng(9)
  with jax.enable_x64(True):
    images = jnp.asarray(rng.standard_normal((2, 5, 6, 2)))
    grid = jnp.asarray(_kink_free_grid(rng, (2, 3, 4), (5, 6), align_corners, outside=True))
    f = functools.partial(stn_jax.sample, method=method, padding_mode=padding_mode,
                          align_corners=align_corners)
    check_grads(f, (images, grid), order=2, modes=["rev", "fwd"], eps=1e-4, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,padding_mode,align_corners", ALL_OPTIONS)
def test_gradients_match_oracle(method, padding_mode, align_corners):
  """Image gradient = M^T cotangent; grid gradient = finite differences of the oracle."""
  rng = np.random.default_rng(10)
  hw = (5, 6)
  images = rng.standard_normal((1,) + hw + (2,))
  grid = _kink_free_grid(rng, (1, 3, 3), hw, align_corners, outside=True)
  cotangent = rng.standard_normal((1, 3, 3, 2))
  with jax.enable_x64(True):
    loss = lambda a, g: (stn_jax.sample(a, g, method=method, padding_mode=padding_mode,
                                        align_corners=align_corners) * cotangent).sum()
    d_images, d_grid = jax.grad(loss, (0, 1))(jnp.asarray(images), jnp.asarray(grid))
  m = oracle.interpolation_matrix(hw, grid[0], method, padding_mode, align_corners)
  expected_d_images = (m.T @ cotangent[0].reshape(-1, 2)).reshape(hw + (2,))
  np.testing.assert_allclose(np.asarray(d_images)[0], expected_d_images, atol=1e-12)

  def oracle_loss(g):
    return (oracle.sample(images, g, method, padding_mode, align_corners) * cotangent).sum()
  eps = 1e-6
  expected_d_grid = np.zeros_like(grid)
  for idx in np.ndindex(grid.shape):
    step = np.zeros_like(grid)
    step[idx] = eps
    expected_d_grid[idx] = (oracle_loss(grid + step) - oracle_loss(grid - step)) / (2 * eps)
  np.testing.assert_allclose(np.asarray(d_grid), expected_d_grid, atol=1e-6)


class SampleVariantsTest(parameterized.TestCase):
  """The public sampler with and without jit, on and off device."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*itertools.product(sampling.METHODS, sampling.PADDING_MODES))
  def test_variants_agree_with_oracle(self, method, padding_mode):
    rng = np.random.default_rng(11)
    images = rng.standard_normal((2, 4, 5, 3)).astype(np.float32)
    grid = random_grid(rng, (2, 3, 3)).astype(np.float32)
    f = self.variant(functools.partial(stn_jax.sample, method=method, padding_mode=padding_mode))
    got = f(images, grid)
    chex.assert_shape(got, (2, 3, 3, 3))
    chex.assert_tree_all_finite(got)
    np.testing.assert_allclose(np.asarray(got),
                               oracle.sample(images, grid, method, padding_mode), atol=2e-5)


def test_vmap_over_extra_batch_axis_equals_loop():
  rng = np.random.default_rng(12)
  images = jnp.asarray(rng.standard_normal((3, 2, 5, 5, 1)), jnp.float32)
  grid = jnp.asarray(random_grid(rng, (6, 4, 4)).reshape(3, 2, 4, 4, 2), jnp.float32)
  batched = jax.vmap(functools.partial(stn_jax.sample, method="bicubic"))(images, grid)
  looped = jnp.stack([stn_jax.sample(images[i], grid[i], method="bicubic") for i in range(3)])
  np.testing.assert_allclose(np.asarray(batched), np.asarray(looped), atol=1e-6)


def test_far_points_do_not_overflow_indices():
  images = jnp.ones((1, 4, 4, 1))
  grid = jnp.asarray([[[[3e38, -3e38], [1e20, 0.0], [0.0, -1e20]]]], jnp.float32)
  for padding_mode in sampling.PADDING_MODES:
    for method in sampling.METHODS:
      out = stn_jax.sample(images, grid, method=method, padding_mode=padding_mode)
      assert np.all(np.isfinite(out)), (method, padding_mode)
  # Border mode reads the border pixel, zeros mode reads nothing.
  np.testing.assert_allclose(stn_jax.sample(images, grid, padding_mode="border"), 1.0)
  np.testing.assert_allclose(stn_jax.sample(images, grid, padding_mode="zeros"), 0.0)


BAD_SAMPLE_CASES = [
    (dict(images=np.zeros((4, 4, 1))), r"images must have rank 4 with shape \[B, H, W, C\]; got rank 3 with shape \[4, 4, 1\]"),
    (dict(grid=np.zeros((1, 3, 3))), r"grid must have rank 4 with shape \[B, Ho, Wo, 2\]; got rank 3"),
    (dict(grid=np.zeros((1, 3, 3, 3))), r"grid must have shape \[B, Ho, Wo, 2\] \(last axis \(x, y\)\); got \[1, 3, 3, 3\]"),
    (dict(grid=np.zeros((2, 3, 3, 2))), r"images and grid must have the same batch size; got images \[1, 4, 4, 1\] and grid \[2, 3, 3, 2\]"),
    (dict(images=np.zeros((1, 4, 4, 1), np.uint8)), r"images must have a floating-point dtype .* got uint8"),
    (dict(method="cubic"), r"unknown method 'cubic'; expected one of 'bilinear', 'nearest', 'bicubic'"),
    (dict(padding_mode="wrap"), r"unknown padding_mode 'wrap'; expected one of 'zeros', 'border', 'reflection'"),
]


@pytest.mark.parametrize("override,message", BAD_SAMPLE_CASES)
def test_bad_input_raises_value_error(override, message):
  args = dict(images=np.zeros((1, 4, 4, 1), np.float32), grid=np.zeros((1, 3, 3, 2), np.float32))
  args.update(override)
  images, grid = args.pop("images"), args.pop("grid")
  with pytest.raises(ValueError, match=message):
    stn_jax.sample(images, grid, **args)
  with pytest.raises(ValueError, match=message):  # At trace time, too.
    jax.jit(functools.partial(stn_jax.sample, **args))(images, grid)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_implementation_matches_gathers(align_corners, dtype):
  from tests.test_native import inputs, value_and_grads
  images, grid, cotangent = inputs((3, 9, 8, 3, 11, 5))
  images = images.astype(dtype)
  matmul = value_and_grads("matmul", images, grid, cotangent.astype(dtype), align_corners)
  xla = value_and_grads("xla", images, grid, cotangent.astype(dtype), align_corners)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  for a, b in zip(matmul, xla):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    np.testing.assert_allclose(a, b, atol=tol * (np.abs(b).max() + 1e-6), rtol=tol)
  with pytest.raises(ValueError, match="implementation='matmul' takes method='bilinear'"):
    stn_jax.sample(images, grid, padding_mode="border", implementation="matmul")


def test_matmul_gradients_numerically():
  rng = np.random.default_rng(3)
  images = jnp.asarray(rng.standard_normal((2, 5, 6, 2)))
  grid = jnp.asarray(rng.uniform(-0.9, 0.9, (2, 3, 4, 2)))
  check_grads(lambda i, g: stn_jax.sample(i, g, implementation="matmul"), (images, grid),
              order=2, modes=["fwd", "rev"], eps=1e-4)
