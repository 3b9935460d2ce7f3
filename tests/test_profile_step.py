"""experiments.benchmarks.profile_step: the step's ops, named from the compiled HLO."""

import jax
import jax.numpy as jnp
from jax import lax

from experiments.benchmarks import profile_step


def test_describe_ops_names_shapes_kinds_and_origins():
  def loss(x, k):
    y = lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(jnp.tanh(y))
  x, k = jnp.ones((2, 9, 9, 3)), jnp.ones((3, 3, 3, 4))
  text = jax.jit(jax.grad(loss, 1)).lower(x, k).compile().as_text()
  described = profile_step.describe_ops(text)
  assert described, text[:2000]
  rows = list(described.values())
  # The kernel gradient [3, 3, 3, 4] is there, with its layout dropped and a kind.
  assert any(row.startswith("`f32[3,3,3,4]`") for row in rows), rows
  assert all(row.count("|") == 2 for row in rows)


def test_profile_step_writes_a_table(tmp_path):
  out = tmp_path / "profile.md"
  profile_step.main(["--batch", "4", "--steps", "1", "--top", "5", "--out", str(out)])
  lines = out.read_text().splitlines()
  rows = [line for line in lines if line.startswith("| ") and "ms / step" not in line]
  assert len(rows) == 5, lines
  assert all(float(row.split("|")[1]) >= 0 for row in rows)
  assert "batch 4, 1 profiled steps" in out.read_text()
