"""Tests of stn_jax.sampling.sample against independent oracles."""

import functools
import itertools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from absl.testing import parameterized
from jax.test_util import check_grads

import stn_jax
from stn_jax import _native, sampling
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


def _centre_grid(hw, align_corners, offset=0.0):
  """Points at pixel centres (plus ``offset`` pixels): inside, on and one pixel beyond the border."""
  h, w = hw
  px, py = np.meshgrid(np.arange(-1, w + 1) + offset, np.arange(-1, h + 1) + offset)
  return grid_from_pixels(px, py, hw, align_corners)[None]


# Gradient of the bilinear backends (float64) at generic points, at pixel
# centres and within the pixel-centre tolerance of them.
GRADIENT_CASES = ([o + ("xla",) for o in ALL_OPTIONS]
                  + [o + ("matmul",) for o in ALL_OPTIONS if o[0] == "bilinear"])


@pytest.mark.parametrize("method,padding_mode,align_corners,implementation", GRADIENT_CASES)
def test_gradients_match_oracle(method, padding_mode, align_corners, implementation):
  """Image gradient = M^T cotangent; grid gradient = the oracle's, pixel-centre rule included."""
  rng = np.random.default_rng(10)
  hw = (4, 5)
  images = rng.standard_normal((1,) + hw + (2,))
  generic = _kink_free_grid(rng, (1, 2, 3), hw, align_corners, outside=True)
  centres = [_centre_grid(hw, align_corners, offset) for offset in (0.0, 1e-9, -3e-5)]
  for grid in [generic] + centres:
    cotangent = rng.standard_normal(grid.shape[:3] + (2,))
    with jax.enable_x64(True):
      loss = lambda a, g: (stn_jax.sample(a, g, method=method, padding_mode=padding_mode,
                                          align_corners=align_corners,
                                          implementation=implementation) * cotangent).sum()
      d_images, d_grid = jax.grad(loss, (0, 1))(jnp.asarray(images), jnp.asarray(grid))
    m = oracle.interpolation_matrix(hw, grid[0], method, padding_mode, align_corners)
    expected_d_images = (m.T @ cotangent[0].reshape(-1, 2)).reshape(hw + (2,))
    np.testing.assert_allclose(np.asarray(d_images)[0], expected_d_images, atol=1e-12)
    expected_d_grid = oracle.grid_gradient(images, grid, cotangent, method, padding_mode,
                                           align_corners)
    np.testing.assert_allclose(np.asarray(d_grid), expected_d_grid, atol=1e-6)


@pytest.mark.parametrize("padding_mode", sampling.PADDING_MODES)
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("implementation", ["xla", "matmul"])
def test_identity_gradient_is_the_central_difference(padding_mode, align_corners, implementation):
  """At the identity (every point on a pixel centre) d loss / d theta = central differences,
  eagerly and under jit alike."""
  rng = np.random.default_rng(20)
  with jax.enable_x64(True):
    images = jnp.asarray(rng.standard_normal((2, 5, 6, 2)))
    cotangent = jnp.asarray(rng.standard_normal((2, 5, 6, 2)))
    def loss(theta):
      grid = stn_jax.affine_grid(theta, (5, 6), align_corners=align_corners)
      out = stn_jax.sample(images, grid, padding_mode=padding_mode, align_corners=align_corners,
                           implementation=implementation)
      return (out * cotangent).sum()
    theta = jnp.tile(jnp.asarray([[1.0, 0, 0], [0, 1, 0]]), (2, 1, 1))
    eager = jax.grad(loss)(theta)
    jitted = jax.jit(jax.grad(loss))(theta)
    h = 1e-4  # Moves points by < 0.001 pixel: linear on either side of each centre.
    steps = h * np.eye(theta.size).reshape((-1,) + theta.shape)
    losses = jax.jit(jax.vmap(loss))
    central = ((losses(theta + steps) - losses(theta - steps)) / (2 * h)).reshape(theta.shape)
  np.testing.assert_allclose(np.asarray(eager), central, atol=1e-9)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("implementation", ["xla", "matmul"])
def test_a_tiny_nudge_flips_no_gradient(implementation):
  rng = np.random.default_rng(21)
  hw = (5, 6)
  with jax.enable_x64(True):
    images = jnp.asarray(rng.standard_normal((1,) + hw + (2,)))
    grid = _centre_grid(hw, False)
    cotangent = jnp.asarray(rng.standard_normal(grid.shape[:3] + (2,)))
    grad = jax.grad(lambda g: (stn_jax.sample(images, g, implementation=implementation)
                               * cotangent).sum())
    reference = np.asarray(grad(jnp.asarray(grid)))
    for nudge in (1e-9, -1e-9):
      nudged = _centre_grid(hw, False, offset=nudge)
      np.testing.assert_allclose(np.asarray(grad(jnp.asarray(nudged))), reference, atol=1e-8)


