"""Sampler benchmark: stn_jax.sample against PyTorch grid_sample and JAX peers.

Bilinear sampling with zero padding of an affine grid, forward and
forward+backward (gradients to both the images and the grid), for the shapes
of the paper's experiments. Systems run in one process, interleaved, and each
figure is the median of repeated timings after warm-up, so that ratios are
taken under the same machine load.

  python -m experiments.benchmarks.sampler                 # all shapes
  python -m experiments.benchmarks.sampler --shapes mnist  # 256x1x28x28 only
  python -m experiments.benchmarks.sampler --out results.md

Peers that are not installed are skipped (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import os

# PyTorch's OpenMP threads otherwise spin after each call and steal the
# cores of the system timed next (measured: it doubles stn_jax's times).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime
import platform
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import stn_jax
from stn_jax import coordinates
from stn_jax import host_memory
from stn_jax import sampler_matmul
from stn_jax import sampling

# name: (batch, channels, in_h, in_w, out_h, out_w)
SHAPES = {
    "mnist": (256, 1, 28, 28, 28, 28),
    "rts": (256, 1, 42, 42, 42, 42),
    "cluttered": (128, 1, 60, 60, 60, 60),
    "svhn": (64, 3, 64, 64, 64, 64),
    "cub224": (16, 3, 224, 224, 224, 224),
    "cub448": (8, 3, 448, 448, 224, 224),
}


def make_inputs(shape, seed=0):
  b, c, h, w, ho, wo = shape
  rng = np.random.default_rng(seed)
  images = rng.uniform(0, 1, (b, h, w, c)).astype(np.float32)
  theta = np.tile(np.asarray([[1.0, 0, 0], [0, 1, 0]], np.float32), (b, 1, 1))
  theta = theta + rng.normal(0, 0.1, theta.shape).astype(np.float32)
  grid = np.asarray(stn_jax.affine_grid(theta, (ho, wo)))
  cotangent = rng.standard_normal((b, ho, wo, c)).astype(np.float32)
  return images, grid, cotangent


def memory_report(shape) -> str:
  """Recompilations and XLA's peak temporary memory of stn_jax's forward+backward."""
  images, grid, cotangent = (jnp.asarray(a) for a in make_inputs(shape))
  fwd_bwd = jax.jit(jax.grad(lambda i, g: (stn_jax_sampler(i, g) * cotangent).sum(), (0, 1)))
  for _ in range(3):
    jax.block_until_ready(fwd_bwd(images, grid))
  compiled = fwd_bwd.lower(images, grid).compile().memory_analysis()
  data = 4 * (2 * images.size + 2 * grid.size + 2 * cotangent.size)  # in + out + grads
  temp = getattr(compiled, "temp_size_in_bytes", 0) if compiled is not None else 0
  return (f"compilations after 3 calls: {fwd_bwd._cache_size()}; XLA temporary buffers "
          f"{temp / 2**20:.2f} MiB next to {data / 2**20:.2f} MiB of inputs, outputs and "
          f"gradients (peak / data = {(temp + data) / data:.2f})")


def jax_system(sample_fn):
  """Forward and forward+backward closures for a JAX sampler ``f(images, grid)``."""
  def build(images, grid, cotangent):
    images, grid, cotangent = map(jnp.asarray, (images, grid, cotangent))
    fwd = jax.jit(sample_fn)
    loss = lambda a, g: (sample_fn(a, g) * cotangent).sum()
    fwd_bwd = jax.jit(jax.grad(loss, (0, 1)))
    return (lambda: jax.block_until_ready(fwd(images, grid)),
            lambda: jax.block_until_ready(fwd_bwd(images, grid)))
  return build


def stn_jax_sampler(images, grid):
  """What users get by default (implementation='auto'): on CPU the compiled kernel where built."""
  return stn_jax.sample(images, grid, method="bilinear", padding_mode="zeros")


def stn_jax_matmul_sampler(images, grid):
  """The gather-free formulation (two batched contractions)."""
  return stn_jax.sample(images, grid, method="bilinear", padding_mode="zeros",
                        implementation="matmul")


def applies(system: str, shape) -> bool:
  """The matmul path is timed only where its intermediate is within the limit 'auto' uses on TPUs."""
  b, c, h, w, ho, wo = shape
  return system != "stn_jax_matmul" or (
      sampler_matmul.intermediate_bytes((b, h, w, c), (b, ho, wo, 2))
      <= sampling.MATMUL_MAX_INTERMEDIATE_BYTES)


def stn_jax_xla_sampler(images, grid):
  """The portable pure-JAX implementation (GPU/TPU, and CPU without a compiler)."""
  return stn_jax.sample(images, grid, method="bilinear", padding_mode="zeros",
                        implementation="xla")


def map_coordinates_sampler(images, grid):
  """jax.scipy.ndimage.map_coordinates, order 1, vmapped over batch and channels."""
  h, w = images.shape[1:3]
  px = coordinates.to_pixel(grid[..., 0], w, align_corners=False)
  py = coordinates.to_pixel(grid[..., 1], h, align_corners=False)
  def one(image, x, y):  # image [H, W, C]
    return jax.vmap(lambda ch: jax.scipy.ndimage.map_coordinates(ch, [y, x], order=1,
                                                                 mode="constant"),
                    in_axes=2, out_axes=-1)(image)
  return jax.vmap(one)(images, px, py)


def dm_pix_sampler(images, grid):
  import dm_pix
  h, w = images.shape[1:3]
  px = coordinates.to_pixel(grid[..., 0], w, align_corners=False)
  py = coordinates.to_pixel(grid[..., 1], h, align_corners=False)
  coords = jnp.stack([py, px], axis=0)   # [2, B, Ho, Wo] -> per image [2, Ho, Wo]
  def one(image, coord):
    return jax.vmap(lambda ch: dm_pix.flat_nd_linear_interpolate_constant(
        ch, coord, cval=0.0), in_axes=2, out_axes=-1)(image)
  return jax.vmap(one, in_axes=(0, 1))(images, coords)


def torch_system(images, grid, cotangent):
  import torch
  x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  g = torch.from_numpy(grid)
  ct = torch.from_numpy(cotangent).permute(0, 3, 1, 2).contiguous()
  f = torch.nn.functional.grid_sample

  def fwd():
    with torch.no_grad():
      return f(x, g, mode="bilinear", padding_mode="zeros", align_corners=False)

  def fwd_bwd():
    xr, gr = x.detach().requires_grad_(), g.detach().requires_grad_()
    out = f(xr, gr, mode="bilinear", padding_mode="zeros", align_corners=False)
    out.backward(ct)
    return xr.grad, gr.grad
  return fwd, fwd_bwd


def available_systems() -> dict[str, Callable]:
  systems = {"stn_jax": jax_system(stn_jax_sampler), "stn_jax_xla": jax_system(stn_jax_xla_sampler),
             "stn_jax_matmul": jax_system(stn_jax_matmul_sampler)}
  try:
    import torch  # noqa: F401
    systems["torch"] = torch_system
  except ImportError:
    pass
  systems["map_coordinates"] = jax_system(map_coordinates_sampler)
  try:
    import dm_pix  # noqa: F401
    systems["dm_pix"] = jax_system(dm_pix_sampler)
  except ImportError:
    pass
  return systems


def time_interleaved(calls: dict[str, Callable], repeats: int, warmup: int = 3):
  for fn in calls.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, fn in calls.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def environment_line() -> str:
  threads = ""
  try:
    import torch
    threads = f"torch {torch.__version__} with {torch.get_num_threads()} threads; "
  except ImportError:
    pass
  return (f"{datetime.date.today()} on {platform.node() or 'unknown'} "
          f"({os.cpu_count()} CPUs, {platform.processor() or platform.machine()}), "
          f"jax {jax.__version__} on {jax.devices()[0].device_kind}; {threads}"
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
          f"host memory reuse (stn_jax.host_memory) {'on' if host_memory.is_applied() else 'off'}")


def write_report(table: str, out: str | None) -> None:
  """Prints a benchmark's markdown report and, with ``out``, writes it there too."""
  print(table)
  if out:
    with open(out, "w") as f:
      f.write(table + "\n")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--out", default=None, help="also write the markdown table here")
  args = parser.parse_args(argv)
  host_memory.reuse_freed_host_memory()  # before the first computation

  systems = available_systems()
  rows = ["| shape (BxCxHxW -> HoxWo) | pass | " + " | ".join(f"{s} ms" for s in systems)
          + " | " + " | ".join(f"{s} / torch" for s in systems if s != "torch") + " |",
          "|---|---|" + "---|" * (2 * len(systems) - ("torch" in systems))]
  notes = []
  for name in args.shapes:
    shape = SHAPES[name]
    inputs = make_inputs(shape)
    built = {s: build(*inputs) for s, build in systems.items() if applies(s, shape)}
    for pass_index, pass_name in enumerate(["fwd", "fwd+bwd"]):
      ms = time_interleaved({s: fns[pass_index] for s, fns in built.items()}, args.repeats)
      b, c, h, w, ho, wo = shape
      ratios = [f"{ms[s] / ms['torch']:.2f}" if "torch" in ms and s in ms else "n/a"
                for s in systems if s != "torch"]
      rows.append(f"| {name} {b}x{c}x{h}x{w} -> {ho}x{wo} | {pass_name} | "
                  + " | ".join(f"{ms[s]:.2f}" if s in ms else "skipped" for s in systems)
                  + " | " + " | ".join(ratios) + " |")
      print(rows[-1], flush=True)
    notes.append(f"- {name}: {memory_report(shape)}")
  table = "\n".join([environment_line(), "", *rows, "", *notes])
  print()
  write_report(table, args.out)


if __name__ == "__main__":
  main()
