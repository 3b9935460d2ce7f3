"""Differentiable image sampling at the points of a grid.

:func:`sample` reads ``images [B, H, W, C]`` at the normalised points of a
``grid [B, Ho, Wo, 2]`` (conventions in :mod:`stn_jax.grids`) and returns
``[B, Ho, Wo, C]``. Its values match PyTorch's ``grid_sample`` (with the image
channels-last) for every method, padding mode and ``align_corners`` value.

Methods:

* ``'bilinear'``: the paper's bilinear kernel ``max(0, 1 - |x|)`` per axis.
* ``'nearest'``: the nearest pixel (ties round to even, as ``grid_sample``).
  Its gradient with respect to the grid is zero everywhere.
* ``'bicubic'``: Keys' cubic convolution with ``a = -0.75`` over 4x4 pixels.

Padding modes (how points outside the image read):

* ``'zeros'``: pixels outside the image are 0.
* ``'border'``: coordinates are clamped to the image, so points outside read
  the nearest border pixel.
* ``'reflection'``: coordinates are reflected at the image boundary (the
  corner pixel centres with ``align_corners=True``, the outer edges otherwise),
  then clamped. For ``'bicubic'`` the padding applies to each of the 16 taps,
  as in ``grid_sample``.

Grid points whose coordinates are not finite (NaN, +-inf) count as outside the
image in every padding mode: the output there is 0 and no NaN reaches the
output or any gradient. Finite coordinates beyond ``COORD_LIMIT`` are clamped
to it (their gradient is zero).

Implementations: the pure-JAX gather one (``implementation='xla'``) runs on
every backend. On CPU, bilinear zero-padded float32 sampling uses a compiled
kernel (:mod:`stn_jax._native`, forward and backward through ``jax.ffi``) when
it could be built; ``implementation='auto'`` (default) picks it then.
``'matmul'`` (bilinear, zeros) is gather-free: each output point's weights
over the image rows and columns are one-hot hat vectors, and sampling is two
batched contractions (``[B, P, W] x [B, H, W, C]``, then over ``H``), the
shape of work TPUs and GPUs' matrix units do best; it costs
``B * P * H * W * C`` multiply-adds, so it suits small images only and is
never picked automatically (it is not measured on an accelerator yet). All
implementations agree to float32 rounding, gradients included (tested).

Gradients flow to ``images`` and to ``grid`` (except through ``'nearest'``),
under ``jit``, ``vmap`` and ``grad``. Images may be float32, bfloat16, float16
or float64; kernel weights and sums are computed in at least float32 and the
result is cast back to the images' dtype.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from stn_jax import _native
from stn_jax import _validation as v
from stn_jax import grids

METHODS = ("bilinear", "nearest", "bicubic")
PADDING_MODES = ("zeros", "border", "reflection")
IMPLEMENTATIONS = ("auto", "xla", "native", "matmul")
CUBIC_A = -0.75  # Keys' parameter, as in PyTorch and OpenCV.
# Normalised coordinates are clamped to +-COORD_LIMIT before conversion to
# pixels, so that huge finite values cannot overflow float32. (Beyond it a
# float32 coordinate has no sub-pixel meaning anyway.)
COORD_LIMIT = 1e8


class _Taps(NamedTuple):
  """Pixels one axis reads for each point: ``T`` taps of ``[...]`` arrays."""
  index: list      # int32 pixel indices, clamped into the image.
  weight: list     # kernel weights (0 for taps outside the image).


def _reflect(coord, size: int, align_corners: bool):
  """Reflects pixel coordinates into the image, as ``grid_sample`` does."""
  if align_corners:
    low, span = 0.0, float(size - 1)
  else:
    low, span = -0.5, float(size)
  if span == 0:
    return jnp.zeros_like(coord)
  dist = jnp.abs(coord - low)
  flips = jax.lax.stop_gradient(jnp.floor(dist / span))
  extra = dist - flips * span
  return jnp.where(flips % 2 == 0, low + extra, low + span - extra)


def _clamp(coord, size: int):
  return jnp.clip(coord, 0.0, size - 1.0)


def _pad_coordinate(coord, size: int, padding_mode: str, align_corners: bool):
  """Applies the padding mode to a continuous pixel coordinate."""
  if padding_mode == "border":
    return _clamp(coord, size)
  if padding_mode == "reflection":
    return _clamp(_reflect(coord, size, align_corners), size)
  # 'zeros': points more than 2 pixels outside read nothing (their kernel
  # support misses the image), so clamping them there changes neither values
  # nor gradients; it keeps the integer conversion in range.
  return jnp.clip(coord, -3.0, size + 2.0)


def _bounded_taps(positions, weights, size, padding_mode, align_corners) -> _Taps:
  """Applies the padding mode to integer tap positions (floats) and their weights."""
  index, weight = [], []
  for pos, w in zip(positions, weights):
    if padding_mode == "zeros":
      inside = (pos >= 0) & (pos <= size - 1)
      w = jnp.where(inside, w, 0.0)
    elif padding_mode == "reflection":
      pos = _clamp(_reflect(pos, size, align_corners), size)
    pos = _clamp(pos, size)  # Border mode, and keeps every gather in bounds.
    index.append(pos.astype(jnp.int32))
    weight.append(w)
  return _Taps(index, weight)


def _linear_taps(coord, size, padding_mode, align_corners) -> _Taps:
  coord = _pad_coordinate(coord, size, padding_mode, align_corners)
  left = jax.lax.stop_gradient(jnp.floor(coord))
  frac = coord - left
  return _bounded_taps([left, left + 1], [1 - frac, frac], size, "zeros", align_corners)


def _nearest_taps(coord, size, padding_mode, align_corners) -> _Taps:
  coord = _pad_coordinate(coord, size, padding_mode, align_corners)
  nearest = jax.lax.stop_gradient(jnp.round(coord))  # Half to even.
  return _bounded_taps([nearest], [jnp.ones_like(coord)], size, "zeros", align_corners)


def _cubic_weights(t):
  """Keys' cubic convolution weights of the taps at offsets -1, 0, 1, 2, for t in [0, 1)."""
  a = CUBIC_A
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def far(x):   # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _cubic_taps(coord, size, padding_mode, align_corners) -> _Taps:
  if padding_mode == "reflection":
    # Tap reflection is periodic; shifting by whole periods keeps the integer
    # conversion in range for far-away points without changing any value.
    period = 2.0 * (size - 1 if align_corners else size)
    if period > 0:
      coord = coord - period * jax.lax.stop_gradient(jnp.floor(coord / period))
  else:
    # Beyond 3 pixels out every tap reads the same border pixel (weights sum
    # to 1) or nothing, so clamping there changes neither values nor gradients.
    coord = jnp.clip(coord, -4.0, size + 3.0)
  left = jax.lax.stop_gradient(jnp.floor(coord))
  weights = _cubic_weights(coord - left)
  positions = [left + offset for offset in (-1, 0, 1, 2)]
  return _bounded_taps(positions, weights, size, padding_mode, align_corners)