@pytest.mark.parametrize("method", ["bilinear", "bicubic"])
def test_one_sided_derivatives_at_pixel_centres(method):
  """Bicubic's one-sided derivatives agree at a centre (no rule needed); bilinear's differ and
  its gradient is their mean."""
  rng = np.random.default_rng(22)
  with jax.enable_x64(True):
    images = jnp.asarray(rng.standard_normal((1, 6, 6, 1)))
    point = jnp.asarray(grid_from_pixels(np.array(2.0), np.array(3.0), (6, 6), False))
    def f(x):  # The value along x through the centre of pixel (row 3, column 2).
      return stn_jax.sample(images, jnp.stack([x, point[1]]).reshape(1, 1, 1, 2),
                            method=method, implementation="xla").sum()
    x0 = point[0]
    h = 1e-7
    right, left = (f(x0 + h) - f(x0)) / h, (f(x0) - f(x0 - h)) / h
    grad = jax.grad(f)(x0)
  if method == "bicubic":
    np.testing.assert_allclose(right, left, rtol=1e-4)
  else:
    assert abs(right - left) > 1e-2 * max(abs(right), abs(left))
  np.testing.assert_allclose(grad, 0.5 * (left + right), rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_higher_order_derivatives_agree_across_implementations(dtype):
  """jvp, jacfwd, hessian, grad of grad and vmap of them: matmul equals gathers."""
  rng = np.random.default_rng(23)
  with jax.enable_x64(dtype == jnp.float64):
    images = jnp.asarray(rng.standard_normal((2, 4, 5, 2)), dtype)
    grid = np.concatenate([_centre_grid((4, 5), True)[:, :2, :3],
                           rng.uniform(-1.2, 1.2, (1, 2, 3, 2))]).astype(dtype)
    grid = jnp.asarray(grid)
    cotangent = jnp.asarray(rng.standard_normal((2, 2, 3, 2)), dtype)
    def derivatives(impl):
      def loss(a, g):
        return (stn_jax.sample(a, g, padding_mode="border", align_corners=True,
                               implementation=impl) * cotangent).sum()
      @jax.jit
      def all_of_them(a, g):
        return [jax.jvp(loss, (a, g), (a, g))[1], *jax.jacfwd(loss, (0, 1))(a, g),
                jax.hessian(loss, 1)(a, g),
                jax.grad(lambda g: jax.grad(loss, 0)(a, g).sum())(g),
                jax.vmap(jax.hessian(loss, 1))(a[:, None], g[:, None])]
      return all_of_them(images, grid)
    gathers, matmul = derivatives("xla"), derivatives("matmul")
  tol = 1e-5 if dtype == jnp.float32 else 1e-12
  for a, b in zip(matmul, gathers):
    assert a.dtype == dtype
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


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
    stn_jax.sample(images, grid, method="bicubic", implementation="matmul")


def test_matmul_gradients_numerically():
  rng = np.random.default_rng(3)
  images = jnp.asarray(rng.standard_normal((2, 5, 6, 2)))
  grid = jnp.asarray(rng.uniform(-0.9, 0.9, (2, 3, 4, 2)))
  check_grads(jax.jit(lambda i, g: stn_jax.sample(i, g, implementation="matmul")), (images, grid),
              order=2, modes=["fwd", "rev"], eps=1e-4)


def _expected_on_cpu(name):
  return name if _native.available() else "xla"


F32, BF16 = jnp.float32, jnp.bfloat16
# platform, method, padding_mode, images [B, H, W, C], dtype, expected backend.
POLICY_CASES = [
    ("cpu", "bilinear", "zeros", (256, 28, 28, 1), F32, _expected_on_cpu("native")),
    ("cpu", "bilinear", "border", (256, 28, 28, 1), F32, "xla"),
    ("cpu", "bicubic", "zeros", (256, 28, 28, 1), F32, "xla"),
    ("cpu", "bilinear", "zeros", (256, 28, 28, 1), BF16, "xla"),
    ("cuda", "bilinear", "zeros", (256, 28, 28, 1), F32, "xla"),
    ("rocm", "bilinear", "zeros", (256, 28, 28, 1), F32, "xla"),
    ("tpu", "bilinear", "zeros", (256, 28, 28, 1), F32, "matmul"),
    ("tpu", "bilinear", "reflection", (128, 60, 60, 1), BF16, "matmul"),
    ("tpu", "bilinear", "zeros", (64, 64, 64, 3), F32, "matmul"),
    ("tpu", "bilinear", "zeros", (64, 64, 65, 3), F32, "xla"),       # More pixels than the limit.
    ("tpu", "bilinear", "zeros", (4096, 28, 28, 1), F32, "xla"),     # Intermediate too large.
    ("tpu", "bilinear", "zeros", (16, 224, 224, 3), F32, "xla"),
    ("tpu", "nearest", "zeros", (256, 28, 28, 1), F32, "xla"),
]


@pytest.mark.parametrize("platform,method,padding_mode,shape,dtype,expected", POLICY_CASES)
def test_auto_policy(platform, method, padding_mode, shape, dtype, expected):
  grid_shape = shape[:3] + (2,)
  assert sampling.choose_implementation(platform, method, padding_mode, shape, grid_shape,
                                        dtype, jnp.float32) == expected


def test_auto_follows_the_lowering_platform():
  """One traced program: the native kernel on CPU, matmul on TPU, gathers on GPU."""
  images = jax.ShapeDtypeStruct((4, 8, 8, 1), jnp.float32)
  grid = jax.ShapeDtypeStruct((4, 8, 8, 2), jnp.float32)
  traced = jax.jit(stn_jax.sample).trace(images, grid)
  def ops(platform):
    text = traced.lower(lowering_platforms=(platform,)).as_text()
    return {op: text.count(op) for op in ("custom_call", "stablehlo.gather", "dot_general")}
  assert ops("tpu")["stablehlo.gather"] == 0 and ops("tpu")["dot_general"] == 2
  assert ops("cuda")["stablehlo.gather"] > 0 and ops("cuda")["dot_general"] == 0
  assert ops("tpu")["custom_call"] == ops("cuda")["custom_call"] == 0
  assert (ops("cpu")["custom_call"] > 0) == _native.available()


def test_every_backend_states_and_checks_what_it_supports():
  images, grid = jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 2, 2, 2))
  for name, backend in sampling.BACKENDS.items():
    assert backend.platforms and set(backend.platforms) <= set(sampling.PLATFORMS)
    for method, padding_mode, dtype in itertools.product(
        sampling.METHODS, sampling.PADDING_MODES, (jnp.float32, jnp.float16)):
      call = functools.partial(stn_jax.sample, images.astype(dtype), grid, method=method,
                               padding_mode=padding_mode, implementation=name)
      refusal = backend.refusal(method, padding_mode, dtype, jnp.float32)
      if refusal is None and backend.available():
        assert call().shape == (1, 2, 2, 1)
      elif refusal is not None:
        assert refusal.startswith(f"implementation={name!r} takes ")
        assert method in refusal and padding_mode in refusal and jnp.dtype(dtype).name in refusal
        with pytest.raises(ValueError, match=re.escape(refusal)):
          call()


