"""The compiled CPU sampler (stn_jax._native) against the pure-JAX one."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from stn_jax import _native, coordinates, sampling
from stn_jax.sampling import PIXEL_CENTRE_TOLERANCE

pytestmark = pytest.mark.skipif(not _native.available(),
                                reason="no C++ compiler: the compiled sampler is not built")


def inputs(shape, seed=0, spread=1.3):
  b, h, w, c, ho, wo = shape
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.standard_normal((b, h, w, c)), jnp.float32)
  grid = rng.uniform(-spread, spread, (b, ho, wo, 2)).astype(np.float32)
  grid[0, 0, 0] = [np.nan, 0.2]
  grid[0, 0, 1] = [np.inf, -np.inf]
  grid[0, 1, 0] = [1e30, 0.0]
  grid[-1, -1, -1] = [-1.0 - 1.0 / w, 0.5]    # exactly one pixel outside
  cotangent = jnp.asarray(rng.standard_normal((b, ho, wo, c)), jnp.float32)
  return images, jnp.asarray(grid), cotangent


def value_and_grads(impl, images, grid, cotangent, align_corners):
  def f(im, g):
    return sampling.sample(im, g, align_corners=align_corners, implementation=impl)
  out, vjp = jax.vjp(f, images, grid)
  return (out,) + vjp(cotangent)


@pytest.mark.parametrize("shape", [(2, 5, 7, 1, 4, 6), (3, 9, 8, 3, 11, 5), (2, 6, 6, 5, 6, 6),
                                   (8, 28, 28, 1, 28, 28)])
@pytest.mark.parametrize("align_corners", [False, True])
def test_native_matches_the_pure_jax_sampler(shape, align_corners):
  images, grid, cotangent = inputs(shape)
  native = value_and_grads("native", images, grid, cotangent, align_corners)
  xla = value_and_grads("xla", images, grid, cotangent, align_corners)
  for name, a, b in zip(("values", "image gradient", "grid gradient"), native, xla):
    assert np.isfinite(np.asarray(a)).all(), name
    scale = float(jnp.abs(b).max()) + 1e-6
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6 * scale, rtol=1e-5,
                               err_msg=name)


def test_auto_picks_native_only_where_it_applies():
  images, grid, _ = inputs((2, 5, 5, 1, 3, 3))
  def has_kernel(fn, *args):
    return "stn_jax_bilinear_zeros" in str(jax.make_jaxpr(fn)(*args))
  assert has_kernel(lambda i, g: sampling.sample(i, g), images, grid)
  assert not has_kernel(lambda i, g: sampling.sample(i, g, padding_mode="border"), images, grid)
  assert not has_kernel(lambda i, g: sampling.sample(i, g, method="bicubic"), images, grid)
  assert not has_kernel(lambda i, g: sampling.sample(i, g, implementation="xla"), images, grid)
  assert not has_kernel(lambda i, g: sampling.sample(i, g), images.astype(jnp.bfloat16), grid)


def test_native_refuses_what_it_cannot_do():
  images, grid, _ = inputs((2, 5, 5, 1, 3, 3))
  with pytest.raises(ValueError, match="implementation='native' takes method='bilinear'"):
    sampling.sample(images, grid, method="nearest", implementation="native")
  with pytest.raises(ValueError, match="float16"):
    sampling.sample(images.astype(jnp.float16), grid, implementation="native")
  with pytest.raises(ValueError, match="unknown implementation 'cuda'"):
    sampling.sample(images, grid, implementation="cuda")


def test_native_under_vmap_jit_and_grad():
  images, grid, cotangent = inputs((3, 6, 7, 2, 4, 5))
  stacked = (jnp.stack([images, images * 2]), jnp.stack([grid, -grid]))
  def f(impl):
    return jax.jit(jax.vmap(lambda i, g: sampling.sample(i, g, implementation=impl)))
  np.testing.assert_allclose(f("native")(*stacked), f("xla")(*stacked), atol=1e-6)
  def loss(impl):
    return lambda i, g: (jax.vmap(lambda a, b: sampling.sample(a, b, implementation=impl))(i, g)
                         ** 2).sum()
  for a, b in zip(jax.grad(loss("native"), (0, 1))(*stacked), jax.grad(loss("xla"), (0, 1))(*stacked)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-5)


def test_native_gradients_numerically():
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.standard_normal((2, 6, 7, 2)), jnp.float32)
  # Points away from pixel boundaries, where the sampler is smooth.
  grid = jnp.asarray(rng.uniform(-0.9, 0.9, (2, 4, 5, 2)), jnp.float32)
  check_grads(lambda i, g: sampling.sample(i, g, implementation="native"), (images, grid),
              order=1, modes=["rev"], eps=1e-3, atol=5e-2, rtol=5e-2)


def test_everything_works_without_the_kernel():
  code = ("import jax.numpy as jnp, numpy as np\n"
          "from stn_jax import _native, sampling\n"
          "assert not _native.available()\n"
          "out = sampling.sample(jnp.ones((1, 4, 4, 1)), jnp.zeros((1, 2, 2, 2)))\n"
          "assert np.allclose(out, 1.0)\n"
          "print('ok')\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, STN_JAX_NATIVE="0", JAX_PLATFORMS="cpu"))
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("channels", [1, 3, 5])
@pytest.mark.parametrize("align_corners", [False, True])
def test_forward_never_reads_pixels_outside_a_points_footprint(channels, align_corners):
  # The vectorised forward reads out-of-image taps at a clamped address and then
  # discards them: a non-finite pixel there must not leak into any output.
  h, w = 6, 7
  images = np.random.default_rng(1).standard_normal((2, h, w, channels)).astype(np.float32)
  images[:, 0, 0] = np.inf                      # the corner every clamped tap would read
  images[:, h - 1, w - 1] = np.nan
  px = np.array([-1.9, -1.5, -1.0, -0.5, 0.5, 3.2, w - 1.5, w - 1.0, w - 0.5, w + 0.9, w + 1.5])
  xs, ys = np.meshgrid(px, px * h / w, indexing="xy")
  grid = np.stack([coordinates.from_pixel(xs, w, align_corners),
                   coordinates.from_pixel(ys, h, align_corners)], -1)
  grid = np.broadcast_to(grid, (2,) + grid.shape).astype(np.float32).copy()
  grid[1, 0, :, 1] = np.nan                     # one axis NaN, the other in range
  grid[1, 1, :, 0] = -np.inf
  def sample(images, implementation):
    return np.asarray(sampling.sample(jnp.asarray(images), jnp.asarray(grid),
                                      align_corners=align_corners, implementation=implementation))
  # With finite pixels, the kernel equals the pure-JAX sampler at every such point. (That
  # sampler weights a clamped tap by 0, so a non-finite pixel reaches a point whose clamped
  # taps read it; the kernel, like PyTorch's grid_sample, only reads in-image taps.)
  finite = np.nan_to_num(images, nan=2.0, posinf=3.0)
  np.testing.assert_allclose(sample(finite, "native"), sample(finite, "xla"), rtol=1e-6,
                             atol=1e-6)
  native = sample(images, "native")
  # Points whose footprint holds neither bad pixel are finite, and equal the finite case.
  touches = lambda x0, y0, x1, y1: (np.floor(xs) <= x1) & (np.floor(xs) + 1 >= x0) & (
      np.floor(ys) <= y1) & (np.floor(ys) + 1 >= y0)
  clean = ~touches(0, 0, 0, 0) & ~touches(w - 1, h - 1, w - 1, h - 1)
  np.testing.assert_array_equal(native[0][clean], sample(finite, "native")[0][clean])
  assert np.isfinite(native[0][clean]).all() and not np.isfinite(native[0][~clean]).all()
  assert np.isfinite(native[1, :2]).all() and not native[1, :2].any()


def test_a_compiler_without_march_native_gets_the_portable_build(tmp_path):
  wrapper = tmp_path / "cxx"
  calls = tmp_path / "calls"
  wrapper.write_text("#!/bin/sh\n"
                     f"echo \"$*\" >> {calls}\n"
                     "for a in \"$@\"; do [ \"$a\" = -march=native ] && "
                     "{ echo 'unsupported -march=native' >&2; exit 1; }; done\n"
                     f"exec {_native._compiler()} \"$@\"\n")
  wrapper.chmod(0o755)
  code = ("import jax.numpy as jnp, numpy as np, os\n"
          "from stn_jax import _native, sampling\n"
          "assert _native.available()\n"
          "out = sampling.sample(jnp.ones((1, 4, 4, 3)), jnp.zeros((1, 2, 2, 2)))\n"
          "assert np.allclose(out, 1.0)\n"
          "print(len([f for f in os.listdir(os.environ['STN_JAX_CACHE']) if f.endswith('.so')]))\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, CXX=str(wrapper), STN_JAX_CACHE=str(tmp_path / "c"),
                                   JAX_PLATFORMS="cpu"), timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "1"   # only the portable library was built
  # A second start finds the cached portable build and compiles nothing (only --version).
  builds = lambda: [line for line in calls.read_text().splitlines() if "-o" in line.split()]
  before = len(builds())
  again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, CXX=str(wrapper), STN_JAX_CACHE=str(tmp_path / "c"),
                                  JAX_PLATFORMS="cpu"), timeout=300)
  assert again.returncode == 0 and again.stdout.strip() == "1", again.stderr[-2000:]
  assert len(builds()) == before == 2


# --- The pixel-centre rule (issue 13): the kernel against the pure-JAX sampler ------------


def nudged_identity_grid(b, hw, nudge_px, align_corners):
  """The identity grid of an ``hw`` image, every point moved by ``nudge_px`` pixels in x and y."""
  h, w = hw
  ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                       indexing="ij")
  x = coordinates.from_pixel(xs + nudge_px, w, align_corners)
  y = coordinates.from_pixel(ys + nudge_px, h, align_corners)
  return jnp.asarray(np.broadcast_to(np.stack([x, y], -1), (b, h, w, 2)), jnp.float32)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("nudge_px", [0.0, 1e-9, -1e-9, 0.5 * PIXEL_CENTRE_TOLERANCE,
                                      2 * PIXEL_CENTRE_TOLERANCE, -2e-4])
def test_kernel_follows_the_pixel_centre_rule(nudge_px, align_corners):
  # At and within PIXEL_CENTRE_TOLERANCE of pixel centres the grid gradient is the
  # central difference, beyond it the one-sided slope: the kernel (which gets the
  # tolerance from stn_jax.sampling) and the pure-JAX sampler agree on both sides of it.
  rng = np.random.default_rng(3)
  images = jnp.asarray(rng.standard_normal((2, 6, 7, 3)), jnp.float32)
  cotangent = jnp.asarray(rng.standard_normal((2, 6, 7, 3)), jnp.float32)
  grid = nudged_identity_grid(2, (6, 7), nudge_px, align_corners)
  native = value_and_grads("native", images, grid, cotangent, align_corners)
  xla = value_and_grads("xla", images, grid, cotangent, align_corners)
  jitted = jax.jit(lambda i, g: value_and_grads("native", i, g, cotangent, align_corners))(
      images, grid)
  for name, a, b, c in zip(("values", "image gradient", "grid gradient"), native, xla, jitted):
    scale = float(jnp.abs(b).max())
    np.testing.assert_allclose(a, b, atol=1e-5 * scale, err_msg=name)
    np.testing.assert_allclose(a, c, atol=1e-6 * scale, err_msg=f"{name}: eager != jit")


def test_grid_gradient_at_a_centre_is_the_central_difference():
  # An independent oracle: along x at pixel centre n, (v[n + 1] - v[n - 1]) / 2 per pixel,
  # times d(pixel)/d(normalised) = W / 2 (align_corners=False); 0 outside the image.
  rng = np.random.default_rng(4)
  images = rng.standard_normal((1, 4, 5, 1)).astype(np.float32)
  grid = nudged_identity_grid(1, (4, 5), 0.0, False)
  grad_grid = jax.grad(lambda g: _native.bilinear_zeros(jnp.asarray(images), g, False).sum())(grid)
  padded = np.pad(images[0, ..., 0], 1)
  expected_x = 0.5 * (padded[1:-1, 2:] - padded[1:-1, :-2]) * 5 / 2
  expected_y = 0.5 * (padded[2:, 1:-1] - padded[:-2, 1:-1]) * 4 / 2
  np.testing.assert_allclose(grad_grid[0, ..., 0], expected_x, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grad_grid[0, ..., 1], expected_y, rtol=1e-5, atol=1e-6)


# --- Every transformation (issue 18 item 1): the kernel against the pure-JAX sampler -------


def small_inputs(seed=5):
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.standard_normal((2, 4, 5, 2)), jnp.float32)
  grid = jnp.asarray(rng.uniform(-1.2, 1.2, (2, 3, 2, 2)), jnp.float32)
  return images, grid


def assert_trees_close(a, b, rtol=2e-5):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert x.shape == y.shape
    np.testing.assert_allclose(x, y, atol=rtol * (float(jnp.abs(y).max()) + 1e-6))


def sampler(impl):
  return lambda i, g: sampling.sample(i, g, implementation=impl)


def loss(impl):
  return lambda i, g: (sampler(impl)(i, g) ** 2 * jnp.cos(g[..., :1])).sum()


TRANSFORMATIONS = {
    "jvp": lambda f, i, g: jax.jvp(f, (i, g), (jnp.cos(i), jnp.sin(g))),
    "jacfwd": lambda f, i, g: jax.jacfwd(f, (0, 1))(i, g),
    "jacrev": lambda f, i, g: jax.jacrev(f, (0, 1))(i, g),
    "linear_transpose": lambda f, i, g: jax.linear_transpose(lambda x: f(x, g), i)(f(i, g)),
}
LOSS_TRANSFORMATIONS = {
    "grad": lambda l, i, g: jax.grad(l, (0, 1))(i, g),
    "hessian": lambda l, i, g: jax.hessian(l, (0, 1))(i, g),
    "grad of grad": lambda l, i, g: jax.grad(
        lambda i, g: (jax.grad(l, (0, 1))(i, g)[1] ** 2).sum() + jax.grad(l)(i, g).sum(),
        (0, 1))(i, g),
    "jvp of grad": lambda l, i, g: jax.jvp(jax.grad(l, (0, 1)), (i, g), (i, g)),
    "vmap of grad": lambda l, i, g: jax.vmap(jax.grad(l, (0, 1)))(i[:, None], g[:, None]),
    "vmap of hessian": lambda l, i, g: jax.vmap(jax.hessian(l, 1))(i[:, None], g[:, None]),
}


# Under jit (one compilation each; eager use is covered above).
@pytest.mark.parametrize("name", TRANSFORMATIONS)
def test_every_transformation_of_the_sampler_matches_pure_jax(name):
  images, grid = small_inputs()
  def run(impl):
    return jax.jit(lambda i, g: TRANSFORMATIONS[name](sampler(impl), i, g))(images, grid)
  assert_trees_close(run("native"), run("xla"))


@pytest.mark.parametrize("name", LOSS_TRANSFORMATIONS)
def test_every_transformation_of_a_loss_matches_pure_jax(name):
  images, grid = small_inputs()
  def run(impl):
    return jax.jit(lambda i, g: LOSS_TRANSFORMATIONS[name](loss(impl), i, g))(images, grid)
  assert_trees_close(run("native"), run("xla"))


def test_first_order_reverse_mode_runs_only_the_kernels():
  # The speed of training: grad compiles to the forward and backward kernels, not to gathers.
  images, grid = small_inputs()
  hlo = jax.jit(jax.grad(loss("native"), (0, 1))).lower(images, grid).as_text()
  assert "stn_jax_bilinear_zeros_forward" in hlo and "stn_jax_bilinear_zeros_backward" in hlo
  assert "gather" not in hlo and "scatter" not in hlo


# --- Edge shapes (issue 18 item 6) and the missing-compiler warning (issue 15) -------------


@pytest.mark.parametrize("images_shape, grid_shape", [((0, 5, 6, 2), (0, 3, 4, 2)),
                                                      ((2, 5, 6, 2), (2, 0, 4, 2)),
                                                      ((2, 5, 6, 2), (2, 3, 0, 2))])
def test_empty_batches_and_grids_give_empty_results(images_shape, grid_shape):
  images, grid = jnp.ones(images_shape, jnp.float32), jnp.zeros(grid_shape, jnp.float32)
  out_shape = grid_shape[:3] + images_shape[-1:]
  assert _native.bilinear_zeros(images, grid, False).shape == out_shape
  assert jax.jit(sampler("native"))(images, grid).shape == out_shape
  grad_images, grad_grid = jax.grad(lambda i, g: sampler("native")(i, g).sum(), (0, 1))(images,
                                                                                          grid)
  assert grad_images.shape == images_shape and grad_grid.shape == grid_shape
  assert not np.asarray(grad_images).any()


def test_missing_compiler_warning_says_what_it_costs_and_how_to_fix_it(tmp_path):
  code = ("import warnings\n"
          "from stn_jax import _native\n"
          "with warnings.catch_warnings(record=True) as caught:\n"
          "  warnings.simplefilter('always')\n"
          "  assert not _native.available()\n"
          "print(caught[0].message)\n")
  env = {k: v for k, v in os.environ.items() if k != "CXX"}
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(env, PATH=str(tmp_path), JAX_PLATFORMS="cpu"), timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  message = result.stdout
  for part in ("no C++ compiler", "3.5-5x slower", "apt-get install g++", "STN_JAX_NATIVE=0"):
    assert part in message, message
