"""Translated and cluttered MNIST on a 60x60 canvas: ``cnn`` or ``st_cnn_affine``, ``_translated`` / ``_cluttered``.

A reference point: MatConvNet's spatial-transformer example reports 5.7%
(ST) against 14.2% (plain CNN) test error on cluttered MNIST (see
../shared/reference/paper.md). Distortions: :mod:`stn_jax.distortions`.
"""

from __future__ import annotations

from stn_jax.configs import common

NAMES = tuple(f"{m}_{d}" for m in ("cnn", "st_cnn_affine", "st_cnn_attention")
              for d in ("translated", "cluttered"))


def get_config(name: str = "st_cnn_affine_cluttered"):
  if name not in NAMES:
    raise common.unknown_name("cluttered_mnist", name, NAMES)
  model, distortion = name.rsplit("_", 1)
  c = common.base_config()
  c.name = name
  c.task = "distorted_mnist"
  c.variant = distortion
  c.backbone = "cnn"
  c.transform = "" if model == "cnn" else model.split("_")[-1]
  c.post_pool = 2        # 60x60 -> 30x30 for the classifier
  return c
