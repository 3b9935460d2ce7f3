"""Figures: inputs beside spatial-transformer outputs, with the sampling grid drawn on the input.

The paper's figure 3 style: one row per example, first column the input with
the outline and a lattice of the transformer's sampling grid drawn on it, then
one column per transformer output.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from stn_jax import coordinates


def _show(ax, image: np.ndarray) -> None:
  image = np.asarray(image, np.float32)
  if image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=max(1.0, float(image.max())))
  elif image.shape[-1] == 3:
    ax.imshow(np.clip(image, 0, 1))
  else:  # Several channels (e.g. MNIST addition): show them side by side.
    ax.imshow(np.concatenate(list(np.moveaxis(image, -1, 0)), axis=1), cmap="gray", vmin=0, vmax=1)
  ax.set_xticks([])
  ax.set_yticks([])


def _draw_grid(ax, points: np.ndarray, color: str, lines: int = 5) -> None:
  """Outline and a ``lines x lines`` lattice of a ``[Ho, Wo, 2]`` pixel grid."""
  ho, wo = points.shape[:2]
  for r in np.unique(np.linspace(0, ho - 1, lines).round().astype(int)):
    ax.plot(points[r, :, 0], points[r, :, 1], color=color, lw=0.8)
  for c in np.unique(np.linspace(0, wo - 1, lines).round().astype(int)):
    ax.plot(points[:, c, 0], points[:, c, 1], color=color, lw=0.8)


def transformer_figure(inputs: np.ndarray, outputs: Sequence[np.ndarray],
                       grids: Sequence[Optional[np.ndarray]], *, titles: Sequence[str] = (),
                       row_labels: Optional[Sequence[str]] = None, align_corners: bool = False,
                       suptitle: str = ""):
  """A ``matplotlib.figure.Figure``: inputs ``[N, H, W, C]`` | each output ``[N, h, w, C]``.

  ``grids[k]`` is transformer ``k``'s sampling grid ``[N, Ho, Wo, 2]``
  (normalised, as :func:`stn_jax.transform_grid`), drawn on the input in its
  own colour; ``None`` draws nothing. ``row_labels[i]`` captions row ``i``
  (e.g. ``'true 3, predicted 5'``). The figure is made without pyplot, so
  no matplotlib backend is changed; Jupyter shows a returned figure inline.
  """
  from matplotlib.figure import Figure

  n = len(inputs)
  cols = 1 + len(outputs)
  colors = ["tab:red", "tab:cyan", "tab:orange", "tab:green"]
  fig = Figure(figsize=(1.6 * cols, 1.6 * n + (0.25 * n if row_labels else 0)))
  axes = fig.subplots(n, cols, squeeze=False)
  for i in range(n):
    _show(axes[i, 0], inputs[i])
    h, w = inputs.shape[1:3]
    for k, grid in enumerate(grids):
      if grid is not None:
        points = coordinates.normalized_to_pixel(grid[i], (h, w), align_corners=align_corners)
        _draw_grid(axes[i, 0], np.asarray(points), colors[k % 4])
    axes[i, 0].set_xlim(-0.5, w - 0.5)
    axes[i, 0].set_ylim(h - 0.5, -0.5)
    if row_labels is not None:
      axes[i, 0].set_xlabel(row_labels[i], fontsize=7, loc="left")
    for k, out in enumerate(outputs):
      _show(axes[i, k + 1], out[i])
  header = ["input"] + list(titles or [f"ST {k + 1}" for k in range(len(outputs))])
  for k, title in enumerate(header):
    axes[0, k].set_title(title, fontsize=8)
  if suptitle:
    fig.suptitle(suptitle, fontsize=9)
  fig.tight_layout()
  return fig


def save_transformer_figure(path: str, inputs: np.ndarray, outputs: Sequence[np.ndarray],
                            grids: Sequence[Optional[np.ndarray]], **kwargs):
  """:func:`transformer_figure` written to ``path`` (PNG, 100 dpi); returns the figure."""
  fig = transformer_figure(inputs, outputs, grids, **kwargs)
  fig.savefig(path, dpi=100)
  return fig
