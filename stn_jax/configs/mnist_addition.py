"""MNIST addition (the paper's appendix): two digits, each distorted independently, as 2 channels.

Names: ``fcn`` (no transformer), ``st_fcn_affine``, ``st_fcn_tps`` (2
parallel transformers). The distortion is RTS (42x42) for both digits.
"""

from __future__ import annotations

from stn_jax.configs import common

# Config name: its settings.
CONFIGS = {"fcn": dict(transform=None), "st_fcn_affine": dict(transform="affine"),
           "st_fcn_tps": dict(transform="tps")}
NAMES = tuple(CONFIGS)


def get_config(name: str = "st_fcn_affine"):
  if name not in CONFIGS:
    raise common.unknown_name("mnist_addition", name, NAMES)
  return common.mnist_config(name, "mnist_addition", variant="RTS", **CONFIGS[name])
