"""The pure-JAX gather sampler: every method and padding mode, on every platform.

Each output point reads its taps (2x2 bilinear, 1 nearest, 4x4 bicubic) with
one gather from the flattened image and sums them with the kernel weights.
Conventions, padding modes and the gradient rules are those of
:mod:`stn_jax.sampling`; this module is one of its backends (``'xla'``).

Bilinear sampling has a custom JVP (:func:`_bilinear`): the plain forward
pass gathers the 4 taps of each point, and the derivative with respect to
the coordinates gathers the 3x3 taps around the nearest pixel centre, so that
within :data:`~stn_jax.sampler_axes.PIXEL_CENTRE_TOLERANCE` of a centre it
is the mean of the two one-sided derivatives. The rule is itself
differentiable (the derivative of the piecewise-linear kernel is piecewise
constant), so ``jvp``, ``grad``, ``jacfwd``, ``hessian``, ``grad`` of ``grad``
and ``vmap`` of them all work; reverse mode transposes the tangent (a scatter
for the image gradient). Nearest and bicubic use plain autodiff: nearest has
a zero coordinate gradient, Keys' cubic kernel a continuous one.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from stn_jax import coordinates
from stn_jax import sampler_axes as axes

CUBIC_A = -0.75  # Keys' parameter, as in PyTorch and OpenCV.


def _gather_taps(images, y_index, x_index):
  """``[B, P, Ty * Tx, C]`` pixels of ``images [B, H, W, C]`` at every (y, x) tap pair.

  ``y_index``/``x_index`` are lists of ``[B, P]`` int32 indices; pairs are
  ordered y-major.
  """
  b, h, w, c = images.shape
  index = jnp.stack([iy * w + ix for iy in y_index for ix in x_index], axis=-1)
  flat = images.reshape(b, h * w, c)
  return jax.vmap(lambda im, idx: im[idx])(flat, index.reshape(b, -1)).reshape(
      index.shape + (c,))


def _weighted_sum(values, y_weight, x_weight):
  """``sum_t values[..., t, :] * (wy * wx)[t]`` over the y-major tap pairs."""
  weight = [wy * wx for wy in y_weight for wx in x_weight]
  # An explicit sum over the taps fuses into one elementwise loop on CPU.
  return sum(values[..., t, :] * weight[t][..., None] for t in range(len(weight)))


def _orders_per_axis(orders):
  return frozenset(ox for ox, _ in orders), frozenset(oy for _, oy in orders)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _bilinear(images, ux, uy, orders: tuple, padding_mode: str, align_corners: bool):
  """Bilinear sampling and its coordinate derivatives, one gather.

  Args:
    images: ``[B, H, W, C]``.
    ux, uy: ``[B, P]`` pixel coordinates (after :func:`~stn_jax.sampler_axes.bring_near`).
    orders: tuple of ``(ox, oy)`` derivative orders in ``{0, 1}``: ``(0, 0)``
      is the value, ``(1, 0)`` its derivative along ``x``, ``(1, 1)`` the mixed one.

  Returns:
    One ``[B, P, C]`` array (in ``ux.dtype``) per entry of ``orders``.
  """
  _, h, w, _ = images.shape
  order_x, order_y = _orders_per_axis(orders)
  x_index, x_weights = axes.linear_taps(ux, order_x, w, padding_mode, align_corners)
  y_index, y_weights = axes.linear_taps(uy, order_y, h, padding_mode, align_corners)
  values = _gather_taps(images, y_index, x_index).astype(ux.dtype)
  return tuple(_weighted_sum(values, y_weights[oy], x_weights[ox]) for ox, oy in orders)


def _is_zero(tangent) -> bool:
  return isinstance(tangent, jax.custom_derivatives.SymbolicZero)


def _bilinear_jvp(orders, padding_mode, align_corners, primals, tangents):
  """Tangent: the sampler applied to the image tangent, plus the coordinate derivatives
  (one order up, by :func:`~stn_jax.sampler_axes.linear_taps`) times the coordinate tangents."""
  images, ux, uy = primals
  d_images, d_ux, d_uy = tangents
  needed = set(orders)
  if not _is_zero(d_ux):
    needed |= {(1, oy) for ox, oy in orders if ox == 0}
  if not _is_zero(d_uy):
    needed |= {(ox, 1) for ox, oy in orders if oy == 0}
  needed = tuple(sorted(needed))
  value = dict(zip(needed, _bilinear(images, ux, uy, needed, padding_mode, align_corners)))
  image_part = (None if _is_zero(d_images)
                else _bilinear(d_images, ux, uy, orders, padding_mode, align_corners))
  tangent_out = []
  for k, (ox, oy) in enumerate(orders):
    terms = [] if image_part is None else [image_part[k]]
    if ox == 0 and not _is_zero(d_ux):
      terms.append(value[(1, oy)] * d_ux[..., None])
    if oy == 0 and not _is_zero(d_uy):
      terms.append(value[(ox, 1)] * d_uy[..., None])
    tangent_out.append(sum(terms[1:], terms[0]) if terms else jnp.zeros_like(value[(ox, oy)]))
  return tuple(value[o] for o in orders), tuple(tangent_out)


_bilinear.defjvp(_bilinear_jvp, symbolic_zeros=True)


def _cubic_weights(t):
  """Keys' cubic convolution weights of the taps at offsets -1, 0, 1, 2, for t in [0, 1)."""
  a = CUBIC_A
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def far(x):   # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _padded_taps(positions, weights, size, padding_mode, align_corners):
  index, weight = [], []
  for position, w in zip(positions, weights):
    i, inside = axes.tap_index(position, size, padding_mode, align_corners)
    index.append(i)
    weight.append(w if inside is None else w * inside)
  return index, weight


