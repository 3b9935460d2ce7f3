"""The paper's distorted MNIST variants and composite tasks, generated in JAX.

Every generator is a pure function ``f(key, digits, ...)`` of a PRNG key and a
batch of digits ``[B, 28, 28, 1]`` (float in [0, 1]), built on stn_jax's own
grids and bilinear sampler, vectorised over the batch and jit-compiled;
the same key gives the same images. Transforms are drawn in pixel units and
converted to normalised coordinates with
:func:`stn_jax.coordinates.pixel_transform_to_normalized`.

Parameters and their sources (Jaderberg et al. 2015, section 4.1 and
appendix A.4; where the stored copies of the appendix were not legible we
follow the public reimplementations named below and say so):

* R: rotation uniform in +-90 degrees (appendix, quoted), 28x28 output.
* RTS: rotation +-45 degrees, scale uniform in [0.7, 1.2], placed at a uniform
  random position on a 42x42 canvas (paper, section 4.1).
* P: digit scaled by a factor uniform in [0.75, 1.0], then each of its four
  corners moved by independent N(0, 5 px) noise; the projective transform
  mapping the corners is applied (secondary sources and reimplementations).
* E: digit scaled by a factor uniform in [0.75, 1.0], then a 4x4 grid of
  thin-plate spline control points, each moved by N(0, 1.5 px) (secondary
  sources; the paper calls it elastic).
* translated: the digit at a uniform random position on a larger canvas
  (60x60 by default); cluttered adds ``num_clutter`` (6) random 6x6 patches
  cut from other digits of the batch, as in the cluttered MNIST of the paper
  and its follow-ups.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp

from stn_jax import _validation as v
from stn_jax import coordinates
from stn_jax import grids
from stn_jax import sampling

VARIANTS = ("R", "RTS", "P", "E", "translated", "cluttered")
OUTPUT_HW = {"R": (28, 28), "RTS": (42, 42), "P": (28, 28), "E": (28, 28),
             "translated": (60, 60), "cluttered": (60, 60)}
DIGIT_HW = (28, 28)


def _similarity_pixels(angle, scale, shift, in_hw, out_hw):
  """Output->input pixel maps of "rotate by angle, scale, centre on the canvas, shift".

  The forward placement is ``p_out = c_out + shift + scale R(angle) (p_in - c_in)``;
  the sampler needs its inverse, returned as ``[B, 3, 3]``.
  """
  c_in = (jnp.asarray(in_hw[::-1], jnp.float32) - 1) / 2
  c_out = (jnp.asarray(out_hw[::-1], jnp.float32) - 1) / 2
  cos, sin = jnp.cos(angle) / scale, jnp.sin(angle) / scale
  inv_linear = jnp.stack([jnp.stack([cos, sin], -1), jnp.stack([-sin, cos], -1)], -2)
  offset = c_in - jnp.einsum("bij,bj->bi", inv_linear, c_out + shift)
  top = jnp.concatenate([inv_linear, offset[..., None]], -1)
  bottom = jnp.broadcast_to(jnp.asarray([0.0, 0.0, 1.0]), (angle.shape[0], 1, 3))
  return jnp.concatenate([top, bottom], 1)


def _warp_affine(digits, pixel_matrix, out_hw):
  theta = coordinates.pixel_transform_to_normalized(pixel_matrix, digits.shape[1:3], out_hw)
  grid = grids.affine_grid(theta[:, :2], out_hw)
  return sampling.sample(digits, grid)


def rotate(key, digits, max_degrees: float = 90.0):
  """R: rotation uniform in ``+-max_degrees``, same size."""
  b = digits.shape[0]
  angle = jnp.deg2rad(jax.random.uniform(key, (b,), minval=-max_degrees, maxval=max_degrees))
  m = _similarity_pixels(angle, jnp.ones(b), jnp.zeros((b, 2)), DIGIT_HW, DIGIT_HW)
  return _warp_affine(digits, m, DIGIT_HW)


def rotate_translate_scale(key, digits, canvas_hw: Sequence[int] = (42, 42),
                           max_degrees: float = 45.0, scale_range=(0.7, 1.2)):
  """RTS: rotation, scale, and a random position on a larger canvas."""
  b = digits.shape[0]
  k_angle, k_scale, k_shift = jax.random.split(key, 3)
  angle = jnp.deg2rad(jax.random.uniform(k_angle, (b,), minval=-max_degrees, maxval=max_degrees))
  scale = jax.random.uniform(k_scale, (b,), minval=scale_range[0], maxval=scale_range[1])
  room = (jnp.asarray(canvas_hw[::-1], jnp.float32)[None] - DIGIT_HW[0] * scale[:, None]) / 2
  shift = jax.random.uniform(k_shift, (b, 2), minval=-1.0, maxval=1.0) * jnp.maximum(room, 0.0)
  m = _similarity_pixels(angle, scale, shift, DIGIT_HW, canvas_hw)
  return _warp_affine(digits, m, tuple(canvas_hw))


def _homography_from_points(src, dst):
  """``[B, 3, 3]`` homographies with ``H @ dst_k ~ src_k`` for 4 point pairs ``[B, 4, 2]``."""
  x, y = dst[..., 0], dst[..., 1]
  u, w = src[..., 0], src[..., 1]
  zero, one = jnp.zeros_like(x), jnp.ones_like(x)
  rows_u = jnp.stack([x, y, one, zero, zero, zero, -u * x, -u * y], -1)
  rows_v = jnp.stack([zero, zero, zero, x, y, one, -w * x, -w * y], -1)
  a = jnp.concatenate([rows_u, rows_v], 1)                       # [B, 8, 8]
  rhs = jnp.concatenate([u, w], 1)                              # [B, 8]
  h = jnp.linalg.solve(a, rhs[..., None])[..., 0]
  return jnp.concatenate([h, jnp.ones_like(h[:, :1])], 1).reshape(-1, 3, 3)


def _digit_corners():
  """``[4, 2]`` pixel ``(x, y)`` corners of a digit: top-left, top-right, bottom-right, bottom-left."""
  h, w = DIGIT_HW
  return jnp.asarray([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]], jnp.float32)


def projective_corners(key, batch: int, corner_sigma: float = 5.0, scale_range=(0.75, 1.0)):
  """``[batch, 4, 2]`` pixel positions P moves the digit's corners to (see :func:`projective`).

  The digit is scaled about its centre by U(scale_range), then each corner
  coordinate moved by independent N(0, corner_sigma px) noise.
  """
  k_scale, k_noise = jax.random.split(key)
  corners = _digit_corners()
  centre = (jnp.asarray(DIGIT_HW[::-1], jnp.float32) - 1) / 2
  scale = jax.random.uniform(k_scale, (batch, 1, 1), minval=scale_range[0], maxval=scale_range[1])
  return centre + scale * (corners - centre) + corner_sigma * jax.random.normal(k_noise, (batch, 4, 2))


def projective(key, digits, corner_sigma: float = 5.0, scale_range=(0.75, 1.0)):
  """P: scale, then random Gaussian moves of the four corners (pixels)."""
  b = digits.shape[0]
  moved = projective_corners(key, b, corner_sigma, scale_range)
  src = coordinates.pixel_to_normalized(jnp.broadcast_to(_digit_corners(), (b, 4, 2)), DIGIT_HW)
  dst = coordinates.pixel_to_normalized(moved, DIGIT_HW)
  grid = grids.projective_grid(_homography_from_points(src, dst), DIGIT_HW)
  return sampling.sample(digits, grid)


def elastic(key, digits, control_shape=(4, 4), sigma: float = 1.5, scale_range=(0.75, 1.0)):
  """E: scale, then a thin-plate spline with control points moved by N(0, sigma px)."""
  b = digits.shape[0]
  k_scale, k_noise = jax.random.split(key)
  k = control_shape[0] * control_shape[1]
  # The control points in the digits' float dtype (float32 as before for float32 digits).
  target = coordinates.control_points(*control_shape).astype(coordinates.float_dtype(digits))
  scale = jax.random.uniform(k_scale, (b, 1, 1), minval=scale_range[0], maxval=scale_range[1])
  noise_px = sigma * jax.random.normal(k_noise, (b, k, 2))
  # Output control point t reads input point t / scale + noise (in pixels -> normalised).
  source = target[None] / scale + noise_px * (2.0 / DIGIT_HW[0])
  grid = grids.tps_grid(source, DIGIT_HW, target_points=target)
  return sampling.sample(digits, grid)


def _paste(canvas, patch, top_left):
  """Pastes ``patch [h, w, 1]`` into ``canvas [H, W, 1]`` at integer ``(x, y)`` by maximum."""
  region = jax.lax.dynamic_slice(canvas, (top_left[1], top_left[0], 0), patch.shape)
  return jax.lax.dynamic_update_slice(canvas, jnp.maximum(region, patch),
                                      (top_left[1], top_left[0], 0))


def translate(key, digits, canvas_hw: Sequence[int] = (60, 60)):
  """The digit at a uniform random (whole-pixel) position on a ``canvas_hw`` canvas."""
  b = digits.shape[0]
  ch, cw = canvas_hw
  top_left = jax.random.randint(key, (b, 2), 0, jnp.asarray([cw, ch]) - DIGIT_HW[0] + 1)
  canvas = jnp.zeros((b, ch, cw, 1), digits.dtype)
  return jax.vmap(_paste)(canvas, digits, top_left)


def clutter(key, digits, canvas, num_clutter: int = 6, patch: int = 6):
  """Adds ``num_clutter`` random ``patch x patch`` crops of other batch digits to ``canvas``."""
  b = digits.shape[0]
  ch, cw = canvas.shape[1:3]
  crop_one = lambda d, yx: jax.lax.dynamic_slice(d, (yx[0], yx[1], 0), (patch, patch, 1))
  for k in jax.random.split(key, num_clutter):
    k_src, k_crop, k_pos = jax.random.split(k, 3)
    other = (jnp.arange(b) + jax.random.randint(k_src, (), 1, max(b, 2))) % b
    crop_at = jax.random.randint(k_crop, (b, 2), 0, DIGIT_HW[0] - patch + 1)
    pieces = jax.vmap(crop_one)(digits[other], crop_at)
    paste_at = jax.random.randint(k_pos, (b, 2), 0, jnp.asarray([cw, ch]) - patch + 1)
    canvas = jax.vmap(_paste)(canvas, pieces, paste_at)
  return canvas


def cluttered(key, digits, canvas_hw: Sequence[int] = (60, 60), num_clutter: int = 6):
  """Translated MNIST plus clutter (the paper's 60x60 cluttered MNIST)."""
  k_pos, k_clutter = jax.random.split(key)
  return clutter(k_clutter, digits, translate(k_pos, digits, canvas_hw), num_clutter)


_GENERATORS = {"R": rotate, "RTS": rotate_translate_scale, "P": projective, "E": elastic,
               "translated": translate, "cluttered": cluttered}


def to_float(digits):
  """uint8 ``[B, 28, 28, 1]`` (or float in [0, 1]) to float32 in [0, 1]."""
  digits = jnp.asarray(digits)
  if digits.dtype == jnp.uint8:
    return digits.astype(jnp.float32) / 255.0
  return digits.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames="variant")
