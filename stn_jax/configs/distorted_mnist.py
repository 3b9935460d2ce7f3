"""Distorted MNIST, the paper's Table 1: ``<model>_<distortion>``.

Models: ``fcn``, ``cnn``, ``st_fcn_{affine,projective,tps}``,
``st_cnn_{affine,projective,tps}``; distortions ``r``, ``rts``, ``p``, ``e``
(e.g. ``st_cnn_affine_rts``). Architectures are
:class:`stn_jax.models.DistortedMnistModel`'s (its docstring gives the
sources); the training set-up is :func:`common.base_config`'s. RTS inputs
are 42x42 and the transformer output is average-pooled by 2 before the
classifier (the paper); the others are 28x28.
"""

from __future__ import annotations

from stn_jax.configs import common

MODELS = {
    "fcn": ("fcn", None), "cnn": ("cnn", None),
    "st_fcn_affine": ("fcn", "affine"), "st_fcn_projective": ("fcn", "projective"),
    "st_fcn_tps": ("fcn", "tps"),
    "st_cnn_affine": ("cnn", "affine"), "st_cnn_projective": ("cnn", "projective"),
    "st_cnn_tps": ("cnn", "tps"),
}
DISTORTIONS = {"r": "R", "rts": "RTS", "p": "P", "e": "E"}
NAMES = tuple(f"{m}_{d}" for m in MODELS for d in DISTORTIONS)


def get_config(name: str = "st_cnn_affine_rts"):
  if name not in NAMES:
    raise common.unknown_name("distorted_mnist", name, NAMES)
  model, distortion = name.rsplit("_", 1)
  c = common.base_config()
  c.name = name
  c.task = "distorted_mnist"
  c.variant = DISTORTIONS[distortion]
  c.backbone, transform = MODELS[model]
  c.transform = transform or ""
  c.post_pool = 2 if c.variant == "RTS" else 1
  return c
