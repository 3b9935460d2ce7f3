"""Flax NNX modules: localisation nets and spatial transformers.

Thin wrappers over the pure functions in :mod:`stn_jax.grids`,
:mod:`stn_jax.sampling` and :mod:`stn_jax.transforms`. State is plain NNX
state, so a training step can ``nnx.split`` a model and run a pure function
under ``jax.jit``/``jax.pmap``; Linen users wrap a module with
``flax.nnx.bridge.to_linen``.

Feature maps are channels-last ``[B, H, W, C]``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stn_jax import _validation as v
from stn_jax import convolution
from stn_jax import sampling
from stn_jax import transforms
from stn_jax import warping

# A convolution of a localisation net: (features, kernel size, 2x2 max-pool after it).
ConvSpec = tuple[int, int, bool]


def conv_output_hw(hw: tuple[int, int], kernel: int, padding: str, pool: bool) -> tuple[int, int]:
  """Spatial size after a stride-1 convolution (and an optional 2x2/2 max-pool)."""
  h, w = hw
  if padding == "VALID":
    h, w = h - kernel + 1, w - kernel + 1
  if pool:
    h, w = h // 2, w // 2
  if h < 1 or w < 1:
    raise ValueError(f"input of spatial size {hw} is too small for a {kernel}x{kernel} "
                     f"convolution{' and 2x2 pooling' if pool else ''}.")
  return h, w


def conv_layer(in_features: int, out_features: int, kernel: int, *, padding: str = "SAME",
               cpu_convolution: bool | None = None, rngs: nnx.Rngs) -> nnx.Conv:
  """A stride-1 ``kernel x kernel`` ``nnx.Conv`` on ``[B, H, W, C]``. Every
  convolution of the library's modules and models is made here.

  ``cpu_convolution`` (default
  :func:`stn_jax.convolution.cpu_convolution_default`, on): use
  :func:`stn_jax.convolution.conv_general_dilated` (same values; on CPU the
  compiled multi-threaded kernels, or patch gradients for few input channels;
  plain ``lax`` elsewhere); off: a plain ``nnx.Conv``.
  """
  if cpu_convolution is None:
    cpu_convolution = convolution.cpu_convolution_default()
  conv = convolution.conv_general_dilated if cpu_convolution else jax.lax.conv_general_dilated
  return nnx.Conv(in_features, out_features, (kernel, kernel), padding=padding,
                  conv_general_dilated=conv, rngs=rngs)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pooling with stride 2 and VALID padding of ``[B, H, W, C]`` (odd edges dropped).

  The same values as ``nnx.max_pool(x, (2, 2), (2, 2))``, written as a
  reshape and a max: its gradient is an elementwise select instead of XLA's
  select-and-scatter, about 3x faster on CPU (ties share the gradient).
  """
  b, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def check_feature_map(name: str, x, hw: tuple[int, int], channels: int) -> None:
  """Raises unless ``x`` is ``[B, *hw, channels]``."""
  v.check_rank(name, x, 4, f"[B, {hw[0]}, {hw[1]}, {channels}]")
  if tuple(x.shape[1:]) != (*hw, channels):
    raise ValueError(f"{name} must have shape [B, {hw[0]}, {hw[1]}, {channels}] for this "
                     f"module; got {v.shape_str(x.shape)}.")


