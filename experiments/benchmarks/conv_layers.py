"""The ST-CNN's four convolution layers alone: stn_jax (compiled kernels), XLA and PyTorch (oneDNN) on CPU.

  python -m experiments.benchmarks.conv_layers [--batch 256] [--repeats 15]
  taskset -c 0 python -m experiments.benchmarks.conv_layers   # one core

Each layer of Table 1's ST-CNN (RTS: the localisation net's 5x5 1->20 on 42x42
and 5x5 20->20 on 19x19, the classifier's 9x9 1->32 and 7x7 32->32 SAME on the
21x21 pooled sample and its 10x10 map), as the models run it
(:func:`stn_jax.convolution.conv_general_dilated`: on CPU the compiled kernels of
``stn_jax/native/convolution.cc``), XLA's own ``lax.conv_general_dilated``, and
PyTorch's ``conv2d``, forward and forward+backward (gradients to the input and the
kernel), interleaved in one process; medians in ms and the ratios to PyTorch.
Running it under ``taskset -c 0`` and without shows which side uses the second core.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from experiments.benchmarks.sampler import environment_line, time_interleaved  # noqa: E402
from jax import lax  # noqa: E402

from stn_jax import convolution, host_memory  # noqa: E402

# name: (input height = width, in channels, out channels, kernel, padding)
LAYERS = {
    "localisation 5x5 1->20, 42x42": (42, 1, 20, 5, "VALID"),
    "localisation 5x5 20->20, 19x19": (19, 20, 20, 5, "VALID"),
    "classifier 9x9 1->32 SAME, 21x21": (21, 1, 32, 9, "SAME"),
    "classifier 7x7 32->32 SAME, 10x10": (10, 32, 32, 7, "SAME"),
}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=15)
  args = parser.parse_args(argv)
  if args.batch < 1 or args.repeats < 1:
    raise SystemExit("--batch and --repeats must be positive")
  host_memory.reuse_freed_host_memory()  # before the first computation
  import torch
  rng = np.random.default_rng(0)
  print(environment_line(), f"\nbatch {args.batch}, {len(os.sched_getaffinity(0))} usable cores\n")
  print("| layer | pass | stn_jax ms | XLA ms | torch ms | stn_jax / torch | XLA / torch |\n"
        "|---|---|---|---|---|---|---|")
  for name, (hw, c_in, c_out, k, padding) in LAYERS.items():
    x = rng.standard_normal((args.batch, hw, hw, c_in)).astype(np.float32)
    kernel = (rng.standard_normal((k, k, c_in, c_out)) * 0.1).astype(np.float32)
    out_hw = hw - k + 1 if padding == "VALID" else hw
    cotangent = rng.standard_normal((args.batch, out_hw, out_hw, c_out)).astype(np.float32)

    def conv(x, kernel):
      return convolution.conv_general_dilated(x, kernel, (1, 1), padding,
                                              dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def xla_conv(x, kernel):
      return lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
    jx, jk, jc = map(jnp.asarray, (x, kernel, cotangent))
    forward, xla_forward = jax.jit(conv), jax.jit(xla_conv)
    forward_backward = jax.jit(lambda x, k, c: jax.vjp(conv, x, k)[1](c))
    xla_forward_backward = jax.jit(lambda x, k, c: jax.vjp(xla_conv, x, k)[1](c))
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().requires_grad_(True)
    tk = torch.from_numpy(kernel).permute(3, 2, 0, 1).contiguous().requires_grad_(True)
    tc = torch.from_numpy(cotangent).permute(0, 3, 1, 2).contiguous()
    torch_padding = 0 if padding == "VALID" else "same"

    def torch_forward():
      with torch.no_grad():
        torch.nn.functional.conv2d(tx, tk, padding=torch_padding)

    def torch_forward_backward():
      torch.nn.functional.conv2d(tx, tk, padding=torch_padding).backward(tc)

    ms = time_interleaved({
        "jf": lambda: jax.block_until_ready(forward(jx, jk)),
        "jfb": lambda: jax.block_until_ready(forward_backward(jx, jk, jc)),
        "xf": lambda: jax.block_until_ready(xla_forward(jx, jk)),
        "xfb": lambda: jax.block_until_ready(xla_forward_backward(jx, jk, jc)),
        "tf": torch_forward, "tfb": torch_forward_backward}, args.repeats)
    for label, ours, xla, theirs in (("fwd", "jf", "xf", "tf"), ("fwd+bwd", "jfb", "xfb", "tfb")):
      print(f"| {name} | {label} | {ms[ours]:.2f} | {ms[xla]:.2f} | {ms[theirs]:.2f} | "
            f"{ms[ours] / ms[theirs]:.2f} | {ms[xla] / ms[theirs]:.2f} |", flush=True)


if __name__ == "__main__":
  main()
