"""3-D spatial transformers (the paper's appendix A.3): ``cnn`` and ``st3d_cnn``.

A digit extruded into a 60x60x60 volume, randomly rotated (+-45 degrees
about each axis, our choice) and translated (+-8 voxels) in 3-D
(:func:`stn_jax.volumetric.extruded_digits`). ``st3d_cnn``: a 3-D affine
transformer (:class:`stn_jax.modules3d.SpatialTransformer3D`) samples a
30x30x30 volume, which is summed along depth into a 30x30 image for the
Table 1 CNN; ``cnn``: the same CNN on the volume average-pooled by 2 and
summed along depth (what the transformer gives at the identity).
"""

from __future__ import annotations

from stn_jax.configs import common

NAMES = ("cnn", "st3d_cnn")


def get_config(name: str = "st3d_cnn"):
  if name not in NAMES:
    raise common.unknown_name("mnist_3d", name, NAMES)
  c = common.mnist_config(name, "mnist_3d")
  c.st3d = name == "st3d_cnn"
  c.volume_size = 60
  c.output_size = 30           # the transformer's output cube, and the classifier's input
  c.thickness = 6.0
  c.max_degrees = 45.0
  c.max_shift = 8.0
  c.projection = "sum"
  c.test_examples = 1000
  c.batch_size = 32
  c.eval_batch_size = 100
  c.steps = 30_000
  c.eval_every = 3_000
  return c
