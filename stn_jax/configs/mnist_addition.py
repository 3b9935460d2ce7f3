"""MNIST addition (the paper's appendix): two digits, each distorted independently, as 2 channels.

Names: ``fcn`` (no transformer), ``st_fcn_affine``, ``st_fcn_tps`` (2
parallel transformers). The distortion is RTS (42x42) for both digits.
"""

from __future__ import annotations

from stn_jax.configs import common

NAMES = ("fcn", "st_fcn_affine", "st_fcn_tps")


def get_config(name: str = "st_fcn_affine"):
  if name not in NAMES:
    raise common.unknown_name("mnist_addition", name, NAMES)
  c = common.base_config()
  c.name = name
  c.task = "mnist_addition"
  c.variant = "RTS"
  c.transform = "" if name == "fcn" else name.split("_")[-1]
  return c
