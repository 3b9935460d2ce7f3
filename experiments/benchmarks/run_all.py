"""Runs every benchmark and writes one markdown report.

  python -m experiments.benchmarks.run_all --out docs/benchmarks/results.md

The sampler on the six shapes of the paper's experiments (stn_jax's default
and pure-JAX implementations, PyTorch, map_coordinates, dm-pix; forward and
forward+backward) and the ST-CNN (RTS, affine) training step against PyTorch.
Needs the peers: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

from experiments.benchmarks import sampler, train_step
from stn_jax import host_memory


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="docs/benchmarks/results.md")
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--step_repeats", type=int, default=15)
  args = parser.parse_args(argv)
  host_memory.reuse_freed_host_memory()  # before the first computation
  with tempfile.TemporaryDirectory() as tmp:
    sampler_md, step_md = os.path.join(tmp, "sampler.md"), os.path.join(tmp, "step.md")
    sampler.main(["--repeats", str(args.repeats), "--out", sampler_md])
    train_step.main(["--repeats", str(args.step_repeats), "--out", step_md])
    parts = [open(sampler_md).read(), open(step_md).read()]
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    f.write("# Benchmarks\n\nWritten by `python -m experiments.benchmarks.run_all "
            f"--out {args.out}`. Times in ms are medians of interleaved runs in one "
            "process; ratios are to PyTorch in the same run.\n\n## Sampler (bilinear, zeros)\n\n"
            + parts[0] + "\n## Training step\n\n" + parts[1])
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
