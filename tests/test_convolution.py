"""stn_jax.convolution and its compiled kernels (stn_jax._native.conv): values and gradients equal
lax.conv_general_dilated's and an independent NumPy oracle's; each CPU path is taken where it should be."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax.test_util import check_grads

from stn_jax import _native, convolution
from stn_jax.modules import conv_layer

NHWC = ("NHWC", "HWIO", "NHWC")


def _inputs(channels, kernel, features=5, hw=(9, 11), batch=2, dtype=jnp.float32):
  x = jax.random.normal(jax.random.key(0), (batch, *hw, channels), dtype)
  w = jax.random.normal(jax.random.key(1), (kernel, kernel, channels, features), dtype) * 0.3
  return x, w


def _loss(conv, padding, strides=(1, 1)):
  def loss(x, w):
    y = conv(x, w, strides, padding, dimension_numbers=NHWC)
    return jnp.sum(jnp.sin(y) * jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size)
  return loss


@pytest.mark.parametrize("padding", ["VALID", "SAME", [(1, 2), (0, 3)]])
@pytest.mark.parametrize("channels,kernel", [(1, 3), (1, 4), (3, 5), (8, 3)])
def test_values_and_gradients_match_lax(padding, channels, kernel):
  x, w = _inputs(channels, kernel)
  ours = jax.jit(jax.value_and_grad(_loss(convolution.conv_general_dilated, padding), (0, 1)))
  ref = jax.jit(jax.value_and_grad(_loss(lax.conv_general_dilated, padding), (0, 1)))
  (value, (dx, dw)), (value_ref, (dx_ref, dw_ref)) = ours(x, w), ref(x, w)
  np.testing.assert_allclose(value, value_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-4, atol=1e-5)
  y = convolution.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=NHWC)
  np.testing.assert_allclose(y, lax.conv_general_dilated(x, w, (1, 1), padding,
                                                         dimension_numbers=NHWC),
                             rtol=1e-5, atol=1e-6)


def _grad_jaxpr(channels, dtype=jnp.float32):
  x, w = _inputs(channels, 3, dtype=dtype)
  return str(jax.make_jaxpr(jax.grad(_loss(convolution.conv_general_dilated, "SAME"), (0, 1)))(x, w))


needs_native = pytest.mark.skipif(not _native.available(), reason="compiled kernels not built")


@needs_native
def test_float32_takes_the_compiled_kernels_on_cpu():
  for channels in (1, 8):
    jaxpr = _grad_jaxpr(channels)
    assert "platform_index" in jaxpr and "stn_jax_conv" in jaxpr


def test_patch_path_without_the_kernels(monkeypatch):
  """float64 (or STN_JAX_NATIVE_CONV=0): products over patches for 1 channel, plain lax for 8."""
  with jax.enable_x64(True):
    one, eight = _grad_jaxpr(1, jnp.float64), _grad_jaxpr(8, jnp.float64)
  assert "platform_index" in one and "dot_general" in one and "stn_jax_conv" not in one
  assert "platform_index" not in eight
  monkeypatch.setenv("STN_JAX_NATIVE_CONV", "0")
  one = _grad_jaxpr(1)
  assert "platform_index" in one and "dot_general" in one and "stn_jax_conv" not in one


@pytest.mark.parametrize("channels", [1, 2])
def test_check_grads_float64(channels):
  """Forward and reverse mode, first and second order, against finite differences."""
  with jax.enable_x64(True):
    x, w = _inputs(channels, 3, features=2, hw=(5, 6), batch=1, dtype=jnp.float64)
    f = lambda x, w: convolution.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
    check_grads(f, (x, w), order=2, modes=["fwd", "rev"], eps=1e-4, atol=1e-6, rtol=1e-6)


def test_patches_match_lax_patches():
  """Our (row, column, channel) patch order against lax.conv_general_dilated_patches (channel first)."""
  x, _ = _inputs(3, 1, hw=(7, 8))
  ours = convolution.patches(x, (3, 4))
  ref = lax.conv_general_dilated_patches(x, (3, 4), (1, 1), "VALID", dimension_numbers=NHWC)
  ref = ref.reshape(*ref.shape[:3], 3, 3, 4).transpose(0, 1, 2, 4, 5, 3).reshape(ours.shape)
  np.testing.assert_array_equal(ours, ref)


def test_ineligible_arguments_go_to_lax():
  """Strides, dilation and grouping are passed through to lax unchanged."""
  x, w = _inputs(2, 3, features=4)
  for kwargs in [dict(window_strides=(2, 2)), dict(window_strides=(1, 1), rhs_dilation=(2, 2)),
                 dict(window_strides=(1, 1), feature_group_count=2)]:
    kernel = w[:, :, :1] if kwargs.get("feature_group_count") == 2 else w
    got = convolution.conv_general_dilated(x, kernel, padding="SAME", dimension_numbers=NHWC,
                                           **kwargs)
    want = lax.conv_general_dilated(x, kernel, padding="SAME", dimension_numbers=NHWC, **kwargs)
    np.testing.assert_array_equal(got, want)


def test_conv_layer_equals_plain_nnx_conv():
  layer = conv_layer(1, 4, 5, rngs=nnx.Rngs(0))
  plain = nnx.Conv(1, 4, (5, 5), rngs=nnx.Rngs(0))
  x, _ = _inputs(1, 1, hw=(12, 12))
  np.testing.assert_allclose(layer(x), plain(x), rtol=1e-5, atol=1e-6)
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))
  for a, b in zip(jax.tree.leaves(nnx.state(grads(layer))), jax.tree.leaves(nnx.state(grads(plain)))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_cpu_convolution_switch(monkeypatch):
  """Off (argument or STN_JAX_CPU_CONVOLUTION=0), a layer is a plain nnx.Conv (lax's convolution)."""
  assert conv_layer(1, 4, 3, rngs=nnx.Rngs(0)).conv_general_dilated is convolution.conv_general_dilated
  off = conv_layer(1, 4, 3, cpu_convolution=False, rngs=nnx.Rngs(0))
  assert off.conv_general_dilated is lax.conv_general_dilated
  monkeypatch.setenv("STN_JAX_CPU_CONVOLUTION", "0")
  assert conv_layer(1, 4, 3, rngs=nnx.Rngs(0)).conv_general_dilated is lax.conv_general_dilated
  x, _ = _inputs(1, 1, hw=(8, 8))
  jaxpr = str(jax.make_jaxpr(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(off))
  assert "platform_index" not in jaxpr


# --- The compiled kernels (native/convolution.cc) ---------------------------------------------


def _numpy_conv(x, w, padding):
  """Independent oracle: sum over kernel taps of shifted input windows times the tap's matrix."""
  x = np.pad(np.asarray(x, np.float64), [(0, 0), *padding, (0, 0)])
  kh, kw = w.shape[:2]
  ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  out = np.zeros((x.shape[0], ho, wo, w.shape[3]))
  for i in range(kh):
    for j in range(kw):
      out += x[:, i:i + ho, j:j + wo, :] @ np.asarray(w[i, j], np.float64)
  return out


# (batch, height, width, in channels, out channels, kernel, padding): one input channel and
# many, output channels below, at and between multiples of 8 and beyond one 32-channel block,
# rows whose width leaves every remainder of the pixel blocks, 1x1 and non-square kernels.
KERNEL_CASES = [
    (2, 9, 11, 1, 20, (5, 5), ((0, 0), (0, 0))),
    (3, 7, 13, 20, 20, (3, 5), ((1, 1), (2, 2))),
    (2, 10, 10, 32, 32, (7, 7), ((3, 3), (3, 3))),
    (1, 6, 17, 5, 1, (2, 3), ((1, 0), (0, 2))),
    (2, 5, 9, 3, 41, (3, 3), ((2, 2), (1, 1))),
    (1, 4, 4, 9, 8, (1, 1), ((0, 0), (0, 0))),
    (0, 6, 6, 4, 6, (3, 3), ((1, 1), (1, 1))),
]


@needs_native
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"{c[3]}to{c[4]}_k{c[5][0]}x{c[5][1]}")
def test_kernel_values_and_gradients_match_numpy_and_lax(case):
  n, h, w, c, o, kernel_hw, padding = case
  rng = np.random.default_rng(0)
  x = rng.standard_normal((n, h, w, c)).astype(np.float32)
  k = (rng.standard_normal((*kernel_hw, c, o)) * 0.3).astype(np.float32)
  out = jax.jit(_native.conv, static_argnums=2)(x, k, padding)
  np.testing.assert_allclose(out, _numpy_conv(x, k, padding), rtol=1e-4, atol=1e-4)
  g = rng.standard_normal(out.shape).astype(np.float32)
  ours = jax.vjp(lambda x, k: _native.conv(x, k, padding), x, k)[1](g)
  ref = jax.vjp(lambda x, k: lax.conv_general_dilated(x, k, (1, 1), padding,
                                                      dimension_numbers=NHWC), x, k)[1](g)
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@needs_native
def test_kernel_check_grads_both_modes_second_order():
  """Finite differences (the convolution is linear in each argument, so float32 steps suffice)."""
  x, w = _inputs(6, 3, features=10, hw=(6, 7))
  f = lambda x, w: _native.conv(x, w, ((1, 1), (0, 2)))
  check_grads(f, (x, w), order=2, modes=["fwd", "rev"], eps=1e-2, atol=2e-2, rtol=2e-2)


@needs_native
def test_kernel_second_order_matches_lax():
  """grad of grad (the transposes of the kernels' transposes) against XLA's convolution."""
  x, w = _inputs(6, 3, features=10, hw=(6, 7))
  def second(conv):
    inner = lambda x, w: jnp.sum(jnp.tanh(conv(x, w)))
    return jax.grad(lambda x, w: jnp.sum(jax.grad(inner, (0, 1))(x, w)[1] ** 2), (0, 1))(x, w)
  ours = second(lambda x, w: _native.conv(x, w, ((1, 1), (1, 1))))
  ref = second(lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC))
  for a, b in zip(ours, ref):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


