"""Runs test code in a subprocess with several forced CPU devices, under a watchdog."""

import os
import subprocess
import sys
import textwrap

import pytest


def run_with_devices(code: str, num_devices: int = 8, timeout: int = 300) -> None:
  """Runs ``code`` with ``num_devices`` CPU devices; it must print ``ok`` last.

  A run that has not finished after ``timeout`` seconds (a hang) is killed and
  fails the test.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")
  try:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                            capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired as error:
    stderr = (error.stderr or b"")[-3000:]
    pytest.fail(f"no result with {num_devices} devices after {timeout} s (hung?):\n"
                f"{stderr.decode(errors='replace') if isinstance(stderr, bytes) else stderr}")
  assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
