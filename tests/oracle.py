"""An independent, slow NumPy reference for ``grid_sample`` semantics.

Written point by point from the definitions (kernel evaluated at each pixel's
distance, reflection by modular arithmetic) rather than from the library's
tap-weight formulation, so that agreement is evidence, not a tautology.
"""

import math

import numpy as np


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
      cx, cy = to_pixel(float(gx), w, align_corners), to_pixel(float(gy), h, align_corners)
      for ny, wy in axis_weights(cy, h, method, padding_mode, align_corners):
        for nx, wx in axis_weights(cx, w, method, padding_mode, align_corners):
          m[i * wo + j, ny * w + nx] += wy * wx
  return m


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
