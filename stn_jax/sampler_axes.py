"""What every sampler backend does along one image axis.

The low layer under :mod:`stn_jax.sampling` and its backends
(:mod:`stn_jax.sampler_gather`, :mod:`stn_jax.sampler_matmul`,
:mod:`stn_jax._native`), so that they share one definition of:

* the constants :data:`COORD_LIMIT` and :data:`PIXEL_CENTRE_TOLERANCE`
  (re-exported by :mod:`stn_jax.sampling`, where they are documented);
* :func:`clean_grid`: non-finite points marked invalid, huge ones clamped;
* the padding modes applied to integer tap positions (:func:`tap_index`);
* the bilinear taps of one axis and their weights, for the value and for the
  derivative with the pixel-centre rule (:func:`linear_taps`).

Bilinear sampling pads *taps*, not the coordinate: a tap at an integer
position outside the image reads 0 (``'zeros'``), the nearest border pixel
(``'border'``) or its mirror image (``'reflection'``). For the values this is
the same as PyTorch's clamping/reflecting of the coordinate (the padded
signal is piecewise linear with corners at integers only), and it gives the
derivative at the padding's own corners (the image border with
``align_corners=True``) by the same rule as at any pixel centre.

Coordinates ``u`` here are pixel coordinates (pixel ``i``'s centre at ``i``)
of shape ``[...]``; sizes are Python ints.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Normalised coordinates are clamped to +-COORD_LIMIT before conversion to
# pixels, so that huge finite values cannot overflow float32.
COORD_LIMIT = 1e8
# Pixel coordinates within this distance (in pixels, every dtype) of an integer
# are "at a pixel centre" for the bilinear gradient rule (stn_jax.sampling).
PIXEL_CENTRE_TOLERANCE = 1e-4


def clean_grid(grid: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """``(grid, valid)``: ``grid [..., 2]`` in ``dtype`` with non-finite points set to 0 and
  the rest clamped to ``+-COORD_LIMIT``, and the ``[...]`` mask of finite points."""
  grid = grid.astype(dtype)
  valid = jnp.isfinite(grid).all(axis=-1)
  grid = jnp.where(valid[..., None], grid, 0.0)   # No NaN in any branch or gradient.
  return jnp.clip(grid, -COORD_LIMIT, COORD_LIMIT), valid


def reflect(coord, size: int, align_corners: bool):
  """Reflects pixel coordinates into the image, as ``grid_sample`` does.

  The mirrors are the corner pixel centres (``align_corners=True``) or the
  outer pixel edges (False).
  """
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


def clamp(coord, size: int):
  return jnp.clip(coord, 0.0, size - 1.0)


def tap_index(position, size: int, padding_mode: str, align_corners: bool):
  """``(index, inside)`` of integer tap positions (floats ``[...]``) under the padding mode.

  ``index`` (int32) is always inside the image; ``inside`` is the float mask
  (0 or 1) of taps that read it, or None where every tap does (``'border'``,
  ``'reflection'``).
  """
  inside = None
  if padding_mode == "zeros":
    inside = ((position >= 0) & (position <= size - 1)).astype(position.dtype)
  elif padding_mode == "reflection":
    position = reflect(position, size, align_corners)
  return clamp(position, size).astype(jnp.int32), inside


def bring_near(u, size: int, padding_mode: str, align_corners: bool, reach: int):
  """Moves far-away pixel coordinates closer without changing what a kernel of ``reach`` reads.

  Keeps integer conversion of the taps in range. Reflection is periodic, so
  whole periods are removed (derivative 1); in the other modes coordinates
  more than ``reach`` pixels outside read nothing or only the border pixel,
  so they are clamped there (derivative 0, as the value is constant there).
  """
  if padding_mode == "reflection":
    period = 2.0 * (size - 1 if align_corners else size)
    if period > 0:
      u = u - period * jax.lax.stop_gradient(jnp.floor(u / period))
    return u
  return jnp.clip(u, -1.0 - reach, size + reach)


def linear_taps(u, order: frozenset, size: int, padding_mode: str, align_corners: bool):
  """Bilinear taps of one axis at pixel coordinates ``u [...]``.

  Args:
    u: pixel coordinates (after :func:`bring_near`).
    order: the derivative orders wanted, a subset of ``{0, 1}``.

  Returns:
    ``(index, weights)``: a list of int32 ``[...]`` tap indices (inside the
    image), and for each order in ``order`` the list of the taps' float
    weights (padding applied). Two taps when one order is wanted, three
    (``round(u) - 1 .. round(u) + 1``) when both are.

  Order 0 weights are ``(1 - t, t)`` at ``floor(u)``, ``floor(u) + 1``. Order 1
  weights are the derivative of the output along ``u``: ``(-1, 1)`` at the
  same taps, except within :data:`PIXEL_CENTRE_TOLERANCE` of an integer ``r``,
  where they are ``(-1/2, 1/2)`` at ``r - 1``, ``r + 1`` (the mean of the two
  one-sided derivatives). The weights are piecewise constant in ``u`` (order
  1) or linear (order 0); callers give them their derivative rules.
  """
  left = jnp.floor(u)
  t = u - left
  nearest = jnp.round(u)
  near = jnp.abs(u - nearest) <= PIXEL_CENTRE_TOLERANCE
  zero, one, half = (jnp.zeros_like(u) + k for k in (0.0, 1.0, 0.5))
  if order == frozenset({0}):
    positions, weights = [left, left + 1], {0: [1 - t, t]}
  elif order == frozenset({1}):
    positions = [jnp.where(near, nearest - 1, left), jnp.where(near, nearest + 1, left + 1)]
    step = jnp.where(near, half, one)
    weights = {1: [-step, step]}
  elif order == frozenset({0, 1}):
    positions = [nearest - 1, nearest, nearest + 1]
    low = left == nearest  # Taps floor(u), floor(u) + 1 are the last two of the three.
    weights = {0: [jnp.where(low, zero, 1 - t), jnp.where(low, 1 - t, t),
                   jnp.where(low, t, zero)],
               1: [jnp.where(near, -half, jnp.where(low, zero, -one)),
                   jnp.where(near, zero, jnp.where(low, -one, one)),
                   jnp.where(near, half, jnp.where(low, one, zero))]}
  else:
    raise ValueError(f"order must be a non-empty subset of {{0, 1}}; got {set(order)}.")
  index, inside = [], []
  for position in positions:
    i, mask = tap_index(position, size, padding_mode, align_corners)
    index.append(i)
    inside.append(mask)
  if padding_mode == "zeros":
    weights = {k: [w * m for w, m in zip(ws, inside)] for k, ws in weights.items()}
  return index, weights
