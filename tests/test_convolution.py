"""stn_jax.convolution: values and gradients equal lax.conv_general_dilated's; the patch path is taken."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax
from jax.test_util import check_grads

from stn_jax import convolution
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


def test_patch_path_is_used_on_cpu_for_one_channel():
  """The custom JVP (products over patches) shows up in the gradient's jaxpr; not for 8 channels."""
  def grad_jaxpr(channels):
    x, w = _inputs(channels, 3)
    return str(jax.make_jaxpr(jax.grad(_loss(convolution.conv_general_dilated, "SAME"), (0, 1)))(x, w))
  one, eight = grad_jaxpr(1), grad_jaxpr(8)
  assert "platform_index" in one and "dot_general" in one
  assert "platform_index" not in eight


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


def test_patch_gradients_switch(monkeypatch):
  """Off (argument or STN_JAX_PATCH_GRADIENTS=0), a layer is a plain nnx.Conv (lax's convolution)."""
  assert conv_layer(1, 4, 3, rngs=nnx.Rngs(0)).conv_general_dilated is convolution.conv_general_dilated
  off = conv_layer(1, 4, 3, patch_gradients=False, rngs=nnx.Rngs(0))
  assert off.conv_general_dilated is lax.conv_general_dilated
  monkeypatch.setenv("STN_JAX_PATCH_GRADIENTS", "0")
  assert conv_layer(1, 4, 3, rngs=nnx.Rngs(0)).conv_general_dilated is lax.conv_general_dilated
  x, _ = _inputs(1, 1, hw=(8, 8))
  jaxpr = str(jax.make_jaxpr(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(off))
  assert "platform_index" not in jaxpr
