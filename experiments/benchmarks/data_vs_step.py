"""Time to distort a batch of 256 digits against one ST-CNN training step on it.

  python -m experiments.benchmarks.data_vs_step

Both jit-compiled, interleaved, medians after warm-up; the step is SGD with
momentum on the ST-CNN (affine) for the variant's input size.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
import optax
from flax import nnx

from experiments.benchmarks.sampler import environment_line, time_interleaved
from stn_jax import distortions, host_memory
from stn_jax.models import DistortedMnistModel


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--variants", nargs="*", default=list(distortions.VARIANTS))
  parser.add_argument("--repeats", type=int, default=10)
  args = parser.parse_args(argv)
  host_memory.reuse_freed_host_memory()  # before the first computation
  rng = np.random.default_rng(0)
  digits = rng.integers(0, 256, (args.batch, 28, 28, 1)).astype(np.uint8)
  labels = rng.integers(0, 10, args.batch)
  print(environment_line())
  print("| variant | distort 256 ms | ST-CNN step ms | ratio |\n|---|---|---|---|")
  for variant in args.variants:
    hw = distortions.OUTPUT_HW[variant]
    model = DistortedMnistModel(hw, backbone="cnn", transform="affine",
                                post_pool=2 if hw[0] > 28 else 1, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.sgd(0.01, momentum=0.9), wrt=nnx.Param)
    x = distortions.distort(jax.random.key(0), digits, variant)

    @nnx.jit
    def step(model, opt, x, y):
      def loss(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
      value, grads = nnx.value_and_grad(loss)(model)
      opt.update(model, grads)
      return value

    ms = time_interleaved({
        "distort": lambda: distortions.distort(jax.random.key(1), digits, variant).block_until_ready(),
        "step": lambda: jax.block_until_ready(step(model, opt, x, labels)),
    }, args.repeats)
    print(f"| {variant} | {ms['distort']:.2f} | {ms['step']:.2f} | {ms['distort'] / ms['step']:.3f} |",
          flush=True)


if __name__ == "__main__":
  main()
