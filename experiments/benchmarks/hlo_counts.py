"""Gather, scatter and dot ops of each sampler path, as lowered for a TPU (no TPU needed).

For the paper's shapes, lowers bilinear zero-padded sampling of an affine
grid, forward and forward+backward (gradients to the images and the grid),
with ``jax.export`` for ``--platform`` (default ``tpu``), and counts in the
StableHLO the ``gather``/``scatter`` ops with the elements they move, and the
``dot_general`` ops with their multiply-adds. That is the cost model behind
``stn_jax.sampling.choose_implementation``: the matmul path has no
gather/scatter but ``H * (W + 1) / 4`` multiply-adds per element the gather
path gathers.

  python -m experiments.benchmarks.hlo_counts            # markdown table
  python -m experiments.benchmarks.hlo_counts --platform cuda
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform as host
import re

import jax
import jax.numpy as jnp
from jax import export

from experiments.benchmarks.sampler import SHAPES
from stn_jax import sampling

_TYPE = r"tensor<([0-9x]*)x?[a-z]+[0-9]*>"


def _dims(shape_text: str) -> list[int]:
  return [int(d) for d in shape_text.split("x") if d]


def _size(shape_text: str) -> int:
  return math.prod(_dims(shape_text))


def count_ops(text: str) -> dict[str, int]:
  """Op counts, gathered/scattered elements and dot multiply-adds of a StableHLO module."""
  gathers = re.findall(r'"stablehlo\.gather".*?-> ' + _TYPE, text)
  scatters = re.findall(r'"stablehlo\.scatter".*?\}\) : \(' + _TYPE + r", " + _TYPE + r", "
                        + _TYPE, text, flags=re.DOTALL)
  macs = 0
  dots = re.findall(r"stablehlo\.dot_general .*?contracting_dims = \[([0-9, ]*)\] x .*?: \("
                    + _TYPE + r", .*?-> " + _TYPE, text)
  for contracting, lhs, out in dots:
    lhs_dims = _dims(lhs)
    contracted = math.prod(lhs_dims[int(k)] for k in contracting.split(",") if k.strip())
    macs += _size(out) * contracted
  return {"gather": len(gathers), "gathered": sum(_size(s) for s in gathers),
          "scatter": len(scatters), "scattered": sum(_size(s[2]) for s in scatters),
          "dot": len(dots), "macs": macs}


def lowered(implementation: str, shape, backward: bool, platform: str) -> str:
  b, c, h, w, ho, wo = shape
  images = jax.ShapeDtypeStruct((b, h, w, c), jnp.float32)
  grid = jax.ShapeDtypeStruct((b, ho, wo, 2), jnp.float32)
  def forward(i, g):
    return sampling.sample(i, g, implementation=implementation)
  fn = jax.grad(lambda i, g: forward(i, g).sum(), (0, 1)) if backward else forward
  return export.export(jax.jit(fn), platforms=[platform])(images, grid).mlir_module()


def _millions(n: int) -> str:
  return f"{n / 1e6:,.1f}M" if n else "0"


def table(platform: str) -> str:
  rows = ["| shape (BxCxHxW -> HoxWo) | auto picks | path | pass | gather ops (elements) "
          "| scatter ops (elements) | dot ops (multiply-adds) |", "|---|---|---|---|---|---|---|"]
  for name, shape in SHAPES.items():
    b, c, h, w, ho, wo = shape
    auto = sampling.choose_implementation(platform, "bilinear", "zeros", (b, h, w, c),
                                          (b, ho, wo, 2), jnp.float32, jnp.float32)
    for implementation in ("xla", "matmul"):
      for backward in (False, True):
        n = count_ops(lowered(implementation, shape, backward, platform))
        rows.append(
            f"| {name} {b}x{c}x{h}x{w} -> {ho}x{wo} | {auto} | {implementation} "
            f"| {'fwd+bwd' if backward else 'fwd'} | {n['gather']} ({_millions(n['gathered'])}) "
            f"| {n['scatter']} ({_millions(n['scattered'])}) | {n['dot']} ({_millions(n['macs'])}) |")
        print(rows[-1], flush=True)
  header = (f"`python -m experiments.benchmarks.hlo_counts --platform {platform}` on "
            f"{host.node() or 'unknown'} ({host.machine()}), {datetime.date.today()}, "
            f"jax {jax.__version__}; StableHLO lowered for {platform!r} with jax.export.")
  return "\n".join([header, "", *rows])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--platform", default="tpu", choices=["tpu", "cuda", "rocm"])
  args = parser.parse_args(argv)
  print("\n" + table(args.platform))


if __name__ == "__main__":
  main()