def _implementations(method, padding_mode):
  return [name for name, b in sampling.BACKENDS.items() if b.available()
          and b.refusal(method, padding_mode, jnp.float32, jnp.float32) is None] + ["auto"]


@pytest.mark.parametrize("method,padding_mode", list(itertools.product(sampling.METHODS,
                                                                       sampling.PADDING_MODES)))
def test_empty_batch_gives_an_empty_result(method, padding_mode):
  for implementation in _implementations(method, padding_mode):
    f = functools.partial(stn_jax.sample, method=method, padding_mode=padding_mode,
                          implementation=implementation)
    for images, grid in [(jnp.ones((0, 4, 5, 2)), jnp.zeros((0, 3, 6, 2))),
                         (jnp.ones((2, 4, 5, 2)), jnp.zeros((2, 0, 6, 2)))]:
      expected_shape = grid.shape[:3] + (2,)
      assert f(images, grid).shape == expected_shape
      assert jax.jit(f)(images, grid).shape == expected_shape
      d_images, d_grid = jax.grad(lambda a, g: f(a, g).sum(), (0, 1))(images, grid)
      assert d_images.shape == images.shape and d_grid.shape == grid.shape


@pytest.mark.parametrize("hw", [(1, 5), (4, 1), (1, 1)])
@pytest.mark.parametrize("padding_mode", sampling.PADDING_MODES)
def test_single_pixel_axes_with_align_corners(hw, padding_mode):
  """An axis of one pixel spans [-1, 1]: with zeros padding, points beyond read 0."""
  rng = np.random.default_rng(24)
  images = rng.standard_normal((1,) + hw + (2,)).astype(np.float32)
  grid = rng.uniform(-0.9, 0.9, (1, 4, 4, 2)).astype(np.float32)
  grid[0, 0] = [(1.0, -1.0), (-1.0, 1.0), (0.0, 50.0), (-30.0, 0.0)]
  grid[0, 1] = [(1.5, 0.2), (0.3, -1.2), (1e6, 1e6), (-2.5, 3.0)]
  for method in sampling.METHODS:
    expected = oracle.sample(images, grid, method, padding_mode, align_corners=True)
    for implementation in _implementations(method, padding_mode):
      got = stn_jax.sample(images, grid, method=method, padding_mode=padding_mode,
                           align_corners=True, implementation=implementation)
      np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, err_msg=implementation)
  far = [np.abs(grid[0, ..., k]) > 1 for k, size in enumerate(hw[::-1]) if size == 1]
  outside = np.logical_or.reduce(far)
  assert outside.sum() >= 3
  if padding_mode == "zeros":
    np.testing.assert_array_equal(expected[0][outside], 0.0)
  else:  # The other modes read the pixel there, as PyTorch does.
    assert (expected[0][outside] != 0).all()
