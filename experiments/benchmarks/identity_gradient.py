"""The gradient every spatial transformer gets first: at the identity transform.

  python -m experiments.benchmarks.identity_gradient [--batch 64] [--seed 0]

Builds the network of PyTorch's STN tutorial (localisation: conv 1->8 7x7, max-pool 2,
ReLU, conv 8->10 5x5, max-pool 2, ReLU, FC 90->32, ReLU, FC 32->6 with zero weights and
the identity bias; classifier: conv 1->10 5x5, conv 10->20 5x5, FC 320->50, FC 50->10),
in PyTorch with its default initialisation, copies the weights into a JAX version that
samples with ``stn_jax`` (channels-last), and compares, in float64 on MNIST test digits
(or random images when MNIST is not found), the gradient of the mean NLL loss with
respect to the bias of the last localisation layer (the 6 affine parameters, where
every example's transform starts at the identity) three ways: ``jax.grad`` through
stn_jax, the central finite difference of stn_jax's loss, and PyTorch's autograd.
Needs ``torch`` (``pip install -e '.[bench]'``). Not part of the test suite; the
properties are tested in tests/test_sampling.py and tests/test_native.py.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

import stn_jax  # noqa: E402  (after enabling float64)


def torch_network(seed: int):
  import torch
  from torch import nn
  torch.manual_seed(seed)
  net = nn.ModuleDict({
      "loc1": nn.Conv2d(1, 8, 7), "loc2": nn.Conv2d(8, 10, 5),
      "fc1": nn.Linear(90, 32), "fc2": nn.Linear(32, 6),
      "conv1": nn.Conv2d(1, 10, 5), "conv2": nn.Conv2d(10, 20, 5),
      "cls1": nn.Linear(320, 50), "cls2": nn.Linear(50, 10)}).double()
  with torch.no_grad():
    net["fc2"].weight.zero_()
    net["fc2"].bias.copy_(torch.tensor([1.0, 0, 0, 0, 1, 0], dtype=torch.float64))
  return net


def torch_loss(net, images: np.ndarray, labels: np.ndarray):
  """Mean NLL of the tutorial's forward pass (eval mode: no dropout); images [B, 1, 28, 28]."""
  import torch
  import torch.nn.functional as F
  x = torch.from_numpy(images)
  h = F.relu(F.max_pool2d(net["loc1"](x), 2))
  h = F.relu(F.max_pool2d(net["loc2"](h), 2))
  theta = net["fc2"](F.relu(net["fc1"](h.flatten(1)))).view(-1, 2, 3)
  grid = F.affine_grid(theta, list(x.shape), align_corners=False)
  x = F.grid_sample(x, grid, align_corners=False)
  x = F.relu(F.max_pool2d(net["conv1"](x), 2))
  x = F.relu(F.max_pool2d(net["conv2"](x), 2))
  x = net["cls2"](F.relu(net["cls1"](x.flatten(1))))
  return F.nll_loss(F.log_softmax(x, dim=1), torch.from_numpy(labels))


def jax_weights(net) -> dict:
  """PyTorch weights as JAX arrays: convolutions HWIO, linear layers [in, out]."""
  out = {}
  for name, layer in net.items():
    w = layer.weight.detach().numpy()
    out[name] = (jnp.asarray(w.transpose(2, 3, 1, 0) if w.ndim == 4 else w.T),
                 jnp.asarray(layer.bias.detach().numpy()))
  return out


def jax_loss(head_bias, weights: dict, images, labels):
  """The same network on channels-last ``images [B, 28, 28, 1]``, as a function of the head's bias."""
  def conv(x, name):
    w, b = weights[name]
    return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
  def pool(x):
    b, h, w, c = x.shape   # 2x2, stride 2, odd edges dropped (as PyTorch's floor mode).
    x = x[:, :h // 2 * 2, :w // 2 * 2]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
  def dense(x, name, bias=None):
    w, b = weights[name]
    return x @ w + (b if bias is None else bias)
  def flat(x):  # PyTorch flattens channels-first.
    return x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)
  h = jax.nn.relu(pool(conv(images, "loc1")))
  h = jax.nn.relu(pool(conv(h, "loc2")))
  theta = dense(jax.nn.relu(dense(flat(h), "fc1")), "fc2", head_bias).reshape(-1, 2, 3)
  x = stn_jax.sample(images, stn_jax.affine_grid(theta, (28, 28)))
  x = jax.nn.relu(pool(conv(x, "conv1")))
  x = jax.nn.relu(pool(conv(x, "conv2")))
  logits = dense(jax.nn.relu(dense(flat(x), "cls1")), "cls2")
  log_p = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(log_p, labels[:, None], axis=1).mean()


