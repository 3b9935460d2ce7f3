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

# Config name: its settings.
CONFIGS = {"cnn_224": dict(num_transformers=0, image_size=224),
           "st2_448": dict(num_transformers=2, image_size=448),
           "st4_448": dict(num_transformers=4, image_size=448)}
NAMES = tuple(CONFIGS)


def get_config(name: str = "st2_448"):
  if name not in CONFIGS:
    raise common.unknown_name("cub", name, NAMES)
  c = common.base_config()
  c.name = name
  c.task = "cub"
  c.batch_size = 32
  c.eval_batch_size = 64
  c.steps = 30_000
  c.optimizer.learning_rate = 0.01
  c.update(CONFIGS[name])
  return c