def distort(key: jax.Array, digits: jax.Array, variant: str) -> jax.Array:
  """Distorts a batch ``[B, 28, 28, 1]`` (uint8 or float) into float32 ``[B, *OUTPUT_HW[variant], 1]``."""
  v.check_choice("variant", variant, VARIANTS)
  v.check_rank("digits", digits, 4, "[B, 28, 28, 1]")
  if tuple(digits.shape[1:]) != (28, 28, 1):
    raise ValueError(f"digits must have shape [B, 28, 28, 1]; got {v.shape_str(digits.shape)}.")
  return jnp.clip(_GENERATORS[variant](key, to_float(digits)), 0.0, 1.0)


@functools.partial(jax.jit, static_argnames="variant")
def distort_each(keys: jax.Array, digits: jax.Array, variant: str) -> jax.Array:
  """:func:`distort` with one key per example (``keys [B]``).

  An example's distortion then depends only on its own key, not on which
  batch or process shard it is in.
  """
  return jax.vmap(lambda k, d: distort(k, d[None], variant)[0])(keys, digits)


@functools.partial(jax.jit, static_argnames="variant")
def addition_pairs(key, first, second, labels_first, labels_second, variant: str = "RTS"):
  """MNIST addition: two independently distorted digits as 2 channels; label = their sum.

  Returns ``(images [B, H, W, 2], labels [B])`` with labels in 0..18.
  """
  k1, k2 = jax.random.split(key)
  a = distort(k1, first, variant)
  b = distort(k2, second, variant)
  return jnp.concatenate([a, b], -1), labels_first + labels_second


