"""Translated and cluttered MNIST on a 60x60 canvas: ``cnn`` or ``st_cnn_affine``, ``_translated`` / ``_cluttered``.

A reference point: MatConvNet's spatial-transformer example reports 5.7%
(ST) against 14.2% (plain CNN) test error on cluttered MNIST (see
../shared/reference/paper.md). Distortions: :mod:`stn_jax.distortions`.
"""

from __future__ import annotations

from stn_jax.configs import common

# Config name: its settings (the classifier reads the 60x60 output pooled to 30x30).
CONFIGS = {f"{model}_{variant}": dict(backbone="cnn", transform=transform, variant=variant,
                                      post_pool=2)
           for model, transform in (("cnn", None), ("st_cnn_affine", "affine"),
                                    ("st_cnn_attention", "attention"))
           for variant in ("translated", "cluttered")}
NAMES = tuple(CONFIGS)


def get_config(name: str = "st_cnn_affine_cluttered"):
  if name not in CONFIGS:
    raise common.unknown_name("cluttered_mnist", name, NAMES)
  return common.mnist_config(name, "distorted_mnist", **CONFIGS[name])
