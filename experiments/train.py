"""Trains one experiment: ``python -m experiments.train ...`` is ``stn-jax train ...``.

  python -m experiments.train --config=distorted_mnist:st_cnn_affine_rts \\
      --workdir=runs/st_cnn_affine_rts [--config.steps=3000 ...]

The command, its flags (``--config``, ``--workdir``, ``--data_dir``,
``--nodownload``, the multi-host ones) and the config names are
:mod:`stn_jax.cli`'s; ``--help`` lists them.
"""

import sys

from stn_jax import cli

if __name__ == "__main__":
  sys.exit(cli.main([sys.argv[0], "train", *sys.argv[1:]]))