NO_DIGIT = 10


@functools.partial(jax.jit, static_argnames=("canvas_hw", "max_digits"))
def digit_sequences(key, digits, labels, *, canvas_hw=(64, 64), max_digits: int = 5,
                    max_degrees: float = 15.0, scale_range=(0.6, 1.0)):
  """Sequences of 1..``max_digits`` digits side by side, randomly placed on a canvas.

  Args:
    digits: ``[B, max_digits, 28, 28, 1]`` digits per sequence slot.
    labels: ``[B, max_digits]`` their classes.

  Returns:
    ``(images [B, *canvas_hw, 1], lengths [B], sequence_labels [B, max_digits])``
    with ``NO_DIGIT`` (10) in slots past the length. The strip of digits is
    scaled to a random fraction ``scale_range`` of the largest size that fits,
    rotated within ``+-max_degrees`` and shifted uniformly within the room left.
  """
  b = digits.shape[0]
  k_len, k_angle, k_scale, k_shift = jax.random.split(key, 4)
  lengths = jax.random.randint(k_len, (b,), 1, max_digits + 1)
  present = jnp.arange(max_digits)[None] < lengths[:, None]
  strip = jnp.where(present[:, :, None, None, None], to_float(digits), 0.0)
  strip = strip.transpose(0, 2, 1, 3, 4).reshape(b, 28, 28 * max_digits, 1)
  angle = jnp.deg2rad(jax.random.uniform(k_angle, (b,), minval=-max_degrees, maxval=max_degrees))
  width = 28.0 * lengths
  fit = 0.9 * jnp.minimum(canvas_hw[1] / width, canvas_hw[0] / 28.0)
  scale = fit * jax.random.uniform(k_scale, (b,), minval=scale_range[0], maxval=scale_range[1])
  room = (jnp.asarray(canvas_hw[::-1], jnp.float32)[None]
          - scale[:, None] * jnp.stack([width, jnp.full_like(width, 28.0)], -1)) / 2
  shift = jax.random.uniform(k_shift, (b, 2), minval=-1.0, maxval=1.0) * jnp.maximum(room, 0.0)
  # Centre the sequence (not the whole strip): move the strip's centre to it.
  m = _similarity_pixels(angle, scale, shift, (28, 28 * max_digits), canvas_hw)
  offset = jnp.stack([14.0 * lengths - 14.0 * max_digits, jnp.zeros(b)], -1)
  m = m.at[:, :2, 2].add(offset)
  images = jnp.clip(_warp_affine(strip, m, tuple(canvas_hw)), 0.0, 1.0)
  return images, lengths, jnp.where(present, labels, NO_DIGIT)
