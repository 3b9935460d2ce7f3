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

# Model name: (backbone, transform or None).
MODELS = {
    "fcn": ("fcn", None), "cnn": ("cnn", None),
    "st_fcn_affine": ("fcn", "affine"), "st_fcn_projective": ("fcn", "projective"),
    "st_fcn_tps": ("fcn", "tps"),
    "st_cnn_affine": ("cnn", "affine"), "st_cnn_projective": ("cnn", "projective"),
    "st_cnn_tps": ("cnn", "tps"),
}
DISTORTIONS = {"r": "R", "rts": "RTS", "p": "P", "e": "E"}
# Config name: its settings.
CONFIGS = {f"{model}_{suffix}": dict(backbone=backbone, transform=transform, variant=variant,
                                     post_pool=2 if variant == "RTS" else 1)
           for model, (backbone, transform) in MODELS.items()
           for suffix, variant in DISTORTIONS.items()}
NAMES = tuple(CONFIGS)


def get_config(name: str = "st_cnn_affine_rts"):
  if name not in CONFIGS:
    raise common.unknown_name("distorted_mnist", name, NAMES)
  return common.mnist_config(name, "distorted_mnist", **CONFIGS[name])
