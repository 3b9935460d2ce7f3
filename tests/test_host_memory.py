"""stn_jax.host_memory: applied before and after the backend starts (no warning), opt-out."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc malloc settings")

SCRIPT = """
import warnings, jax, jax.numpy as jnp
from stn_jax import host_memory
if {compute_first}:
    jnp.ones(3).block_until_ready()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first = host_memory.reuse_freed_host_memory()
second = host_memory.reuse_freed_host_memory()
print(first, second, host_memory.is_applied(), len(caught), float(jnp.arange(4.0).sum()))
"""


def _run(compute_first: bool, **env) -> list[str]:
  out = subprocess.run([sys.executable, "-c", SCRIPT.format(compute_first=compute_first)],
                       capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", **env})
  return out.stdout.split()


def test_applied_before_the_backend_starts():
  assert _run(False) == ["True", "True", "True", "0", "6.0"]


def test_applied_without_a_warning_after_the_backend_started():
  # Before issue 12 this was refused with a warning (it read JAX's private backend state);
  # now it applies (the mmap and trim settings reach every arena) and says nothing.
  assert _run(True) == ["True", "True", "True", "0", "6.0"]


def test_environment_opt_out():
  assert _run(False, STN_JAX_REUSE_HOST_MEMORY="0") == ["False", "False", "False", "0", "6.0"]
