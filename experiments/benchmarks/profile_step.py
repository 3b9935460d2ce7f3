"""Where the ST-CNN training step's time goes on CPU: XLA's ops, by time per step.

  python -m experiments.benchmarks.profile_step [--config st_cnn_affine_rts] [--batch 256]
      [--steps 10] [--top 25] [--out docs/benchmarks/profile_step.md]

Runs the benchmark's step (:func:`experiments.benchmarks.train_step.jax_train_step`,
the loop's pmap-ed step) under ``jax.profiler.trace``, sums the duration of every
XLA op event over the CPU runtime's threads, and names each op by what the
compiled HLO says about it: its result shape, whether it runs in a YNNPACK fusion
(``__ynn_fusion``, one thread) or XLA's own code, and the JAX operation it came
from (``jvp(...)`` is the forward pass, ``transpose(jvp(...))`` the backward).
Times are summed over threads (an op split over two threads counts twice), so
shares compare ops with each other; the profiler's own overhead inflates all of
them a little.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import tempfile

import jax

from experiments.benchmarks.sampler import environment_line, write_report
from experiments.benchmarks.train_step import batch_and_config, jax_train_step
from stn_jax import host_memory
from stn_jax.configs import distorted_mnist

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT )?%(?P<name>[\w.\-]+) = (?P<shape>\([^)]*\)|\S+) (?P<op>[\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="(?P<op_name>[^"]*)"')


def describe_ops(hlo_text: str) -> dict[str, str]:
  """``{instruction name: 'shape, kind, JAX op'}`` for the entry computation's instructions."""
  roots, computation = {}, None   # fused computation -> its root instruction's op and window
  for line in hlo_text.splitlines():
    if line.startswith("%"):
      computation = line.split()[0][1:]
    match = _INSTRUCTION.match(line)
    if match and line.lstrip().startswith("ROOT") and computation:
      window = re.search(r"window=\{([^}]*)\}", line)
      roots[computation] = match["op"] + (f" ({window[1]})" if window else "")
  described = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    kind = "ynn (1 thread)" if "__ynn_fusion" in line else match["op"]
    op_name = _OP_NAME.search(line)
    calls = re.search(r"calls=%([\w.\-]+)", line)
    if op_name:
      where = op_name["op_name"].replace("jit(_fun)/", "")
    else:  # made by an XLA pass (e.g. a convolution's weight gradient): say what it computes
      where = "XLA-made: " + roots.get(calls[1] if calls else "", match["op"])
    shape = re.sub(r"\{[^}]*\}", "", match["shape"])   # drop layouts
    described[match["name"]] = f"`{shape}` | {kind} | {where}"
  return described


def op_times(trace_dir: str, steps: int) -> collections.Counter:
  """ms per step of each XLA op event in the newest trace under ``trace_dir``, summed over threads."""
  from jax.profiler import ProfileData
  path = max(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
             key=os.path.getmtime)
  times = collections.Counter()
  for plane in ProfileData.from_file(path).planes:
    if not plane.name.startswith("/host:CPU"):
      continue
    for line in plane.lines:
      if line.name == "python" or "PjRt" in line.name:
        continue
      for event in line.events:
        if "ThunkExecutor" not in event.name and "ThreadPool" not in event.name:
          times[event.name] += event.duration_ns / 1e6 / steps
  return times


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="st_cnn_affine_rts", choices=distorted_mnist.NAMES)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--top", type=int, default=25)
  parser.add_argument("--out", default=None, help="also write the markdown table here")
  args = parser.parse_args(argv)
  if args.batch < 1 or args.steps < 1:
    raise SystemExit("--batch and --steps must be positive")
  host_memory.reuse_freed_host_memory()  # before the first computation
  config, images, labels = batch_and_config(args.config, args.batch)
  run, compiled_text, count = jax_train_step(config, images, labels)
  for _ in range(3):
    run()
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(args.steps):
        run()
    times = op_times(trace_dir, args.steps)
  described = describe_ops(compiled_text())
  total = sum(times.values())
  rows = [f"| {ms:.2f} | {100 * ms / total:.1f} | `{name}` | {described.get(name, '| |')} |"
          for name, ms in times.most_common(args.top)]
  table = "\n".join([
      environment_line(), "",
      f"Training step of {args.config} ({count:,} parameters), batch {args.batch}, "
      f"{args.steps} profiled steps; all ops together: {total:.1f} ms per step summed over "
      "threads. A compiled kernel (`custom-call`) counts its wall time on the thread that "
      "calls it, which runs chunks itself and waits for those of the pool's other threads "
      "(not added again); ops XLA runs asynchronously in Eigen's pool (plain `convolution` "
      "ops outside YNNPACK fusions) would show only their launch. Top ops:", "",
      "| ms / step | % | op | result | runs in | from (JAX) |", "|---|---|---|---|---|---|",
      *rows])
  write_report(table, args.out)


if __name__ == "__main__":
  main()
