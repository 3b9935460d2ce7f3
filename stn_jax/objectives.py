"""What a task optimises and what it reports: per-example loss terms and evaluation metrics.

Training reads *terms*: ``terms(outputs, labels) -> (loss [B], correct [B])``,
per example; the training step averages them (``loss``, ``accuracy``).

Evaluation reads an :class:`Evaluation`: per-example values
``per_example(outputs, labels) -> {name: [B]}`` are summed over the real
examples of the whole test set (padding masked out, all devices added), and
``summarise(sums, count)`` turns the sums into named results, one of which,
``headline``, is the number a run reports (``results.json`` holds it as
``test_<headline>``). A task with other metrics (a triplet loss and an IoU
accuracy for co-localisation, per-sequence accuracy) defines its own
:class:`Evaluation`; the loop needs no change.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

Terms = Callable[[Any, Any], tuple[jax.Array, jax.Array]]


def classification_terms(logits: jax.Array, labels: jax.Array):
  """Softmax cross entropy ``[B]`` and correctness ``[B]`` (float) for integer labels ``[B]``."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return loss, (jnp.argmax(logits, -1) == labels).astype(jnp.float32)


def sequence_terms(outputs, labels):
  """Multi-digit sequences (Goodfellow et al. 2014, the paper's SVHN set-up).

  ``outputs = (length_logits [B, L + 2], digit_logits [B, L, 11])`` and
  ``labels = (lengths [B], digits [B, L])`` with 10 meaning "no digit". The
  loss is the length cross entropy plus the sum of the per-position digit
  cross entropies; an example is correct when its length and every position
  are right (the paper's sequence error is one minus this).
  """
  length_logits, digit_logits = outputs
  lengths, digits = labels
  loss = (optax.softmax_cross_entropy_with_integer_labels(length_logits, lengths)
          + optax.softmax_cross_entropy_with_integer_labels(digit_logits, digits).sum(-1))
  correct = ((jnp.argmax(length_logits, -1) == lengths)
             & jnp.all(jnp.argmax(digit_logits, -1) == digits, -1))
  return loss, correct.astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """How a task is evaluated.

  Attributes:
    per_example: ``(outputs, labels) -> {name: [B]}``, values summed over the test set.
    summarise: ``(sums: {name: float}, count: float) -> {name: float}``: the named results.
    headline: the name (a key of ``summarise``'s result) of the number a run reports.
    describe: optional ``(outputs, labels) -> [str] * B``, a short caption per example
      (e.g. ``'true 3, predicted 5'``) for figures.
  """
  per_example: Callable[[Any, Any], dict[str, jax.Array]]
  summarise: Callable[[dict[str, float], float], dict[str, float]]
  headline: str
  describe: Optional[Callable[[Any, Any], list[str]]] = None


def error_rate(terms: Terms, describe=None) -> Evaluation:
  """Mean ``loss``, ``accuracy`` and ``error`` (%, the headline) from ``terms``."""

  def per_example(outputs, labels):
    loss, correct = terms(outputs, labels)
    return {"loss": loss, "correct": correct}

  def summarise(sums, count):
    accuracy = sums["correct"] / count
    return {"loss": sums["loss"] / count, "accuracy": accuracy, "error": 100.0 * (1.0 - accuracy)}

  return Evaluation(per_example, summarise, "error", describe)


def describe_classes(logits, labels) -> list[str]:
  """``'true 3, predicted 5'`` per example."""
  predicted = np.argmax(np.asarray(logits), -1)
  return [f"true {t}, predicted {p}" for t, p in zip(np.asarray(labels).tolist(), predicted.tolist())]


def describe_sequences(outputs, labels) -> list[str]:
  """``'true 417, predicted 41'`` per example (digits up to each sequence's length)."""
  length_logits, digit_logits = (np.asarray(o) for o in outputs)
  lengths, digits = (np.asarray(y) for y in labels)
  guessed_lengths = length_logits.argmax(-1)
  guessed = digit_logits.argmax(-1)

  def text(row, n):
    return "".join(str(d) for d in row[:n]) or "-"

  return [f"true {text(digits[i], lengths[i])}, predicted {text(guessed[i], guessed_lengths[i])}"
          for i in range(len(lengths))]


CLASSIFICATION = error_rate(classification_terms, describe_classes)
SEQUENCES = error_rate(sequence_terms, describe_sequences)