_TAPS: dict[str, Callable[..., _Taps]] = {
    "bilinear": _linear_taps, "nearest": _nearest_taps, "bicubic": _cubic_taps}


def check_sample_args(images, grid, method: str, padding_mode: str) -> None:
  """Raises ``ValueError`` for arguments :func:`sample` cannot take."""
  v.check_rank("images", images, 4, "[B, H, W, C]")
  v.check_floating("images", images)
  v.check_rank("grid", grid, 4, "[B, Ho, Wo, 2]")
  v.check_axis("grid", grid, 3, 2, "[B, Ho, Wo, 2] (last axis (x, y))")
  v.check_floating("grid", grid)
  v.check_same_batch("images", images, "grid", grid)
  v.check_choice("method", method, METHODS)
  v.check_choice("padding_mode", padding_mode, PADDING_MODES)


def _one_hot_hat(coord, size: int, dtype):
  """Bilinear weights ``[..., size]`` of pixel coordinates ``[...]`` (zero padding).

  Written with the floor and fraction of :func:`_linear_taps`, so values and
  gradients equal the gather implementation's, at integer coordinates too.
  """
  coord = jnp.clip(coord, -3.0, size + 2.0)
  left = jax.lax.stop_gradient(jnp.floor(coord))
  frac = (coord - left)[..., None]
  pos = jnp.arange(size, dtype=coord.dtype)
  return ((1 - frac) * (pos == left[..., None]) + frac * (pos == left[..., None] + 1)).astype(dtype)


def _sample_matmul(images, grid, align_corners: bool):
  """Gather-free bilinear, zero-padded sampling (see the module docstring)."""
  b, h, w, c = images.shape
  _, ho, wo, _ = grid.shape
  dtype = jnp.promote_types(jnp.result_type(images, grid), jnp.float32)
  grid = grid.astype(dtype).reshape(b, ho * wo, 2)
  finite = jnp.isfinite(grid).all(axis=-1, keepdims=True)
  grid = jnp.where(finite, jnp.clip(grid, -COORD_LIMIT, COORD_LIMIT), 0.0)
  kx = _one_hot_hat(grids.to_pixel(grid[..., 0], w, align_corners), w, dtype) * finite
  ky = _one_hot_hat(grids.to_pixel(grid[..., 1], h, align_corners), h, dtype)
  rows = jnp.einsum("bpw,bhwc->bphc", kx, images.astype(dtype))
  out = jnp.einsum("bph,bphc->bpc", ky, rows)
  return out.reshape(b, ho, wo, c).astype(images.dtype)


