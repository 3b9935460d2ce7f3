"""Host-memory reuse for XLA's CPU buffers (glibc malloc settings).

On Linux with glibc, XLA's CPU runtime allocates every large buffer (step
outputs, activations, gradients) with ``malloc``, which serves requests above
a threshold with a fresh ``mmap`` and returns them to the kernel on ``free``.
A training step then re-faults every page of every large buffer on every
call: on the 2-core machines this project is measured on, the ST-CNN step
spends about a third of its time in the kernel's page-fault handler.

:func:`reuse_freed_host_memory` tells glibc to keep freed memory in the
process and reuse it (one malloc arena for all threads, no ``mmap`` for
large blocks, no trimming of the heap below 2 GiB of free space). It is a
process-wide setting, best made before JAX's CPU backend starts (before the
first computation): the backend's threads take their malloc arenas when they
start, so only threads started afterwards share the one arena. Made later
(e.g. in a notebook after a first computation) the other two parts still
apply to every arena: large blocks are no longer mapped and unmapped per
step, and freed memory is kept. ``python -m experiments.train`` and the
benchmarks call it first thing; or start Python with
``GLIBC_TUNABLES=glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647``.
The cost: the process keeps its peak heap instead of returning it.
``STN_JAX_REUSE_HOST_MEMORY=0`` turns the call into a no-op.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

# mallopt(3) parameter numbers (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_TRIM_THRESHOLD_BYTES = 2**31 - 1
_applied = False


def reuse_freed_host_memory() -> bool:
  """Makes glibc malloc keep and reuse freed memory; returns whether it was applied.

  Not applied (returns False) off Linux/glibc or when
  ``STN_JAX_REUSE_HOST_MEMORY=0``. It does not look at JAX's state (see the
  module docstring for what a call after the first computation still does).
  Calling it again after it was applied returns True and changes nothing.
  """
  global _applied
  if _applied:
    return True
  if os.environ.get("STN_JAX_REUSE_HOST_MEMORY", "1") == "0":
    return False
  if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  _applied = all(libc.mallopt(parameter, value) == 1 for parameter, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_BYTES)))
  return _applied


def is_applied() -> bool:
  """Whether :func:`reuse_freed_host_memory` has taken effect in this process."""
  return _applied