@needs_native
def test_kernel_under_vmap_and_per_example_gradients():
  x, w = _inputs(5, 3, features=9, hw=(6, 6), batch=3)
  stacked = jnp.stack([x, 2 * x])                      # [2, 3, 6, 6, 5]: a mapped input
  conv = lambda x, w: _native.conv(x, w, ((1, 1), (1, 1)))
  ref = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
  np.testing.assert_allclose(jax.vmap(conv, (0, None))(stacked, w),
                             jax.vmap(ref, (0, None))(stacked, w), rtol=1e-5, atol=1e-5)
  per_example = lambda conv: jax.vmap(jax.grad(lambda x, w: jnp.sum(conv(x[None], w) ** 2), 1),
                                      (0, None))(x, w)
  np.testing.assert_allclose(per_example(conv), per_example(ref), rtol=1e-4, atol=1e-4)


@needs_native
def test_kernel_results_are_deterministic():
  """The same inputs give bit-identical values and gradients, run after run (threads or not)."""
  x, w = _inputs(20, 5, features=20, hw=(19, 19), batch=64)
  step = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(_native.conv(x, w))), (0, 1)))
  first = step(x, w)
  for _ in range(3):
    for a, b in zip(first, step(x, w)):
      np.testing.assert_array_equal(a, b)


@needs_native
def test_kernel_refuses_bad_padding():
  x, w = _inputs(3, 3)
  for padding in [((3, 0), (0, 0)), ((0, 0), (-1, 0)), ((0, 0),)]:
    with pytest.raises(ValueError, match="padding must be"):
      _native.conv(x, w, padding)
