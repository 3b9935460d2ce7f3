"""Co-localisation (the paper's appendix A.2): ``translated``, ``cluttered``, and per class ``<variant>_<digit>``.

An attention transformer per image is trained with the triplet hinge loss
(margin 1) between the crops of two images of one class and a crop at a
random place; no labels and no boxes are used in training
(:mod:`stn_jax.colocalisation`). Canvases are 84x84; ``cluttered`` adds 16
random 6x6 crops of other digits. The metric (``accuracy`` in the logs, the
test "error" is its complement) is the percentage of test digits whose
predicted box has IoU > 0.5 with the true 28x28 box; the paper: 100% on
translated digits, 75-93% per class with clutter.

``translated`` and ``cluttered`` train one model on pairs of every class
(each pair shares a class); ``<variant>_<digit>`` (e.g. ``cluttered_3``)
trains on pairs of one class only, as the paper reports per class.
Optimiser (our choice): Adam, learning rate 1e-4, batch 64 (32 pairs).
"""

from __future__ import annotations

from stn_jax.configs import common

VARIANTS = {"translated": 0, "cluttered": 16}
NAMES = tuple(VARIANTS) + tuple(f"{v}_{d}" for v in VARIANTS for d in range(10))


def get_config(name: str = "translated"):
  if name not in NAMES:
    raise common.unknown_name("colocalisation", name, NAMES)
  variant, _, digit = name.partition("_")
  c = common.mnist_config(name, "colocalisation")
  c.num_clutter = VARIANTS[variant]
  c.digit_class = int(digit) if digit else -1
  c.margin = 1.0
  c.initial_scale = 28 / 84    # the starting box: half-size over the canvas half-size
  c.curriculum_steps = 0       # >0: digits start near the centre, anywhere by this step
  c.curriculum_start = 0.0     # the starting spread (colocalisation.curriculum_spread)
  c.learn_scale = True         # False: translation only (the box keeps initial_scale)
  c.inside_canvas = True       # bound the box to the canvas (colocalisation.box_inside_canvas)
  c.normalize_embeddings = False  # unit-length embeddings: the margin on the distances' scale
  c.encoder_steps = 500        # MNIST classification steps of the frozen encoder
  c.encoder_clutter = 0        # 6x6 clutter crops on each of the encoder's training digits
  c.test_examples = 2000
  c.batch_size = 64
  c.eval_batch_size = 500
  c.steps = 20_000
  c.eval_every = 2_000
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-4
  c.optimizer.schedule = "constant"
  return c
