"""The compiled CPU sampler (stn_jax._native) against the pure-JAX one."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from stn_jax import _native, sampling

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
