"""A/B of the ST-CNN pmap train step (batch 256) for docs/benchmarks/architecture_round.md.

  PYTHONPATH=. python experiments/benchmarks/ab_train_step.py HLO_OUT [REPEATS]

Run from the root of each tree (main, and a worktree of ab639ff). Writes the
compiled step's HLO to HLO_OUT and prints its op counts and the median step
time. NOGUARD=all|params|capture turns (parts of) main's finiteness
guards off (before 2026-12-07 a 'sum' variant tried the single parameters
flag that main now has).
"""
import os, sys, re, collections, time
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import jax, numpy as np
from flax import nnx
from stn_jax import distortions, host_memory
old = not os.path.exists("stn_jax/steps.py")  # ab639ff's layout
if not old:
  from stn_jax import optim, steps, tasks; from stn_jax.configs import distorted_mnist
else:
  from experiments import tasks; from experiments.configs import distorted_mnist
  from stn_jax import trainer as optim, training as steps; old=True
host_memory.reuse_freed_host_memory()
if os.environ.get("NOGUARD"):
  from stn_jax import guards
  if os.environ["NOGUARD"] in ("all", "capture"):
    guards.capture_call = lambda m, im: (m(im), {}); guards.transform_flags = lambda c: {}
  if os.environ["NOGUARD"] in ("all", "params"):
    guards.parameters_flag = lambda p: {}
batch=256
config = distorted_mnist.get_config("st_cnn_affine_rts"); config.batch_size = batch; config.data = "synthetic"
rng = np.random.default_rng(0)
digits = rng.integers(0, 256, (batch, 28, 28, 1), dtype=np.uint8)
images = np.asarray(distortions.distort(jax.random.key(0), digits, config.variant))
labels = rng.integers(0, 10, batch).astype(np.int32)
task = tasks.build_task(config)
_, optimizer = optim.make_schedule_and_optimizer(config)
graphdef, state = steps.create_train_state(task.make_model(nnx.Rngs(0)), optimizer)
step = jax.jit(steps.make_train_step(graphdef, optimizer, terms=task.terms))
key = jax.random.key(0)
txt = step.lower(state, images, labels, key).compile().as_text()
open(sys.argv[1], "w").write(txt)
ops = collections.Counter(re.findall(r"= \w+\[[^\]]*\]\S* (\w[\w-]*)\(", txt))
print({k: ops[k] for k in ["convolution","custom-call","fusion","dot","reduce-window","select-and-scatter","copy","transpose","while","sort","scatter","gather"]})
print(re.findall(r'custom_call_target="([^"]+)"', txt))
pstep = steps.pmap_train_step(graphdef, optimizer, terms=task.terms)
box = {"s": steps.replicate(state)}
x, y = steps.shard_batch((images, labels))
def call():
  box["s"], m = pstep(box["s"], x, y, key); jax.block_until_ready(m)
for _ in range(3): call()
ts = []
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 25):
  t = time.perf_counter(); call(); ts.append(time.perf_counter() - t)
print("old" if old else ("new-no-" + os.environ.get("NOGUARD", "ne")), "median ms %.1f  p25 %.1f" % (1e3*np.median(ts), 1e3*np.percentile(ts, 25)), flush=True)
