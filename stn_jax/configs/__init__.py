"""Experiment configs, one module per family, and the one registry of them.

A family module (``stn_jax/configs/<family>.py``) defines ``NAMES`` and
``get_config(name)``; :data:`FAMILIES` lists the family modules. A config is
named ``"<family>:<name>"``, e.g. ``"distorted_mnist:st_cnn_affine_rts"``:

  >>> from stn_jax import configs
  >>> config = configs.get_config("distorted_mnist:st_cnn_affine_rts")
  >>> "distorted_mnist:cnn_r" in configs.names()
  True

The older file form ``experiments/configs/<family>.py:<name>`` (any path whose
file name is a family's) names the same config.
"""

from __future__ import annotations

import importlib
import os
import types

# The families, in the order they are listed. Adding one: its module plus one entry here.
FAMILIES = ("distorted_mnist", "cluttered_mnist", "mnist_addition", "sequences", "svhn", "cub",
            "colocalisation", "mnist_3d")


def family_module(family: str) -> types.ModuleType:
  """The module ``stn_jax.configs.<family>``; ``ValueError`` for an unknown family."""
  if family not in FAMILIES:
    raise ValueError(f"unknown config family {family!r}; choose one of: {', '.join(FAMILIES)}.")
  return importlib.import_module(f"stn_jax.configs.{family}")


def names() -> list[str]:
  """Every config name, ``"<family>:<name>"``, family by family."""
  return [f"{family}:{name}" for family in FAMILIES for name in family_module(family).NAMES]


def split_name(spec: str) -> tuple[str, str]:
  """``(family, name)`` of ``"<family>:<name>"`` or ``"<path>/<family>.py:<name>"``."""
  family, sep, name = spec.partition(":")
  family = os.path.basename(family)
  if family.endswith(".py"):
    family = family[:-len(".py")]
  if not sep or not name:
    choices = ", ".join(family_module(family).NAMES) if family in FAMILIES else \
        ", ".join(f"{f}:<name>" for f in FAMILIES)
    raise ValueError(f"config {spec!r} names no config; give '<family>:<name>', one of: {choices}.")
  return family, name


def get_config(spec: str):
  """The ``ml_collections.ConfigDict`` named ``spec`` (``"<family>:<name>"``)."""
  family, name = split_name(spec)
  return family_module(family).get_config(name)
