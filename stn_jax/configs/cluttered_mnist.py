"""Translated and cluttered MNIST on a 60x60 canvas: FCN, CNN, ST-FCN and ST-CNN, ``_translated`` / ``_cluttered``.

Names: ``{fcn,cnn,st_fcn_affine,st_cnn_affine,st_cnn_attention}_{translated,cluttered}``.
The paper (Table 1's right part, cluttered): FCN 13.2, CNN 3.5, ST-FCN 2.0,
ST-CNN 1.7 % test error. Another reference point: MatConvNet's
spatial-transformer example reports 5.7% (ST) against 14.2% (plain CNN) on
cluttered MNIST (see ../shared/reference/paper.md). Distortions:
:mod:`stn_jax.distortions`.
"""

from __future__ import annotations

from stn_jax.configs import common

# Config name: its settings (the classifier reads the 60x60 output pooled to 30x30).
MODELS = (("fcn", "fcn", None), ("cnn", "cnn", None), ("st_fcn_affine", "fcn", "affine"),
          ("st_cnn_affine", "cnn", "affine"), ("st_cnn_attention", "cnn", "attention"))
CONFIGS = {f"{model}_{variant}": dict(backbone=backbone, transform=transform, variant=variant,
                                      post_pool=2)
           for model, backbone, transform in MODELS
           for variant in ("translated", "cluttered")}
NAMES = tuple(CONFIGS)


def get_config(name: str = "st_cnn_affine_cluttered"):
  if name not in CONFIGS:
    raise common.unknown_name("cluttered_mnist", name, NAMES)
  return common.mnist_config(name, "distorted_mnist", **CONFIGS[name])
