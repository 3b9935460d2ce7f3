"""CUB-200-2011 with parallel attention transformers (Table 3): ``st{2,4}_448``, ``cnn_224``.

:class:`stn_jax.models.ParallelSTClassifier`: N attention transformers crop
448x448 inputs to 224x224, each crop through its own backbone. The paper's
backbones are ImageNet-pretrained Inception (batch-norm) networks, which
are not available offline; these configs use a small CNN backbone trained
from scratch, so they exercise the model but cannot reproduce Table 3. The
data (TFDS ``caltech_birds2011``) must be prepared first.
"""

from __future__ import annotations

from stn_jax.configs import common

NAMES = ("cnn_224", "st2_448", "st4_448")


def get_config(name: str = "st2_448"):
  if name not in NAMES:
    raise common.unknown_name("cub", name, NAMES)
  c = common.base_config()
  c.name = name
  c.task = "cub"
  c.data = "caltech_birds2011"
  c.num_transformers = 0 if name == "cnn_224" else int(name[2])
  c.image_size = 224 if name == "cnn_224" else 448
  c.batch_size = 32
  c.eval_batch_size = 64
  c.steps = 30_000
  c.optimizer.learning_rate = 0.01
  return c