def _nearest_taps(u, size, padding_mode, align_corners):
  """The nearest pixel of the padded coordinate (ties to even, as ``grid_sample``)."""
  if padding_mode == "border":
    u = axes.clamp(u, size)
  elif padding_mode == "reflection":
    u = axes.clamp(axes.reflect(u, size, align_corners), size)
  else:
    u = jnp.clip(u, -3.0, size + 2.0)
  nearest = jax.lax.stop_gradient(jnp.round(u))
  return _padded_taps([nearest], [jnp.ones_like(u)], size, "zeros", align_corners)


def _cubic_taps(u, size, padding_mode, align_corners):
  """Keys' 4 taps; the padding applies to each tap, as in ``grid_sample``."""
  u = axes.bring_near(u, size, padding_mode, align_corners, reach=3)
  left = jax.lax.stop_gradient(jnp.floor(u))
  positions = [left + offset for offset in (-1, 0, 1, 2)]
  return _padded_taps(positions, _cubic_weights(u - left), size, padding_mode, align_corners)


_TAPS: dict[str, Callable] = {"nearest": _nearest_taps, "bicubic": _cubic_taps}


def sample(images: jax.Array, grid: jax.Array, method: str, padding_mode: str,
           align_corners: bool) -> jax.Array:
  """``images [B, H, W, C]`` at ``grid [B, Ho, Wo, 2]`` -> ``[B, Ho, Wo, C]`` (checked arguments)."""
  b, h, w, c = images.shape
  _, ho, wo, _ = grid.shape
  dtype = jnp.promote_types(jnp.result_type(images, grid), jnp.float32)
  grid, valid = axes.clean_grid(grid.reshape(b, ho * wo, 2), dtype)
  ux = coordinates.to_pixel(grid[..., 0], w, align_corners)
  uy = coordinates.to_pixel(grid[..., 1], h, align_corners)
  if method == "bilinear":
    ux = axes.bring_near(ux, w, padding_mode, align_corners, reach=2)
    uy = axes.bring_near(uy, h, padding_mode, align_corners, reach=2)
    out, = _bilinear(images, ux, uy, ((0, 0),), padding_mode, align_corners)
  else:
    x_index, x_weight = _TAPS[method](ux, w, padding_mode, align_corners)
    y_index, y_weight = _TAPS[method](uy, h, padding_mode, align_corners)
    values = _gather_taps(images, y_index, x_index).astype(dtype)
    out = _weighted_sum(values, y_weight, x_weight)
  out = jnp.where(valid[..., None], out, 0.0)
  return out.reshape(b, ho, wo, c).astype(images.dtype)
