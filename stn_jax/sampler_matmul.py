"""The gather-free bilinear sampler: two batched matrix products per image.

Each output point's bilinear weights along the image columns form a row of
``Kx [B, P, W]`` (two non-zero entries, at most; padding folded in) and along
the rows ``Ky [B, P, H]``. Sampling is then

    rows = Kx @ images      # [B, P, W] x [B, H, W, C] -> [B, P, H, C]
    out  = sum_h Ky * rows  # [B, P, H] x [B, P, H, C] -> [B, P, C]

with no gather or scatter in the forward or backward pass (the backward
pass is the transposed products), the kind of work a TPU's matrix unit
does best. It costs :func:`multiply_adds` ``= B * P * C * H * (W + 1)``
multiply-adds against the gather path's ``4 * B * P * C`` gathered elements
(:func:`stn_jax.sampling.choose_implementation` weighs the two), so it
suits small images only. The products run at ``Precision.HIGHEST`` so that
float32 weights are not rounded to bfloat16 on TPUs.

Gradients follow the same rules as :mod:`stn_jax.sampler_gather` (tested
equal): ``Kx``/``Ky`` have a custom JVP whose tangent is the derivative of the
weights, with the pixel-centre rule of :mod:`stn_jax.sampling`; any JAX
transformation composes with it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from stn_jax import coordinates
from stn_jax import sampler_axes as axes

METHODS = ("bilinear",)


def multiply_adds(images_shape, grid_shape) -> int:
  """Multiply-adds of one forward pass for ``images [B, H, W, C]`` and ``grid [B, Ho, Wo, 2]``."""
  b, h, w, c = images_shape
  _, ho, wo, _ = grid_shape
  return b * ho * wo * c * h * (w + 1)


def intermediate_bytes(images_shape, grid_shape) -> int:
  """Bytes of the float32 ``[B, P, H, C]`` intermediate of the first product."""
  b, h, _, c = images_shape
  _, ho, wo, _ = grid_shape
  return 4 * b * ho * wo * h * c


def _one_hot_sum(index, weight, size: int, dtype):
  """``[..., size]`` matrix with ``weight[t]`` at ``index[t]`` (summed where taps coincide)."""
  positions = jnp.arange(size, dtype=jnp.int32)
  return sum(jnp.where(i[..., None] == positions, wt[..., None], 0.0)
             for i, wt in zip(index, weight)).astype(dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2, 3))
def _axis_matrix(u, size: int, padding_mode: str, align_corners: bool):
  """Bilinear weights ``[..., size]`` of pixel coordinates ``u [...]`` along one axis."""
  index, weights = axes.linear_taps(u, frozenset({0}), size, padding_mode, align_corners)
  return _one_hot_sum(index, weights[0], size, u.dtype)


@_axis_matrix.defjvp
def _axis_matrix_jvp(size, padding_mode, align_corners, primals, tangents):
  """Tangent: the weights' derivative (pixel-centre rule) times ``du``; piecewise constant in u."""
  u, = primals
  du, = tangents
  index, weights = axes.linear_taps(u, frozenset({1}), size, padding_mode, align_corners)
  slope = _one_hot_sum(index, weights[1], size, u.dtype)
  return _axis_matrix(u, size, padding_mode, align_corners), slope * du[..., None]


def sample(images: jax.Array, grid: jax.Array, method: str, padding_mode: str,
           align_corners: bool) -> jax.Array:
  """Bilinear ``images [B, H, W, C]`` at ``grid [B, Ho, Wo, 2]`` -> ``[B, Ho, Wo, C]`` (checked arguments)."""
  del method  # Bilinear only (the backend table says so).
  b, h, w, c = images.shape
  _, ho, wo, _ = grid.shape
  dtype = jnp.promote_types(jnp.result_type(images, grid), jnp.float32)
  grid, valid = axes.clean_grid(grid.reshape(b, ho * wo, 2), dtype)
  ux = axes.bring_near(coordinates.to_pixel(grid[..., 0], w, align_corners), w, padding_mode,
                       align_corners, reach=2)
  uy = axes.bring_near(coordinates.to_pixel(grid[..., 1], h, align_corners), h, padding_mode,
                       align_corners, reach=2)
  kx = _axis_matrix(ux, w, padding_mode, align_corners) * valid[..., None]
  ky = _axis_matrix(uy, h, padding_mode, align_corners)
  highest = jax.lax.Precision.HIGHEST
  rows = jnp.einsum("bpw,bhwc->bphc", kx, images.astype(dtype), precision=highest)
  out = jnp.einsum("bph,bphc->bpc", ky, rows, precision=highest)
  return out.reshape(b, ho, wo, c).astype(images.dtype)
