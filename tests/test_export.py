"""Every public program lowers for TPU and CUDA from this CPU-only machine (jax.export).

The sampler's 'auto' choice follows the platform a program is lowered for,
so the compiled CPU kernel (a custom call without compatibility guarantees)
never reaches a TPU or GPU program.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import export

import stn_jax
from stn_jax import models

PLATFORMS = ["tpu", "cuda"]


def _exported_text(fn, platform, *args):
  exported = export.export(jax.jit(fn), platforms=[platform])(*args)
  assert exported.platforms == (platform,)
  text = exported.mlir_module()
  assert "stn_jax_bilinear" not in text  # No CPU kernel.
  return text


def _counts(text):
  return {op: text.count(f"stablehlo.{op}") for op in ("gather", "scatter", "dot_general")}


@pytest.mark.parametrize("platform", PLATFORMS)
def test_sample_and_its_gradient_export(platform):
  images = jax.ShapeDtypeStruct((2, 12, 12, 1), jnp.float32)
  grid = jax.ShapeDtypeStruct((2, 12, 12, 2), jnp.float32)
  forward = _counts(_exported_text(stn_jax.sample, platform, images, grid))
  loss = lambda i, g: (stn_jax.sample(i, g) ** 2).sum()
  backward = _counts(_exported_text(jax.grad(loss, (0, 1)), platform, images, grid))
  if platform == "tpu":  # Small images: the gather-free matmul path.
    assert forward["gather"] == backward["gather"] == backward["scatter"] == 0
    assert forward["dot_general"] >= 2 and backward["dot_general"] > forward["dot_general"]
  else:
    assert forward["gather"] > 0 and backward["scatter"] > 0


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("transform", ["affine", "projective", "tps"])
def test_warp_exports(platform, transform):
  images = jax.ShapeDtypeStruct((2, 10, 10, 3), jnp.float32)
  theta = jnp.tile(stn_jax.identity_params(transform), (2, 1))
  def loss(i, t):
    return stn_jax.warp(i, t, transform=transform, method="bicubic",
                        padding_mode="reflection").sum()
  _exported_text(jax.value_and_grad(loss, (0, 1)), platform, images, theta)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_st_cnn_forward_and_gradient_export(platform):
  model = models.DistortedMnistModel((28, 28), backbone="cnn", transform="affine",
                                     rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((4, 28, 28, 1), jnp.float32)
  labels = jnp.asarray(np.arange(4) % 10)

  def forward(state, x):
    return nnx.merge(graphdef, state)(x)

  def loss(state, x):
    logits = forward(state, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  _exported_text(forward, platform, state, x)
  _exported_text(jax.grad(loss), platform, state, x)
