"""SVHN: ``cnn``, ``st_cnn_single``, ``st_cnn_multi`` (:class:`stn_jax.models.MultiDigitCNN`).

The paper's Table 2 uses 64x64 (and 128x128) crops of whole house numbers
with up to 5 digits. TensorFlow Datasets holds only ``svhn_cropped`` (single
32x32 digits), so these configs train the same models on those as
sequences of length 1; they cannot reproduce Table 2's numbers. The
data must be prepared in the TFDS directory first (it is not on these
machines). Batch 128 and SGD 0.01 with step decay are our choices.
"""

from __future__ import annotations

from stn_jax.configs import common

# Config name: its settings (``st``: None, 'single' or 'multi', see MultiDigitCNN).
CONFIGS = {"cnn": dict(st=None), "st_cnn_single": dict(st="single"),
           "st_cnn_multi": dict(st="multi")}
NAMES = tuple(CONFIGS)


def get_config(name: str = "st_cnn_single"):
  if name not in CONFIGS:
    raise common.unknown_name("svhn", name, NAMES)
  c = common.base_config()
  c.name = name
  c.task = "svhn"
  c.batch_size = 128
  c.eval_batch_size = 512
  c.update(CONFIGS[name])
  return c
