"""Tests of the Flax NNX modules and the paper's models."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads
from flax import nnx

import stn_jax
from tests.multidevice import run_with_devices
from stn_jax import transforms
from stn_jax.models import (AdditionModel, DistortedMnistModel, MultiDigitCNN,
                            ParallelSTClassifier, count_params)
from stn_jax.modules import LocalisationNet, ParallelTransformers, SpatialTransformer


def conv(k, cin, cout):
  return k * k * cin * cout + cout


def dense(n_in, n_out):
  return n_in * n_out + n_out


@pytest.mark.parametrize("kind", transforms.KINDS)
@pytest.mark.parametrize("cnn", [False, True])
def test_fresh_transformer_is_identity(kind, cnn):
  spec = dict(conv=((8, 5, True),), hidden=(16,)) if cnn else dict(hidden=(16, 16))
  st = SpatialTransformer(LocalisationNet((12, 10), 3, transform=kind, rngs=nnx.Rngs(0), **spec))
  x = jax.random.uniform(jax.random.key(1), (4, 12, 10, 3))
  warped, params = st(x)
  np.testing.assert_allclose(warped, x, atol=1e-5)
  np.testing.assert_allclose(params, jnp.tile(stn_jax.identity_params(kind), (4, 1)), atol=1e-7)


def test_output_size_may_differ_from_input():
  st = SpatialTransformer(LocalisationNet((16, 16), 1, transform="attention", rngs=nnx.Rngs(0)),
                          out_hw=(8, 8))
  warped, _ = st(jnp.ones((2, 16, 16, 1)))
  assert warped.shape == (2, 8, 8, 1)
  # Identity attention at half resolution reads the whole image, downsampled.
  np.testing.assert_allclose(warped, 1.0, atol=1e-6)


def test_gradients_reach_localisation_net():
  st = SpatialTransformer(LocalisationNet((10, 10), 1, transform="affine", hidden=(8,),
                                          rngs=nnx.Rngs(0)))
  x = jax.random.uniform(jax.random.key(0), (3, 10, 10, 1))
  target = jnp.roll(x, 1, axis=2)
  def loss(model):
    return ((model(x)[0] - target) ** 2).mean()
  grads = nnx.grad(loss)(st)
  loc_grads = nnx.state(grads.localisation, nnx.Param)
  norms = {"/".join(map(str, path)): float(jnp.abs(g).sum())
           for path, g in jax.tree_util.tree_flatten_with_path(loc_grads)[0]}
  regression = {k: n for k, n in norms.items() if "regression" in k}
  assert regression and all(n > 0 for n in regression.values()), norms


def test_training_moves_translation_the_right_way():
  """Target = input shifted right by 2 pixels: the predicted tx must become negative."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(0, 1, (16, 12, 12, 1)), jnp.float32)
  x = jnp.asarray(np.asarray(jax.image.resize(x[:, ::2, ::2], x.shape, "linear")))  # Smooth.
  target = jnp.roll(x, 2, axis=2)      # out[:, j] = x[:, j - 2]: reads 2 pixels to the left.
  st = SpatialTransformer(LocalisationNet((12, 12), 1, transform="translation", hidden=(8,),
                                          rngs=nnx.Rngs(0)))
  opt = nnx.Optimizer(st, optax.adam(3e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    def loss(m):
      return ((m(x)[0][:, :, 3:-3] - target[:, :, 3:-3]) ** 2).mean()
    value, grads = nnx.value_and_grad(loss)(model)
    opt.update(model, grads)
    return value

  first = float(step(st, opt))
  for _ in range(60):
    last = float(step(st, opt))
  tx = np.asarray(st(x)[1][:, 0])
  assert last < 0.5 * first
  np.testing.assert_allclose(tx, -2 * 2 / 12, atol=0.08)  # Two pixels in normalised units.


def test_parallel_transformers_concat_and_list():
  sts = [SpatialTransformer(LocalisationNet((8, 8), 2, transform=k, hidden=(4,), rngs=nnx.Rngs(i)))
         for i, k in enumerate(["affine", "attention", "tps"])]
  x = jnp.ones((2, 8, 8, 2))
  out, params = ParallelTransformers(sts)(x)
  assert out.shape == (2, 8, 8, 6) and [p.shape[1] for p in params] == [6, 3, 32]
  outs, _ = ParallelTransformers(sts, combine="list")(x)
  assert len(outs) == 3 and all(o.shape == x.shape for o in outs)


def mnist_cnn_count(hw, in_ch=1):
  return conv(9, in_ch, 32) + conv(7, 32, 32) + dense((hw[0] // 4) * (hw[1] // 4) * 32, 10)


def mnist_fcn_count(hw, in_ch=1):
  return dense(hw[0] * hw[1] * in_ch, 256) + dense(256, 256) + dense(256, 10)


def st_fcn_loc_count(hw, p):
  return dense(hw[0] * hw[1], 32) + dense(32, 32) + dense(32, 32) + dense(32, p)


def st_cnn_loc_count(hw, p):
  h, w = (hw[0] - 4) // 2 - 4, (hw[1] - 4) // 2 - 4
  return conv(5, 1, 20) + conv(5, 20, 20) + dense(h * w * 20, 20) + dense(20, p)


@pytest.mark.parametrize("backbone", ["fcn", "cnn"])
@pytest.mark.parametrize("transform", [None, "affine", "projective", "tps"])
@pytest.mark.parametrize("hw,post_pool", [((28, 28), 1), ((42, 42), 2)])
def test_distorted_mnist_models(backbone, transform, hw, post_pool):
  model = DistortedMnistModel(hw, backbone=backbone, transform=transform, post_pool=post_pool,
                              rngs=nnx.Rngs(0))
  logits = model(jnp.ones((2,) + hw + (1,)))
  assert logits.shape == (2, 10)
  pooled = (hw[0] // post_pool, hw[1] // post_pool)
  expected = (mnist_fcn_count if backbone == "fcn" else mnist_cnn_count)(pooled)
  if transform:
    p = transforms.num_params(transform)
    expected += (st_fcn_loc_count if backbone == "fcn" else st_cnn_loc_count)(hw, p)
  assert count_params(model) == expected


def test_multi_digit_models():
  feats = (48, 64, 128, 160, 192, 192, 192, 192)
  chans = (3,) + feats
  backbone = sum(conv(5, chans[i], chans[i + 1]) for i in range(8))
  backbone += dense(4 * 4 * 192, 3072) + dense(3072, 3072) + dense(3072, 7) + dense(3072, 55)
  single_loc = conv(5, 3, 32) + conv(5, 32, 32) + dense(26 * 26 * 32, 32) + dense(32, 6)
  hws = [(64, 64), (32, 32), (32, 32), (16, 16)]
  multi_loc = sum(dense(h * w * c, 32) + dense(32, 32) + dense(32, 6)
                  for (h, w), c in zip(hws, chans[:4]))
  x = jnp.ones((2, 64, 64, 3))
  for st, extra in [(None, 0), ("single", single_loc), ("multi", multi_loc)]:
    model = MultiDigitCNN(st=st, rngs=nnx.Rngs(0))
    model.eval()
    length, digits = model(x)
    assert length.shape == (2, 7) and digits.shape == (2, 5, 11)
    assert count_params(model) == backbone + extra, st


class TinyBackbone(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.conv(x)).mean(axis=(1, 2))


def test_parallel_st_classifier_and_addition():
  model = ParallelSTClassifier(TinyBackbone, 8, num_transformers=4, in_hw=(64, 64),
                               crop_hw=(32, 32), rngs=nnx.Rngs(0))
  model.eval()
  assert model(jnp.ones((2, 64, 64, 3))).shape == (2, 200)
  crops, params = model.crops(jnp.ones((2, 64, 64, 3)))
  assert len(crops) == 4 and crops[0].shape == (2, 32, 32, 3) and params[0].shape == (2, 3)
  loc = conv(5, 3, 32) + conv(5, 32, 32) + dense(1 * 1 * 32, 128) + dense(128, 3)
  assert count_params(model) == 4 * (loc + conv(3, 3, 8)) + dense(32, 200)

  add = AdditionModel(rngs=nnx.Rngs(0))
  assert add(jnp.ones((2, 42, 42, 2))).shape == (2, 19)
  loc = dense(42 * 42 * 2, 32) + 2 * dense(32, 32) + dense(32, 6)
  assert count_params(add) == 2 * loc + mnist_fcn_count((42, 42), 4) - dense(256, 10) + dense(256, 19)


def test_split_merge_and_pure_jit_vmap():
  model = DistortedMnistModel((28, 28), transform="affine", rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  x = jax.random.uniform(jax.random.key(0), (4, 28, 28, 1))

  @jax.jit
  def apply(state, x):
    return nnx.merge(graphdef, state)(x)

  expected = model(x)
  np.testing.assert_allclose(apply(state, x), expected, atol=1e-5)
  per_example = jax.vmap(lambda xi: apply(state, xi[None])[0])(x)
  np.testing.assert_allclose(per_example, expected, atol=1e-5)
  restored = nnx.merge(graphdef, state)
  np.testing.assert_allclose(restored(x), expected, atol=1e-6)


def test_linen_bridge_matches_nnx():
  x = jax.random.uniform(jax.random.key(0), (2, 28, 28, 1))
  linen_model = nnx.bridge.to_linen(DistortedMnistModel, (28, 28), backbone="cnn",
                                    transform="tps")
  variables = linen_model.init(jax.random.key(0), x)
  assert linen_model.apply(variables, x).shape == (2, 10)
  # The Linen parameters have the NNX model's structure; with the NNX model's
  # values the Linen module computes the same function.
  nnx_model = DistortedMnistModel((28, 28), backbone="cnn", transform="tps", rngs=nnx.Rngs(0))
  nnx_params = nnx.state(nnx_model, nnx.Param).to_pure_dict()
  assert jax.tree.structure(nnx_params) == jax.tree.structure(dict(variables["params"]))
  np.testing.assert_allclose(linen_model.apply({"params": nnx_params}, x), nnx_model(x),
                             atol=1e-6)


def test_pmap_on_eight_cpu_devices():
  run_with_devices("""
      import jax, jax.numpy as jnp, numpy as np
      from flax import nnx
      from stn_jax.models import DistortedMnistModel
      assert jax.local_device_count() == 8, jax.devices()
      model = DistortedMnistModel((28, 28), transform="affine", rngs=nnx.Rngs(0))
      graphdef, state = nnx.split(model)
      x = jax.random.uniform(jax.random.key(0), (8, 2, 28, 28, 1))
      replicated = jax.tree.map(lambda a: jnp.broadcast_to(a, (8,) + a.shape), state)
      out = jax.pmap(lambda s, xb: nnx.merge(graphdef, s)(xb))(replicated, x)
      np.testing.assert_allclose(out.reshape(16, 10), model(x.reshape(16, 28, 28, 1)), atol=1e-5)
      print("ok")
  """)


BAD_MODULE_CASES = [
    (lambda: LocalisationNet((8, 8), 1, transform="shear", rngs=nnx.Rngs(0)), r"unknown transform 'shear'"),
    (lambda: LocalisationNet((8, 0), 1, rngs=nnx.Rngs(0)), r"in_hw must be a pair of positive integers"),
    (lambda: SpatialTransformer(LocalisationNet((8, 8), 1, rngs=nnx.Rngs(0)), method="area"), r"unknown method 'area'"),
    (lambda: SpatialTransformer(LocalisationNet((8, 8), 1, rngs=nnx.Rngs(0)), out_hw=(4,)), r"out_hw must be a pair of positive integers"),
    (lambda: SpatialTransformer(LocalisationNet((8, 8), 1, rngs=nnx.Rngs(0)))(jnp.ones((2, 8, 8, 3))), r"x must have shape \[B, 8, 8, 1\] for this module; got \[2, 8, 8, 3\]"),
    (lambda: SpatialTransformer(LocalisationNet((8, 8), 1, rngs=nnx.Rngs(0)))(jnp.ones((8, 8, 1))), r"x must have rank 4"),
    (lambda: DistortedMnistModel(backbone="resnet", rngs=nnx.Rngs(0)), r"unknown backbone 'resnet'"),
    (lambda: LocalisationNet((4, 4), 1, conv=((8, 5, False),), rngs=nnx.Rngs(0)), r"too small for a 5x5 convolution"),
    (lambda: LocalisationNet((8, 8), 0, rngs=nnx.Rngs(0)), r"in_channels must be a positive integer; got 0"),
]


@pytest.mark.parametrize("call,message", BAD_MODULE_CASES)
def test_bad_input_raises_value_error(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def test_max_pool_2x2_equals_flax_max_pool():
  from stn_jax.modules import max_pool_2x2
  x = jax.random.normal(jax.random.key(0), (3, 9, 8, 4))
  np.testing.assert_array_equal(np.asarray(max_pool_2x2(x)),
                                np.asarray(nnx.max_pool(x, (2, 2), (2, 2))))
  g = jax.grad(lambda x: (max_pool_2x2(x) ** 2).sum())(x)
  g_ref = jax.grad(lambda x: (nnx.max_pool(x, (2, 2), (2, 2)) ** 2).sum())(x)
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-6)
  check_grads(max_pool_2x2, (x,), order=1, modes=("fwd", "rev"), eps=1e-3)


def test_max_pool_2x2_ties_share_the_gradient():
  from stn_jax.modules import max_pool_2x2
  # One window: a 4-way tie (after a ReLU: all zero), a 2-way tie, no tie.
  x = jnp.array([[0.0, 0.0, 2.0, 1.0, 3.0, 1.0],
                 [0.0, 0.0, 2.0, 0.5, 0.2, 0.1]])[None, :, :, None]
  g = np.asarray(jax.grad(lambda x: max_pool_2x2(x).sum())(x))[0, :, :, 0]
  np.testing.assert_allclose(g[:, :2], 0.25)                         # shares sum to one
  np.testing.assert_allclose(g[:, 2:4], [[0.5, 0.0], [0.5, 0.0]])
  np.testing.assert_allclose(g[:, 4:], [[1.0, 0.0], [0.0, 0.0]])
