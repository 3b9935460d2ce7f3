"""MNIST addition (the paper's appendix A.1): two digits, each RTS-distorted independently, as 2 channels.

Names, as the paper's four models (test error there: 47.7 / 14.7 / 18.5 / 5.8 %):

- ``fcn``: a 256-256 FCN on the 42x42x2 input, 19 classes (the sums 0..18);
- ``cnn``: Table 1's CNN (conv 9x9, conv 7x7, 32 filters each) on the 2 channels;
- ``st_fcn_affine``: one affine transformer warping both channels, then the FCN;
- ``st_fcn_affine_2x``: two parallel affine transformers (the paper's 2xST-FCN;
  each can pick one digit), their outputs concatenated for the FCN;
- ``st_fcn_tps_2x``: the same with thin-plate-spline transformers.
"""

from __future__ import annotations

from stn_jax.configs import common

# Config name: its settings.
CONFIGS = {"fcn": dict(backbone="fcn", transform=None, num_transformers=0),
           "cnn": dict(backbone="cnn", transform=None, num_transformers=0),
           "st_fcn_affine": dict(backbone="fcn", transform="affine", num_transformers=1),
           "st_fcn_affine_2x": dict(backbone="fcn", transform="affine", num_transformers=2),
           "st_fcn_tps_2x": dict(backbone="fcn", transform="tps", num_transformers=2)}
NAMES = tuple(CONFIGS)


def get_config(name: str = "st_fcn_affine_2x"):
  if name not in CONFIGS:
    raise common.unknown_name("mnist_addition", name, NAMES)
  return common.mnist_config(name, "mnist_addition", variant="RTS", **CONFIGS[name])
