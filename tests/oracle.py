"""An independent, slow NumPy reference for ``grid_sample`` semantics.

Written point by point from the definitions (kernel evaluated at each pixel's
distance, reflection by modular arithmetic) rather than from the library's
tap-weight formulation, so that agreement is evidence, not a tautology.

Two deliberate departures from ``grid_sample`` are restated here from the
project's rules (stn_jax.sampling's docstring), not imported: along an axis of
one pixel with ``align_corners=True`` and zeros padding, points with
``|coordinate| > 1`` are outside; and the bilinear derivative within
``PIXEL_CENTRE_TOLERANCE`` of a pixel centre is the central difference
(:func:`grid_gradient`).
"""

import math

import numpy as np

PIXEL_CENTRE_TOLERANCE = 1e-4  # pixels; the project's rule, restated


def to_pixel(coord, size, align_corners):
  if align_corners:
    return (coord + 1) / 2 * (size - 1)
  return ((coord + 1) * size - 1) / 2


def reflect(c, size, align_corners):
  lo, hi = (0.0, size - 1.0) if align_corners else (-0.5, size - 0.5)
  span = hi - lo
  if span == 0:
    return 0.0
  m = (c - lo) % (2 * span)
  if m > span:
    m = 2 * span - m
  return lo + m


def pad_index(c, size, padding_mode, align_corners):
  """A coordinate under the padding mode; None where it reads zero."""
  if padding_mode == "border":
    return min(max(c, 0.0), size - 1.0)
  if padding_mode == "reflection":
    return min(max(reflect(c, size, align_corners), 0.0), size - 1.0)
  return c


def kernel(method, d):
  d = abs(d)
  if method == "bilinear":
    return max(0.0, 1.0 - d)
  a = -0.75
  if d <= 1:
    return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
  if d < 2:
    return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
  return 0.0


def axis_weights(c, size, method, padding_mode, align_corners):
  """List of (pixel index, weight) read along one axis at coordinate c."""
  out = []
  if method in ("bilinear", "nearest"):
    c = pad_index(c, size, padding_mode, align_corners)
    if method == "nearest":
      n = round(c)  # Python rounds half to even.
      return [(n, 1.0)] if 0 <= n <= size - 1 else []
    for n in range(math.floor(c) - 2, math.floor(c) + 3):
      w = kernel(method, c - n)
      if w != 0 and 0 <= n <= size - 1:
        out.append((n, w))
    return out
  # Bicubic: the padding applies to each of the 4 taps.
  base = math.floor(c)
  for n in range(base - 1, base + 3):
    w = kernel(method, c - n)
    p = pad_index(float(n), size, padding_mode, align_corners)
    if 0 <= p <= size - 1:
      out.append((int(p), w))
  return out


def interpolation_matrix(hw, grid, method, padding_mode, align_corners):
  """``[Ho * Wo, H * W]`` matrix ``M`` with ``out = M @ image`` for one grid ``[Ho, Wo, 2]``."""
  h, w = hw
  ho, wo = grid.shape[:2]
  m = np.zeros((ho * wo, h * w))
  for i in range(ho):
    for j in range(wo):
      gx, gy = grid[i, j]
      if not (np.isfinite(gx) and np.isfinite(gy)):
        continue
      if _outside_single_pixel_axis((gx, gy), hw, padding_mode, align_corners):
        continue
      cx, cy = to_pixel(float(gx), w, align_corners), to_pixel(float(gy), h, align_corners)
      m[i * wo + j] = point_row(hw, cx, cy, method, padding_mode, align_corners)
  return m


def _outside_single_pixel_axis(g, hw, padding_mode, align_corners):
  """Zeros padding, align_corners=True: an axis of one pixel reads nothing beyond |g| > 1."""
  h, w = hw
  return (padding_mode == "zeros" and align_corners
          and any(size == 1 and abs(c) > 1 for c, size in zip(g, (w, h))))


def point_row(hw, cx, cy, method, padding_mode, align_corners):
  """``[H * W]`` weights of every pixel for the point at pixel coordinates ``(cx, cy)``."""
  h, w = hw
  row = np.zeros(h * w)
  for ny, wy in axis_weights(cy, h, method, padding_mode, align_corners):
    for nx, wx in axis_weights(cx, w, method, padding_mode, align_corners):
      row[ny * w + nx] += wy * wx
  return row


def _slope(image, c, axis, method, padding_mode, align_corners):
  """Derivative ``[C]`` of the value at pixel coordinates ``c = [cx, cy]`` along ``axis``."""
  h, w, ch = image.shape
  def value(t):
    point = list(c)
    point[axis] = t
    return point_row((h, w), *point, method, padding_mode, align_corners) @ image.reshape(-1, ch)
  u = c[axis]
  if method == "nearest":
    return np.zeros(ch)
  if method == "bilinear":  # Linear between integers, in every padding mode.
    n = round(u)
    if abs(u - n) <= PIXEL_CENTRE_TOLERANCE:
      return 0.5 * (value(n + 1) - value(n - 1))
    return value(math.floor(u) + 1) - value(math.floor(u))
  # Bicubic: a continuous derivative, but the second one jumps at integers, so
  # the mean of second-order one-sided differences (exact for quadratics).
  e = 1e-5
  right = (-value(u + 2 * e) + 4 * value(u + e) - 3 * value(u)) / (2 * e)
  left = (value(u - 2 * e) - 4 * value(u - e) + 3 * value(u)) / (2 * e)
  return 0.5 * (right + left)


def grid_gradient(images, grid, cotangent, method="bilinear", padding_mode="zeros",
                  align_corners=False):
  """Gradient ``[B, Ho, Wo, 2]`` of ``sum(sample(images, grid) * cotangent)`` w.r.t. the grid."""
  images, grid, cotangent = (np.asarray(a, np.float64) for a in (images, grid, cotangent))
  b, h, w, _ = images.shape
  out = np.zeros_like(grid)
  for k, i, j in np.ndindex(grid.shape[:3]):
    g = grid[k, i, j]
    if not np.all(np.isfinite(g)) or _outside_single_pixel_axis(g, (h, w), padding_mode,
                                                                 align_corners):
      continue
    c = [to_pixel(float(g[0]), w, align_corners), to_pixel(float(g[1]), h, align_corners)]
    for axis, size in enumerate((w, h)):
      scale = 0.5 * (size - 1) if align_corners else 0.5 * size  # d pixel / d normalised
      slope = _slope(images[k], c, axis, method, padding_mode, align_corners)
      out[k, i, j, axis] = scale * slope @ cotangent[k, i, j]
  return out


def sample(images, grid, method="bilinear", padding_mode="zeros", align_corners=False):
  """``images [B, H, W, C]``, ``grid [B, Ho, Wo, 2]`` -> ``[B, Ho, Wo, C]`` (float64)."""
  images = np.asarray(images, np.float64)
  grid = np.asarray(grid, np.float64)
  b, h, w, c = images.shape
  out = []
  for k in range(b):
    m = interpolation_matrix((h, w), grid[k], method, padding_mode, align_corners)
    out.append((m @ images[k].reshape(h * w, c)).reshape(grid.shape[1], grid.shape[2], c))
  return np.stack(out)
