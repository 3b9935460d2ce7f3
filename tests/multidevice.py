"""Runs test code in a subprocess with several forced CPU devices."""

import os
import subprocess
import sys
import textwrap


def run_with_devices(code: str, num_devices: int = 8, timeout: int = 300) -> None:
  """Runs ``code`` with ``num_devices`` CPU devices; it must print ``ok`` last."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")
  result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
