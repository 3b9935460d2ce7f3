"""Images/second of one ST-CNN training step: stn_jax against the same model in PyTorch.

  python -m experiments.benchmarks.train_step [--config st_cnn_affine_rts] [--batches 256]
  python -m experiments.benchmarks.train_step --batches 32,64,128,256,512   # batch scaling

Both sides run the same network (Table 1's ST-CNN from
stn_jax/configs/distorted_mnist.py: CNN localisation net conv(20, 5x5)-
maxpool-conv(20, 5x5)-FC(20)-regression to the transform, affine grid,
bilinear sampling with zero padding, average-pool by 2 for RTS, then the
CNN conv(32, 9x9)-maxpool-conv(32, 7x7)-maxpool-linear), the same batch,
and SGD with momentum, in one process with their steps interleaved
(:func:`experiments.benchmarks.sampler.time_interleaved`); the report is the
median step time and images per second of each and their ratio. stn_jax's
step is the jitted step of :mod:`stn_jax.steps`, as the loop runs it.
Set OMP_WAIT_POLICY=PASSIVE (done here when unset) so that PyTorch's OpenMP
threads do not spin between its steps and steal stn_jax's cores.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from experiments.benchmarks.sampler import (environment_line, time_interleaved,  # noqa: E402
                                            write_report)
from stn_jax.configs import distorted_mnist  # noqa: E402
from stn_jax import distortions, host_memory, optim, steps, tasks  # noqa: E402


def torch_st_cnn(in_hw, post_pool: int, transform: str):
  """The ST-CNN of :class:`stn_jax.models.DistortedMnistModel` in PyTorch (NCHW), affine only."""
  import torch
  from torch import nn
  if transform != "affine":
    raise SystemExit("the PyTorch peer implements the affine ST-CNN only")
  h, w = in_hw

  def valid(n, k, pool):
    n = n - k + 1
    return n // 2 if pool else n

  lh, lw = valid(valid(h, 5, True), 5, False), valid(valid(w, 5, True), 5, False)
  ch, cw = h // post_pool, w // post_pool

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      self.loc = nn.Sequential(nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(20, 20, 5), nn.ReLU(), nn.Flatten(),
                               nn.Linear(20 * lh * lw, 20), nn.ReLU())
      self.regression = nn.Linear(20, 6)
      nn.init.zeros_(self.regression.weight)
      with torch.no_grad():
        self.regression.bias.copy_(torch.tensor([1.0, 0, 0, 0, 1, 0]))
      self.cnn = nn.Sequential(nn.Conv2d(1, 32, 9, padding="same"), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(32, 32, 7, padding="same"), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Flatten(), nn.Linear(32 * (ch // 4) * (cw // 4), 10))

    def forward(self, x):
      theta = self.regression(self.loc(x)).view(-1, 2, 3)
      grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
      x = nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                                    align_corners=False)
      if post_pool > 1:
        x = nn.functional.avg_pool2d(x, post_pool)
      return self.cnn(x)

  return Net()


def batch_and_config(config_name: str, batch: int):
  """``(config, images [B, H, W, 1], labels [B])``: a distorted random batch for the benchmark."""
  config = distorted_mnist.get_config(config_name)
  config.batch_size = batch
  rng = np.random.default_rng(0)
  digits = rng.integers(0, 256, (batch, 28, 28, 1), dtype=np.uint8)
  images = np.asarray(distortions.distort(jax.random.key(0), digits, config.variant))
  labels = rng.integers(0, 10, batch).astype(np.int32)
  return config, images, labels


def jax_train_step(config, images, labels):
  """``(run, compiled_text, parameter count)``: the loop's pmap-ed step on this batch.

  ``run()`` takes one step (state donated and kept) and waits for it;
  ``compiled_text()`` is the optimised HLO of the step.
  """
  config = config.copy_and_resolve_references()
  config.data = "synthetic"
  task = tasks.build_task(config)
  _, optimizer = optim.make_schedule_and_optimizer(config)
  graphdef, state = steps.create_train_state(task.make_model(nnx.Rngs(0)), optimizer)
  step = steps.pmap_train_step(graphdef, optimizer, terms=task.terms)
  box = {"state": steps.replicate(state)}
  x, y = steps.shard_batch((images, labels))
  key = jax.random.key(0)

  def run():
    box["state"], metrics = step(box["state"], x, y, key)
    jax.block_until_ready(metrics)

  def compiled_text():
    return step.lower(box["state"], x, y, key).compile().as_text()

  return run, compiled_text, sum(p.size for p in jax.tree.leaves(state.params))


def measure(config_name: str, batch: int, repeats: int) -> tuple[dict[str, float], int]:
  """``({'stn_jax': ms, 'torch': ms}, parameter count)``: median step times at ``batch``."""
  import torch

  config, images, labels = batch_and_config(config_name, batch)
  in_hw = distortions.OUTPUT_HW[config.variant]
  # stn_jax: the trainer's step (pmap over the one local CPU device, state donated).
  jax_step, _, count_jax = jax_train_step(config, images, labels)

  net = torch_st_cnn(in_hw, config.post_pool, config.transform)
  opt = torch.optim.SGD(net.parameters(), lr=config.optimizer.learning_rate,
                        momentum=config.optimizer.momentum)
  tx = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  ty = torch.from_numpy(labels).long()

  def torch_step():
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(net(tx), ty)
    loss.backward()
    opt.step()

  count_torch = sum(p.numel() for p in net.parameters())
  if count_jax != count_torch:
    raise SystemExit(f"models differ: {count_jax} parameters in stn_jax, {count_torch} in torch")
  return time_interleaved({"stn_jax": jax_step, "torch": torch_step}, repeats), count_jax


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="st_cnn_affine_rts", choices=distorted_mnist.NAMES)
  parser.add_argument("--batches", default="256",
                      help="comma-separated batch sizes, e.g. 32,64,128,256,512 for a scaling table")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--out", default=None, help="also write the markdown table here")
  args = parser.parse_args(argv)
  host_memory.reuse_freed_host_memory()  # before the first computation
  batches = [int(b) for b in args.batches.split(",")]
  if any(b < 1 for b in batches):
    raise SystemExit(f"--batches must be positive integers; got {args.batches!r}")
  rows = []
  for batch in batches:
    ms, count = measure(args.config, batch, args.repeats)
    for name in ("stn_jax", "torch"):
      rows.append(f"| {batch} | {name} | {ms[name]:.1f} | {1e3 * batch / ms[name]:.0f} | "
                  f"{ms[name] / ms['torch']:.2f} |")
    print(rows[-2], rows[-1], sep="\n", flush=True)
  table = "\n".join([environment_line(), "",
                     f"Training step of {args.config} ({count:,} parameters), SGD momentum, "
                     f"medians of {args.repeats} interleaved steps per batch size:", "",
                     "| batch | system | ms / step | images / s | time / torch |",
                     "|---|---|---|---|---|"] + rows)
  write_report(table, args.out)


if __name__ == "__main__":
  main()
