"""Flax NNX modules for volumes: a 3-D localisation net, a 3-D spatial transformer,
and the paper's 3-D model (appendix A.3).

Thin wrappers over :mod:`stn_jax.volumetric`. Volumes are channels-last
``[B, D, H, W, C]``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from stn_jax import _validation as v
from stn_jax import models, volumetric

# A 3-D convolution of a localisation net: (features, kernel size, 2x2x2 max-pool after it).
Conv3DSpec = tuple[int, int, bool]


def check_volume(name: str, x, dhw: tuple[int, int, int], channels: int) -> None:
  """Raises unless ``x`` is ``[B, *dhw, channels]``."""
  expected = f"[B, {dhw[0]}, {dhw[1]}, {dhw[2]}, {channels}]"
  v.check_rank(name, x, 5, expected)
  if tuple(x.shape[1:]) != (*dhw, channels):
    raise ValueError(f"{name} must have shape {expected} for this module; "
                     f"got {v.shape_str(x.shape)}.")


def max_pool_2x2x2(x: jax.Array) -> jax.Array:
  """2x2x2 max-pooling with stride 2 of ``[B, D, H, W, C]`` (odd edges dropped), as reshape + max."""
  b, d, h, w, c = x.shape
  x = x[:, :d // 2 * 2, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(b, d // 2, 2, h // 2, 2, w // 2, 2, c).max(axis=(2, 4, 6))


def avg_pool_3d(x: jax.Array, factor: int) -> jax.Array:
  """Average-pooling by ``factor`` along depth, height and width (odd edges dropped)."""
  b, d, h, w, c = x.shape
  f = factor
  x = x[:, :d // f * f, :h // f * f, :w // f * f]
  return x.reshape(b, d // f, f, h // f, f, w // f, f, c).mean(axis=(2, 4, 6))


class LocalisationNet3D(nnx.Module):
  """Predicts raw 3-D transform parameters ``[B, P]`` from a volume ``[B, D, H, W, C]``.

  Optional average-pool downsampling by ``downsample``, then 3-D convolutions
  ``conv`` (VALID, ReLU, optional 2x2x2 max-pool), then fully-connected ReLU
  layers ``hidden``, then a linear layer to the ``P`` parameters of
  ``transform`` (:data:`stn_jax.volumetric.KINDS_3D`) that starts with zero
  weights and the identity's parameters as bias, so a fresh net predicts the
  identity (the paper's initialisation).
  """

  def __init__(self, in_dhw: Sequence[int], in_channels: int, *, transform: str = "affine",
               conv: Sequence[Conv3DSpec] = ((8, 5, True), (16, 5, True)),
               hidden: Sequence[int] = (32,), downsample: int = 1, rngs: nnx.Rngs):
    self.in_dhw = volumetric.check_dhw("in_dhw", in_dhw)
    self.in_channels = in_channels
    self.transform = transform
    self.downsample = downsample
    identity = volumetric.identity_params_3d(transform)
    size = [s // downsample for s in self.in_dhw]
    channels = in_channels
    convs, pools = [], []
    for features, kernel, pool in conv:
      convs.append(nnx.Conv(channels, features, (kernel,) * 3, padding="VALID", rngs=rngs))
      pools.append(bool(pool))
      size = [(s - kernel + 1) // (2 if pool else 1) for s in size]
      if min(size) < 1:
        raise ValueError(f"in_dhw {self.in_dhw} is too small for the localisation convolutions "
                         f"{tuple(conv)}.")
      channels = features
    self.convs = nnx.List(convs)
    self.pools = tuple(pools)
    width = size[0] * size[1] * size[2] * channels
    dense = []
    for units in hidden:
      dense.append(nnx.Linear(width, units, rngs=rngs))
      width = units
    self.dense = nnx.List(dense)
    self.regression = nnx.Linear(
        width, identity.shape[0], kernel_init=nnx.initializers.zeros_init(),
        bias_init=lambda key, shape, dtype=jnp.float32: identity.astype(dtype), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    check_volume("x", x, self.in_dhw, self.in_channels)
    if self.downsample > 1:
      x = avg_pool_3d(x, self.downsample)
    for conv, pool in zip(self.convs, self.pools):
      x = nnx.relu(conv(x))
      if pool:
        x = max_pool_2x2x2(x)
    x = x.reshape(x.shape[0], -1)
    for layer in self.dense:
      x = nnx.relu(layer(x))
    return self.regression(x)


class SpatialTransformer3D(nnx.Module):
  """A 3-D spatial transformer: localisation net, 3-D affine grid, trilinear sampler.

  ``__call__(x [B, D, H, W, C]) -> (warped [B, *out_dhw, C], params [B, P])``;
  ``out_dhw`` defaults to the localisation net's input size. Gradients reach
  ``x`` and, through the sampler, the localisation net.
  """

  def __init__(self, localisation: LocalisationNet3D, *, out_dhw: Optional[Sequence[int]] = None,
               method: str = "trilinear", padding_mode: str = "zeros",
               align_corners: bool = False):
    v.check_choice("method", method, volumetric.METHODS_3D)
    self.localisation = localisation
    self.out_dhw = volumetric.check_dhw(
        "out_dhw", out_dhw if out_dhw is not None else localisation.in_dhw)
    self.method = method
    self.padding_mode = padding_mode
    self.align_corners = align_corners

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    params = self.localisation(x)
    warped = volumetric.warp_volume(x, params, self.out_dhw, transform=self.localisation.transform,
                                    method=self.method, padding_mode=self.padding_mode,
                                    align_corners=self.align_corners)
    return warped, params


PROJECTIONS = ("mean", "sum")


class ProjectedVolumeClassifier(nnx.Module):
  """The paper's 3-D model: (optional) 3-D transformer, projection along depth, 2-D classifier.

  ``x [B, D, H, W, 1]``: with ``st3d`` the volume is warped by a 3-D affine
  transformer to ``out_dhw``; without it, it is average-pooled to ``out_dhw``
  (the same classifier input size). The result is flattened along depth
  (``projection='mean'`` or ``'sum'``) to ``[B, Ho, Wo, 1]`` for
  :class:`stn_jax.models.MnistCNN`. :meth:`project` returns the 2-D image and
  the 3-D parameters for figures.
  """

  def __init__(self, in_dhw: Sequence[int] = (60, 60, 60), *, out_dhw: Sequence[int] = (30, 30, 30),
               st3d: bool = True, num_classes: int = 10, projection: str = "mean",
               localisation: Optional[dict] = None, rngs: nnx.Rngs):
    v.check_choice("projection", projection, PROJECTIONS)
    self.in_dhw = volumetric.check_dhw("in_dhw", in_dhw)
    self.out_dhw = volumetric.check_dhw("out_dhw", out_dhw)
    self.projection = projection
    if st3d:
      loc = LocalisationNet3D(self.in_dhw, 1, rngs=rngs, **(localisation or dict(downsample=2)))
      self.st = SpatialTransformer3D(loc, out_dhw=self.out_dhw)
    else:
      factors = {i // o for i, o in zip(self.in_dhw, self.out_dhw)}
      if len(factors) != 1 or any(i != o * f for i, o, f in
                                  zip(self.in_dhw, self.out_dhw, [min(factors)] * 3)):
        raise ValueError(f"without st3d, in_dhw {self.in_dhw} must be a whole multiple "
                         f"(the same on every axis) of out_dhw {self.out_dhw}.")
      self.st = None
    self.classifier = models.MnistCNN(self.out_dhw[1:], 1, num_classes, rngs=rngs)

  def project(self, x):
    """``(image [B, Ho, Wo, 1], params [B, 12] or [B, 0])``."""
    check_volume("x", x, self.in_dhw, 1)
    if self.st is None:
      warped = avg_pool_3d(x, self.in_dhw[0] // self.out_dhw[0])
      params = jnp.zeros((x.shape[0], 0), x.dtype)
    else:
      warped, params = self.st(x)
    reduce = jnp.mean if self.projection == "mean" else jnp.sum
    return reduce(warped, axis=1), params

  def __call__(self, x):
    return self.classifier(self.project(x)[0])