def _use_native(images, grid, method: str, padding_mode: str, implementation: str) -> bool:
  v.check_choice("implementation", implementation, IMPLEMENTATIONS)
  if implementation in ("xla", "matmul"):
    return False
  suitable = (method == "bilinear" and padding_mode == "zeros"
              and images.dtype == jnp.float32 and grid.dtype == jnp.float32)
  if implementation == "native":
    if not suitable:
      raise ValueError("implementation='native' takes method='bilinear', padding_mode='zeros' "
                       f"and float32 images and grid; got {method!r}, {padding_mode!r}, "
                       f"{images.dtype} and {grid.dtype}.")
    if not _native.available():
      raise RuntimeError("implementation='native': the compiled CPU kernel is unavailable "
                         "(see the warning above, or STN_JAX_NATIVE=0).")
    return True
  return suitable and jax.default_backend() == "cpu" and _native.available()


def sample(images: jax.Array, grid: jax.Array, *, method: str = "bilinear",
           padding_mode: str = "zeros", align_corners: bool = False,
           implementation: str = "auto") -> jax.Array:
  """Samples ``images`` at the normalised points of ``grid``.

  Args:
    images: ``[B, H, W, C]`` floating-point images (any number of channels).
    grid: ``[B, Ho, Wo, 2]`` points ``(x, y)`` in normalised coordinates.
    method: ``'bilinear'`` (default), ``'nearest'`` or ``'bicubic'``.
    padding_mode: ``'zeros'`` (default), ``'border'`` or ``'reflection'``.
    align_corners: whether -1 and 1 are corner pixel centres (True) or edges.
    implementation: ``'auto'`` (default; the compiled CPU kernel where it
      applies), ``'xla'`` (pure JAX gathers, any backend), ``'native'`` (the
      CPU kernel; bilinear, zeros, float32 only) or ``'matmul'`` (gather-free;
      bilinear, zeros; small images).

  Returns:
    ``[B, Ho, Wo, C]`` in the dtype of ``images``.
  """
  check_sample_args(images, grid, method, padding_mode)
  images, grid = jnp.asarray(images), jnp.asarray(grid)
  if _use_native(images, grid, method, padding_mode, implementation):
    return _native.bilinear_zeros(images, grid, bool(align_corners))
  if implementation == "matmul":
    if method != "bilinear" or padding_mode != "zeros":
      raise ValueError("implementation='matmul' takes method='bilinear' and "
                       f"padding_mode='zeros'; got {method!r} and {padding_mode!r}.")
    return _sample_matmul(images, grid, align_corners)
  b, h, w, c = images.shape
  _, ho, wo, _ = grid.shape
  compute_dtype = jnp.promote_types(jnp.result_type(images, grid), jnp.float32)
  grid = grid.astype(compute_dtype)
  finite = jnp.isfinite(grid).all(axis=-1)
  grid = jnp.where(finite[..., None], grid, 0.0)   # No NaN in any branch.
  grid = jnp.clip(grid, -COORD_LIMIT, COORD_LIMIT)

  taps = _TAPS[method]
  x_taps = taps(grids.to_pixel(grid[..., 0], w, align_corners), w, padding_mode, align_corners)
  y_taps = taps(grids.to_pixel(grid[..., 1], h, align_corners), h, padding_mode, align_corners)

  # All taps of a point, flattened into one gather: [B, Ho, Wo, T].
  index = jnp.stack([iy * w + ix for iy in y_taps.index for ix in x_taps.index], axis=-1)
  weight = jnp.stack([wy * wx for wy in y_taps.weight for wx in x_taps.weight], axis=-1)
  weight = jnp.where(finite[..., None], weight, 0.0)

  flat = images.reshape(b, h * w, c)
  values = jax.vmap(lambda im, idx: im[idx])(flat, index.reshape(b, -1))
  values = values.reshape(b, ho, wo, -1, c).astype(compute_dtype)
  # An explicit sum over the taps fuses into one elementwise loop on CPU.
  out = sum(values[..., t, :] * weight[..., t, None] for t in range(weight.shape[-1]))
  return out.astype(images.dtype)
