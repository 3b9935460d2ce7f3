"""Argument checks shared by the public functions.

Every check raises ``ValueError`` at trace time with a message that names the
argument, what it got and what was expected, so that mistakes surface in the
user's code rather than deep inside XLA.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np


def shape_str(shape: Sequence[Any]) -> str:
  return "[" + ", ".join(str(d) for d in shape) + "]"


def check_rank(name: str, x: Any, rank: int, expected: str) -> None:
  """Raises unless ``x`` has ``rank`` axes; ``expected`` reads like ``[B, H, W, C]``."""
  ndim = np.ndim(x)
  if ndim != rank:
    raise ValueError(
        f"{name} must have rank {rank} with shape {expected}; "
        f"got rank {ndim} with shape {shape_str(np.shape(x))}.")


def check_axis(name: str, x: Any, axis: int, size: int, expected: str) -> None:
  """Raises unless axis ``axis`` of ``x`` has ``size`` elements."""
  if np.shape(x)[axis] != size:
    raise ValueError(
        f"{name} must have shape {expected}; got {shape_str(np.shape(x))}.")


def check_same_batch(name_a: str, a: Any, name_b: str, b: Any) -> None:
  if np.shape(a)[0] != np.shape(b)[0]:
    raise ValueError(
        f"{name_a} and {name_b} must have the same batch size; got "
        f"{name_a} {shape_str(np.shape(a))} and {name_b} {shape_str(np.shape(b))}.")


def check_floating(name: str, x: Any) -> None:
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(
        f"{name} must have a floating-point dtype (float32, bfloat16, float16 "
        f"or float64); got {dtype}. Convert it first, e.g. x.astype(jnp.float32).")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(
        f"unknown {name} {value!r}; expected one of {', '.join(map(repr, choices))}.")


def check_hw(name: str, hw: Any) -> tuple[int, int]:
  """Returns ``hw`` as a pair of positive Python ints, or raises."""
  try:
    h, w = hw
    ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
             and v > 0 for v in (h, w))
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(
        f"{name} must be a pair of positive integers (height, width); got {hw!r}.")
  return int(h), int(w)
