"""Multi-digit sequences made from MNIST (an offline stand-in for SVHN, Table 2's task).

Names: ``cnn``, ``st_cnn_single``, ``st_cnn_multi`` — the models of
:class:`stn_jax.models.MultiDigitCNN` on 64x64 canvases of 1-5 digits
(:func:`stn_jax.distortions.digit_sequences`). Sequence error counts a
sequence wrong unless its length and every digit are right. The paper's
SVHN training used SGD with dropout; batch 128 here is our choice.
"""

from __future__ import annotations

from stn_jax.configs import common

# Config name: its settings (``st``: None, 'single' or 'multi', see MultiDigitCNN).
CONFIGS = {"cnn": dict(st=None), "st_cnn_single": dict(st="single"),
           "st_cnn_multi": dict(st="multi")}
NAMES = tuple(CONFIGS)


def get_config(name: str = "st_cnn_single"):
  if name not in CONFIGS:
    raise common.unknown_name("sequences", name, NAMES)
  return common.mnist_config(name, "sequences", batch_size=128, max_digits=5, canvas=64,
                             **CONFIGS[name])