def load_digits(batch: int, seed: int):
  try:
    from stn_jax import datasets, tasks
    images, labels = datasets.load_mnist("test", data_dir=tasks.default_data_dir(None),
                                         download=False)
    source = "MNIST test digits"
  except Exception:  # noqa: BLE001 - any failure: random images say the same thing.
    rng = np.random.default_rng(seed)
    images, labels = rng.integers(0, 256, (batch, 28, 28, 1)), rng.integers(0, 10, batch)
    source = "random images (MNIST not found)"
  x = (np.asarray(images[:batch], np.float64) / 255.0).reshape(batch, 28, 28, 1)
  return x, np.asarray(labels[:batch], np.int64), source


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--steps", default="1e-5,1e-6,1e-7",
                      help="finite-difference steps (the table uses the last); the central "
                           "difference across the sampler's kinks converges as O(step)")
  parser.add_argument("--noise", type=float, default=0.0,
                      help="uniform noise added to the digits; > 0 breaks the exact ties of "
                           "the max-pools over blank background, whose own one-sided "
                           "derivatives otherwise differ from the central difference too")
  args = parser.parse_args(argv)
  import torch
  net = torch_network(args.seed)
  x, y, source = load_digits(args.batch, args.seed)
  if args.noise:
    x = x + args.noise * np.random.default_rng(args.seed + 1).uniform(size=x.shape)
    source += f" + uniform noise of {args.noise:g}"
  weights = jax_weights(net)
  bias = weights["fc2"][1]
  loss = lambda b: jax_loss(b, weights, jnp.asarray(x), jnp.asarray(y))
  ours = np.asarray(jax.grad(loss)(bias))
  ours_jit = np.asarray(jax.jit(jax.grad(loss))(bias))
  eye = np.eye(6)
  steps = [float(h) for h in args.steps.split(",")]
  def central_difference(h):
    return np.array([(loss(bias + h * e) - loss(bias - h * e)) / (2 * h) for e in eye])
  def one_sided(h, sign):
    return np.array([sign * (loss(bias + sign * h * e) - loss(bias)) / h for e in eye])
  differences = {h: central_difference(h) for h in steps}
  central = differences[steps[-1]]
  torch_loss(net, x.transpose(0, 3, 1, 2).copy(), y).backward()
  theirs = net["fc2"].bias.grad.numpy()
  rel = lambda a, ref: np.linalg.norm(a - ref) / np.linalg.norm(ref)
  step = steps[-1]
  print(f"Gradient of the mean NLL w.r.t. the localisation head's bias at the identity "
        f"({args.batch} {source}, float64):")
  print(f"{'param':>6} {'stn_jax grad':>14} {f'central FD {step:g}':>18} "
        f"{'right FD':>12} {'left FD':>12} {'PyTorch grad':>14}")
  right, left = one_sided(step, 1.0), one_sided(step, -1.0)
  for i in range(6):
    print(f"{i:>6} {ours[i]:14.8f} {central[i]:18.8f} {right[i]:12.8f} {left[i]:12.8f} "
          f"{theirs[i]:14.8f}")
  for h in steps:
    print(f"relative distance to the central difference with step {h:g}: "
          f"stn_jax {rel(ours, differences[h]):.2e}, PyTorch {rel(theirs, differences[h]):.2e}")
  print(f"stn_jax eager vs jit: {rel(ours_jit, ours):.2e}")

if __name__ == "__main__":
  main()