class LocalisationNet(nnx.Module):
  """Predicts raw transform parameters ``[B, P]`` from a feature map ``[B, H, W, C]``.

  Optional 2x average-pool downsampling of the input, then ``conv`` layers
  (VALID padding, ReLU, optional 2x2 max-pool), then fully-connected ReLU
  layers of ``hidden`` units, then a linear regression layer to the ``P``
  parameters of ``transform``. The regression layer starts with zero weights
  and a bias equal to :func:`stn_jax.identity_params`, so a fresh network
  predicts the identity transform for every input (the paper's
  initialisation).
  """

  def __init__(self, in_hw: Sequence[int], in_channels: int, *, transform: str = "affine",
               conv: Sequence[ConvSpec] = (), hidden: Sequence[int] = (32, 32, 32),
               downsample: int = 1,
               control_shape: Sequence[int] = transforms.DEFAULT_CONTROL_SHAPE,
               rngs: nnx.Rngs):
    self.in_hw = v.check_hw("in_hw", in_hw)
    if not isinstance(in_channels, (int, np.integer)) or isinstance(in_channels, bool) \
        or in_channels < 1:
      raise ValueError(f"in_channels must be a positive integer; got {in_channels!r}.")
    self.in_channels = int(in_channels)
    self.transform = transform
    self.control_shape = tuple(control_shape)
    self.downsample = downsample
    num_out = transforms.num_params(transform, control_shape=control_shape)
    hw = (self.in_hw[0] // downsample, self.in_hw[1] // downsample)
    channels = in_channels
    convs, pools = [], []
    for features, kernel, pool in conv:
      convs.append(conv_layer(channels, features, kernel, padding="VALID", rngs=rngs))
      pools.append(bool(pool))
      hw = conv_output_hw(hw, kernel, "VALID", pool)
      channels = features
    self.convs = nnx.List(convs)
    self.pools = tuple(pools)
    width = hw[0] * hw[1] * channels
    dense = []
    for units in hidden:
      dense.append(nnx.Linear(width, units, rngs=rngs))
      width = units
    self.dense = nnx.List(dense)
    identity = transforms.identity_params(transform, control_shape=control_shape)
    self.regression = nnx.Linear(
        width, num_out, kernel_init=nnx.initializers.zeros_init(),
        bias_init=lambda key, shape, dtype=jnp.float32: identity.astype(dtype), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    check_feature_map("x", x, self.in_hw, self.in_channels)
    if self.downsample > 1:
      x = nnx.avg_pool(x, (self.downsample, self.downsample), (self.downsample, self.downsample))
    for conv, pool in zip(self.convs, self.pools):
      x = nnx.relu(conv(x))
      if pool:
        x = max_pool_2x2(x)
    x = x.reshape(x.shape[0], -1)
    for layer in self.dense:
      x = nnx.relu(layer(x))
    return self.regression(x)


class SpatialTransformer(nnx.Module):
  """A spatial transformer: localisation net, grid generator and sampler.

  ``__call__(x [B, H, W, C]) -> (warped [B, Ho, Wo, C], params [B, P])``: the
  localisation net reads ``x``, its raw parameters become a transform of kind
  ``transform`` (:mod:`stn_jax.transforms`), and ``x`` is sampled on that
  transform's grid. ``out_hw`` may differ from the input size (crop and
  rescale); by default it is the localisation net's input size. Gradients
  reach ``x`` and, through the sampler, the localisation net.
  """

  def __init__(self, localisation: LocalisationNet, *, out_hw: Sequence[int] | None = None,
               method: str = "bilinear", padding_mode: str = "zeros",
               align_corners: bool = False):
    v.check_choice("method", method, sampling.METHODS)
    v.check_choice("padding_mode", padding_mode, sampling.PADDING_MODES)
    self.localisation = localisation
    self.out_hw = v.check_hw("out_hw", out_hw if out_hw is not None else localisation.in_hw)
    self.method = method
    self.padding_mode = padding_mode
    self.align_corners = align_corners

  @property
  def transform(self) -> str:
    return self.localisation.transform

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    params = self.localisation(x)
    warped = warping.warp(x, params, self.out_hw, transform=self.transform,
                          method=self.method, padding_mode=self.padding_mode,
                          align_corners=self.align_corners,
                          control_shape=self.localisation.control_shape)
    return warped, params

  def grid(self, params: jax.Array) -> jax.Array:
    """The sampling grid ``[B, Ho, Wo, 2]`` of predicted parameters (for plots)."""
    return warping.transform_grid(params, self.out_hw, transform=self.transform,
                                  control_shape=self.localisation.control_shape,
                                  align_corners=self.align_corners)


class ParallelTransformers(nnx.Module):
  """Several spatial transformers reading the same input.

  ``__call__(x) -> (outputs, params)``: with ``combine='concat'`` the warped
  outputs (which must share ``out_hw``) are concatenated along channels into
  ``[B, Ho, Wo, N * C]``; with ``combine='list'`` they are returned as a list.
  ``params`` is the list of each transformer's raw parameters.
  """

  def __init__(self, transformers: Sequence[SpatialTransformer], *, combine: str = "concat"):
    v.check_choice("combine", combine, ("concat", "list"))
    if not transformers:
      raise ValueError("transformers must hold at least one SpatialTransformer; got none.")
    if combine == "concat" and len({t.out_hw for t in transformers}) > 1:
      raise ValueError("combine='concat' needs transformers with one out_hw; got "
                       f"{[t.out_hw for t in transformers]}.")
    self.transformers = nnx.List(list(transformers))
    self.combine = combine

  def __call__(self, x: jax.Array):
    results = [t(x) for t in self.transformers]
    outputs = [r[0] for r in results]
    params = [r[1] for r in results]
    if self.combine == "concat":
      return jnp.concatenate(outputs, axis=-1), params
    return outputs, params
