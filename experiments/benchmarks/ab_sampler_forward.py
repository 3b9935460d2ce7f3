# A/B helper for docs/benchmarks/architecture_round.md: run from the root of each tree (main, and a worktree of ab639ff).
"""A/B: forward of stn_jax.sample (auto -> native kernel) on 1- and 3-channel shapes, this tree."""
import os, sys, time
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np, jax, jax.numpy as jnp
import stn_jax
from stn_jax import sampling
tree = sys.argv[1]
shapes = {"mnist": (256, 28, 28, 1), "rts": (256, 42, 42, 1), "cluttered": (128, 60, 60, 1), "svhn": (64, 64, 64, 3)}
rng = np.random.default_rng(0)
fns = {}
for name, (b, h, w, c) in shapes.items():
  img = jnp.asarray(rng.random((b, h, w, c), dtype=np.float32))
  grid = jnp.asarray(rng.uniform(-1.1, 1.1, (b, h, w, 2)).astype(np.float32))
  f = jax.jit(lambda i, g: sampling.sample(i, g))
  jax.block_until_ready(f(img, grid))
  fns[name] = (f, img, grid)
times = {n: [] for n in shapes}
for r in range(40):
  for n, (f, i, g) in fns.items():
    t = time.perf_counter(); jax.block_until_ready(f(i, g)); times[n].append(time.perf_counter() - t)
print(tree, " ".join(f"{n}={1e3*np.median(v):.2f}" for n, v in times.items()), flush=True)
