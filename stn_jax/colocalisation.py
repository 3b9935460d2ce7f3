"""Co-localisation with a spatial transformer (the paper's appendix A.2).

No labels and no boxes are used in training: the images of a pair show a
digit of the same class somewhere on an 84x84 canvas (with or without
clutter), one attention transformer (scale + translation) crops each image,
and a fixed encoder ``e`` embeds the crops. The triplet hinge loss

  ``max(0, |e(crop(I_n)) - e(crop(I_m))|^2 - |e(crop(I_n)) - e(random crop of I_n)|^2 + margin)``

pulls the crops of the two images together and away from a crop at a random
place, so the transformer learns to find the common object. The paper's
metric is the percentage of digits localised: the predicted box overlaps the
true 28x28 box with IoU > 0.5 (per class).

Pieces, bottom up: boxes and IoU, the triplet hinge loss, the data generator
(pure in ``(seed, step)``, channels-last), the encoder (a small MNIST CNN,
pretrained on plain digits and then frozen), the NNX model and the loss terms
for :mod:`stn_jax.steps`.

Our choices where the stored copies of the paper are silent (say so when
quoting numbers): the encoder is a 2-conv CNN's 64-d penultimate layer,
pretrained for :data:`ENCODER_STEPS` steps of MNIST classification on the
training digits; the transformer's initial scale is 28/84 (a crop the size of
a digit, centred); the random crop has the predicted scale (no gradient) and
a uniform position inside the canvas; the predicted box is kept inside the
canvas (:func:`box_inside_canvas`: unbounded, the loss is minimised by
zooming out); the paper's localisation net (8 9x9
filters with stride 4, FC 8, FC 8, FC 3) becomes 4x average-pooling, 8 9x9
filters, FC 8, FC 8, FC 3. Pairs are consecutive examples of a batch
(``2k`` and ``2k + 1``).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from stn_jax import _validation as v
from stn_jax import distortions, modules, objectives, warping

CANVAS_HW = (84, 84)
CROP_HW = distortions.DIGIT_HW
MARGIN = 1.0
IOU_THRESHOLD = 0.5
ENCODER_STEPS = 500
EMBEDDING_DIM = 64


# --- Boxes ----------------------------------------------------------------------------------


def check_boxes(name: str, boxes) -> None:
  """Raises unless ``boxes`` is ``[..., 4]`` floating ``(x0, y0, x1, y1)``."""
  if np.ndim(boxes) < 1 or np.shape(boxes)[-1] != 4:
    raise ValueError(f"{name} must have shape [..., 4] (x0, y0, x1, y1); "
                     f"got {v.shape_str(np.shape(boxes))}.")
  v.check_floating(name, boxes)


def box_from_attention(params: jax.Array, hw: Sequence[int] = CANVAS_HW) -> jax.Array:
  """The input box an attention transform crops, in pixels: ``[B, 3] -> [B, 4]``.

  ``params = (s, tx, ty)`` maps the output's normalised ``[-1, 1]^2`` to
  ``[tx - |s|, tx + |s|] x [ty - |s|, ty + |s|]`` of the input
  (``align_corners=False``: -1 and +1 are the outer edges), returned as
  ``(x0, y0, x1, y1)`` in pixel-edge coordinates (pixel ``j`` spans
  ``[j, j + 1]``) of an ``hw`` image. Differentiable.
  """
  v.check_rank("params", params, 2, "[B, 3] (s, tx, ty)")
  v.check_axis("params", params, 1, 3, "[B, 3] (s, tx, ty)")
  h, w = v.check_hw("hw", hw)
  params = jnp.asarray(params)
  s, tx, ty = jnp.abs(params[:, 0]), params[:, 1], params[:, 2]
  to_x = lambda x: (x + 1) * (w / 2)  # noqa: E731
  to_y = lambda y: (y + 1) * (h / 2)  # noqa: E731
  return jnp.stack([to_x(tx - s), to_y(ty - s), to_x(tx + s), to_y(ty + s)], -1)


def iou(a: jax.Array, b: jax.Array) -> jax.Array:
  """Intersection over union of boxes ``[..., 4]`` ``(x0, y0, x1, y1)`` (broadcasting).

  Empty or inverted boxes have area 0; the IoU of two empty boxes is 0.
  """
  check_boxes("a", a)
  check_boxes("b", b)
  a, b = jnp.asarray(a), jnp.asarray(b)
  area = lambda x: (jnp.maximum(x[..., 2] - x[..., 0], 0)  # noqa: E731
                    * jnp.maximum(x[..., 3] - x[..., 1], 0))
  inter_w = jnp.maximum(jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]), 0)
  inter_h = jnp.maximum(jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]), 0)
  inter = inter_w * inter_h
  union = area(a) + area(b) - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


# --- The triplet hinge loss ------------------------------------------------------------------


def triplet_hinge(anchor: jax.Array, positive: jax.Array, negative: jax.Array, *,
                  margin: float = MARGIN) -> jax.Array:
  """``max(0, |anchor - positive|^2 - |anchor - negative|^2 + margin)`` per example.

  Args:
    anchor, positive, negative: ``[B, F]`` embeddings.

  Returns:
    ``[B]`` losses, differentiable with respect to all three.
  """
  for name, x in (("anchor", anchor), ("positive", positive), ("negative", negative)):
    v.check_rank(name, x, 2, "[B, F]")
  if not np.shape(anchor) == np.shape(positive) == np.shape(negative):
    raise ValueError("anchor, positive and negative must have one shape [B, F]; got "
                     f"{v.shape_str(np.shape(anchor))}, {v.shape_str(np.shape(positive))} "
                     f"and {v.shape_str(np.shape(negative))}.")
  near = jnp.sum((anchor - positive) ** 2, -1)
  far = jnp.sum((anchor - negative) ** 2, -1)
  return jnp.maximum(0.0, near - far + margin)


def pair_partners(x: jax.Array) -> jax.Array:
  """Swaps examples ``2k`` and ``2k + 1`` of a batch ``[B, ...]`` (``B`` even)."""
  b = np.shape(x)[0]
  if b % 2:
    raise ValueError(f"the batch must hold pairs (an even number of examples); got {b}.")
  x = jnp.asarray(x)
  return x.reshape(b // 2, 2, *x.shape[1:])[:, ::-1].reshape(x.shape)


# --- Data -----------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("canvas_hw", "num_clutter"))
def make_canvases(key: jax.Array, digits: jax.Array, *, canvas_hw: Sequence[int] = CANVAS_HW,
                  num_clutter: int = 0, spread: float = 1.0):
  """Digits at random places on canvases, optionally cluttered.

  Args:
    key: PRNG key; the same key gives the same canvases.
    digits: ``[B, 28, 28, 1]`` uint8 or float digits.
    canvas_hw: canvas size (the paper: 84x84).
    num_clutter: number of random 6x6 crops of other digits of the batch
      added to each canvas (the paper's cluttered variant: 16).
    spread: in ``[0, 1]``, the fraction of the possible offsets from the
      centre that a digit may take: 1 (the paper) places it uniformly anywhere
      on the canvas, 0 at the centre (for a curriculum, :func:`curriculum_spread`).

  Returns:
    ``(images [B, *canvas_hw, 1] float32 in [0, 1], boxes [B, 4])``: each
    digit's 28x28 box ``(x0, y0, x1, y1)`` in pixel-edge coordinates.
  """
  v.check_rank("digits", digits, 4, "[B, 28, 28, 1]")
  if tuple(digits.shape[1:]) != (*distortions.DIGIT_HW, 1):
    raise ValueError(f"digits must have shape [B, 28, 28, 1]; got {v.shape_str(digits.shape)}.")
  k_place, k_clutter = jax.random.split(key)
  digits = distortions.to_float(digits)
  ch, cw = canvas_hw
  free = jnp.asarray([cw - CROP_HW[1], ch - CROP_HW[0]], jnp.float32)  # largest top-left
  half_range = jnp.clip(jnp.asarray(spread, jnp.float32), 0.0, 1.0) * free / 2
  low = jnp.round(free / 2 - half_range).astype(jnp.int32)
  high = jnp.round(free / 2 + half_range).astype(jnp.int32)
  top_left = jax.random.randint(k_place, (digits.shape[0], 2), low, high + 1)
  canvas = jax.vmap(lambda d, xy: jax.lax.dynamic_update_slice(
      jnp.zeros((ch, cw, 1), d.dtype), d, (xy[1], xy[0], 0)))(digits, top_left)
  if num_clutter:
    canvas = distortions.clutter(k_clutter, digits, canvas, num_clutter)
  top_left = top_left.astype(jnp.float32)
  boxes = jnp.concatenate([top_left, top_left + jnp.asarray(CROP_HW[::-1], jnp.float32)], -1)
  return jnp.clip(canvas, 0.0, 1.0), boxes


def curriculum_spread(step: int, *, steps: int, start: float) -> float:
  """The placement spread (:func:`make_canvases`) at ``step`` of a curriculum.

  Grows linearly from ``start`` at step 0 to 1 at ``steps``, then stays 1;
  ``steps = 0`` means no curriculum (1 from the start).
  """
  if steps < 0 or not 0 <= start <= 1:
    raise ValueError(f"curriculum steps must be >= 0 and start in [0, 1]; got {steps}, {start}.")
  if steps == 0:
    return 1.0
  return float(min(1.0, start + (1.0 - start) * step / steps))


def class_index(labels: np.ndarray) -> list[np.ndarray]:
  """The example indices of each class 0..9."""
  labels = np.asarray(labels)
  return [np.flatnonzero(labels == c) for c in range(10)]


def pair_batch(images: np.ndarray, by_class: Sequence[np.ndarray], *, batch: int, seed: int,
               step: int, num_clutter: int = 0, digit_class: int = -1,
               canvas_hw: Sequence[int] = CANVAS_HW, shard: slice = slice(None),
               spread: float = 1.0):
  """One global batch of same-class pairs, a pure function of ``(seed, step)``.

  Examples ``2k`` and ``2k + 1`` are two different digits of one class
  (``digit_class``, or a uniformly drawn class per pair when it is -1). The
  whole global batch is drawn, then ``shard`` of it returned, so the data do
  not depend on the number of processes.

  Returns:
    ``(images [b, *canvas_hw, 1], {"boxes": [b, 4], "classes": [b]})``.
  """
  if batch % 2 or batch < 2:
    raise ValueError(f"batch must be a positive even number (pairs); got {batch}.")
  if not -1 <= digit_class <= 9:
    raise ValueError(f"digit_class must be -1 (all classes) or 0..9; got {digit_class}.")
  rng = np.random.default_rng([seed, step])
  pairs = batch // 2
  classes = (np.full(pairs, digit_class) if digit_class >= 0
             else rng.integers(0, 10, pairs))
  index = np.stack([rng.choice(by_class[c], 2, replace=False) for c in classes]).reshape(-1)
  key = jax.random.fold_in(jax.random.key(seed), step)
  canvases, boxes = make_canvases(key, images[index], canvas_hw=tuple(canvas_hw),
                                  num_clutter=num_clutter, spread=spread)
  labels = {"boxes": np.asarray(boxes)[shard], "classes": np.repeat(classes, 2)[shard]}
  return np.asarray(canvases)[shard], labels


# --- The encoder ----------------------------------------------------------------------------


def init_encoder(key: jax.Array, *, features: Sequence[int] = (16, 32),
                 embedding_dim: int = EMBEDDING_DIM, num_classes: int = 10) -> dict:
  """Weights of the encoder (:func:`encode`) and its classification head."""
  k1, k2, k3, k4 = jax.random.split(key, 4)
  he = lambda k, shape, fan_in: jax.random.normal(k, shape) * np.sqrt(2.0 / fan_in)  # noqa: E731
  f1, f2 = features
  flat = (CROP_HW[0] // 4) * (CROP_HW[1] // 4) * f2
  return {"conv1": he(k1, (5, 5, 1, f1), 25), "bias1": jnp.zeros(f1),
          "conv2": he(k2, (5, 5, f1, f2), 25 * f1), "bias2": jnp.zeros(f2),
          "dense": he(k3, (flat, embedding_dim), flat), "bias3": jnp.zeros(embedding_dim),
          "head": he(k4, (embedding_dim, num_classes), embedding_dim),
          "bias4": jnp.zeros(num_classes)}


def encode(weights: dict, x: jax.Array) -> jax.Array:
  """Embeddings ``[B, F]`` of 28x28 crops ``[B, 28, 28, 1]``: conv-pool-conv-pool-dense, ReLU."""
  def conv(x, w, b):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return modules.max_pool_2x2(jax.nn.relu(y + b))
  x = conv(x, weights["conv1"], weights["bias1"])
  x = conv(x, weights["conv2"], weights["bias2"])
  return jax.nn.relu(x.reshape(x.shape[0], -1) @ weights["dense"] + weights["bias3"])


def pretrain_encoder(digits: np.ndarray, labels: np.ndarray, *, steps: int = ENCODER_STEPS,
                     batch: int = 128, seed: int = 0, learning_rate: float = 1e-3,
                     num_clutter: int = 0) -> dict:
  """Trains :func:`encode` plus a linear head to classify digits (Adam); its weights.

  ``num_clutter > 0`` adds that many random 6x6 crops of other digits of the
  batch to each 28x28 training digit (:func:`stn_jax.distortions.clutter`,
  the cluttered canvases' clutter), so that the embedding learns to ignore
  clutter inside a crop. A pure function of its arguments (the batches and the
  clutter are drawn from ``seed``).
  """
  if isinstance(num_clutter, bool) or not isinstance(num_clutter, int) or num_clutter < 0:
    raise ValueError(f"num_clutter must be an integer >= 0; got {num_clutter!r}.")
  weights = init_encoder(jax.random.key(seed))
  optimizer = optax.adam(learning_rate)
  clutter_key = jax.random.fold_in(jax.random.key(seed), 1)

  @jax.jit
  def with_clutter(x, i):
    return jnp.clip(distortions.clutter(jax.random.fold_in(clutter_key, i), x, x,
                                        num_clutter), 0.0, 1.0)

  @jax.jit
  def step(weights, opt_state, x, y):
    def loss(w):
      logits = encode(w, x) @ w["head"] + w["bias4"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    grads = jax.grad(loss)(weights)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(weights, updates), opt_state

  opt_state = optimizer.init(weights)
  rng = np.random.default_rng(seed)
  for i in range(steps):
    idx = rng.integers(0, len(digits), batch)
    x = distortions.to_float(digits[idx])
    if num_clutter:
      x = with_clutter(x, i)
    weights, opt_state = step(weights, opt_state, x, jnp.asarray(labels[idx]))
  return weights


# --- The model ------------------------------------------------------------------------------


def box_inside_canvas(raw: jax.Array, fixed_scale: Optional[float] = None) -> jax.Array:
  """Attention parameters whose box lies inside the canvas: ``[B, 3] -> [B, 3]``.

  ``s = sigmoid(raw_s)`` in ``(0, 1)`` and ``(tx, ty) = (1 - s) tanh(raw_t)``,
  so the box ``[tx - s, tx + s] x [ty - s, ty + s]`` (normalised,
  :func:`box_from_attention`) never leaves ``[-1, 1]^2``. Without this bound
  the triplet loss has a way out that needs no digit: zoom out (``s > 1``)
  until both crops are the whole canvas shrunk to a blob, which the crop at a
  random place cannot match (observed: ``s`` grew to 3-7 in 1,500 steps, 0%
  localised). Differentiable everywhere; ``raw = (logit(s0), 0, 0)`` gives a
  centred box of scale ``s0``.
  """
  v.check_rank("raw", raw, 2, "[B, 3] (raw s, tx, ty)")
  v.check_axis("raw", raw, 1, 3, "[B, 3] (raw s, tx, ty)")
  s = jax.nn.sigmoid(raw[:, :1])
  if fixed_scale is not None:   # Translation only: the box keeps the size it starts with.
    s = jnp.full_like(s, fixed_scale)
  return jnp.concatenate([s, (1 - s) * jnp.tanh(raw[:, 1:])], -1)


class InsideCanvas(nnx.Module):
  """A localisation net of kind ``'attention'`` whose box stays inside the canvas.

  Wraps a :class:`stn_jax.modules.LocalisationNet` and maps its raw output
  through :func:`box_inside_canvas`; it exposes what
  :class:`stn_jax.modules.SpatialTransformer` reads (``transform``,
  ``control_shape``, ``in_hw``).
  """

  def __init__(self, net: modules.LocalisationNet, fixed_scale: Optional[float] = None):
    if net.transform != "attention":
      raise ValueError("InsideCanvas needs an 'attention' localisation net; "
                       f"got {net.transform!r}.")
    self.net = net
    self.transform = net.transform
    self.control_shape = net.control_shape
    self.in_hw = net.in_hw
    self.fixed_scale = fixed_scale

  def __call__(self, x: jax.Array) -> jax.Array:
    return box_inside_canvas(self.net(x), self.fixed_scale)


class FrozenWeight(nnx.Variable):
  """A weight that is part of the model's state but not trained (not an ``nnx.Param``)."""


class CoLocaliser(nnx.Module):
  """One attention transformer per image and a frozen encoder of its crops.

  ``__call__(x [B, 84, 84, 1])`` returns a dict: ``params [B, 3]`` (the
  attention ``(s, tx, ty)``), ``embedding [B, F]`` of the transformer's 28x28
  crop and ``random_embedding [B, F]`` of a crop of the same scale (no
  gradient) at a uniform random place inside the canvas (drawn from the
  model's ``dropout`` RNG stream, which the training step reseeds per step;
  from a fixed key in evaluation mode). ``inside_canvas`` (default) bounds
  the box with :func:`box_inside_canvas`; ``False`` gives the raw attention
  parameters (the first runs, which zoomed out instead of localising).
  ``normalize_embeddings`` scales every embedding to unit length, so that the
  hinge's margin (1) is on the scale of the distances (squared distances in
  ``[0, 4]``) instead of the raw encoder's hundreds, where a margin of 1 is
  met by almost any pair of crops and leaves no gradient.
  """

  def __init__(self, encoder_weights: dict, *, canvas_hw: Sequence[int] = CANVAS_HW,
               initial_scale: Optional[float] = None, inside_canvas: bool = True,
               learn_scale: bool = True, normalize_embeddings: bool = False,
               rngs: nnx.Rngs):
    self.canvas_hw = v.check_hw("canvas_hw", canvas_hw)
    self.normalize_embeddings = bool(normalize_embeddings)
    loc = modules.LocalisationNet(self.canvas_hw, 1, transform="attention", downsample=4,
                                  conv=((8, 9, False),), hidden=(8, 8), rngs=rngs)
    scale = CROP_HW[0] / self.canvas_hw[0] if initial_scale is None else initial_scale
    if not (inside_canvas or learn_scale):
      raise ValueError("learn_scale=False (a fixed box size) needs inside_canvas=True.")
    if inside_canvas:
      if not 0 < scale < 1:
        raise ValueError(f"initial_scale must be in (0, 1) with inside_canvas; got {scale}.")
      loc.regression.bias[...] = jnp.asarray([np.log(scale / (1 - scale)), 0.0, 0.0],
                                             jnp.float32)
      loc = InsideCanvas(loc, fixed_scale=None if learn_scale else scale)
    else:
      loc.regression.bias[...] = jnp.asarray([scale, 0.0, 0.0], jnp.float32)
    self.st = modules.SpatialTransformer(loc, out_hw=CROP_HW)
    self.encoder_names = tuple(sorted(encoder_weights))
    for name in self.encoder_names:
      setattr(self, f"encoder_{name}", FrozenWeight(jnp.asarray(encoder_weights[name])))
    self.rngs = nnx.Rngs(dropout=rngs.dropout())
    # Evaluation mode (``model.eval()``) draws the random crops from a fixed key, so that
    # evaluating changes no state (and a restored, read-only model can be called).
    self.deterministic = False

  def embed(self, crops: jax.Array) -> jax.Array:
    """Embeddings ``[B, F]`` of crops ``[B, 28, 28, 1]`` by the frozen encoder (unit length
    with ``normalize_embeddings``; an all-zero embedding stays zero)."""
    e = encode({k: getattr(self, f"encoder_{k}")[...] for k in self.encoder_names}, crops)
    if self.normalize_embeddings:
      e = e * jax.lax.rsqrt(jnp.maximum(jnp.sum(e * e, axis=-1, keepdims=True), 1e-12))
    return e

  def __call__(self, x: jax.Array) -> dict:
    crops, params = self.st(x)
    b = x.shape[0]
    scale = jnp.clip(jax.lax.stop_gradient(jnp.abs(params[:, :1])), 0.05, 1.0)
    key = jax.random.key(0) if self.deterministic else self.rngs.dropout()
    centre = jax.random.uniform(key, (b, 2), minval=-1.0, maxval=1.0) * (1 - scale)
    random_crops = warping.warp(x, jnp.concatenate([scale, centre], -1), CROP_HW,
                                transform="attention")
    return {"params": params, "embedding": self.embed(crops),
            "random_embedding": self.embed(random_crops)}


def colocalisation_terms(outputs: dict, labels: dict, *, canvas_hw: Sequence[int] = CANVAS_HW,
                         margin: float = MARGIN):
  """Per-example ``(triplet hinge loss [B], localised [B])`` for :mod:`stn_jax.steps`.

  The loss pairs example ``2k`` with ``2k + 1`` (:func:`pair_partners`); the
  boxes in ``labels`` are used only for the metric: an example is localised
  when the IoU of its predicted box and ``labels["boxes"]`` exceeds
  :data:`IOU_THRESHOLD`.
  """
  e = outputs["embedding"]
  loss = triplet_hinge(e, pair_partners(e), outputs["random_embedding"], margin=margin)
  overlap = iou(box_from_attention(outputs["params"], canvas_hw), labels["boxes"])
  return loss, (overlap > IOU_THRESHOLD).astype(jnp.float32)


def _per_example(outputs: dict, labels: dict, *, canvas_hw, margin) -> dict:
  loss, localised = colocalisation_terms(outputs, labels, canvas_hw=canvas_hw, margin=margin)
  overlap = iou(box_from_attention(outputs["params"], canvas_hw), labels["boxes"])
  one_hot = jax.nn.one_hot(labels["classes"], 10)                      # [B, 10]
  values = {"loss": loss, "localised": localised, "iou": overlap}
  for c in range(10):
    values[f"count_{c}"] = one_hot[:, c]
    values[f"localised_{c}"] = one_hot[:, c] * localised
  return values


def _summarise(sums: dict, count: float) -> dict:
  out = {"localised": 100.0 * sums["localised"] / count, "mean_iou": sums["iou"] / count,
         "loss": sums["loss"] / count}
  for c in range(10):
    if sums[f"count_{c}"] > 0:
      out[f"localised_{c}"] = 100.0 * sums[f"localised_{c}"] / sums[f"count_{c}"]
  return out


def evaluation(*, canvas_hw: Sequence[int] = CANVAS_HW,
               margin: float = MARGIN) -> objectives.Evaluation:
  """The test metrics: ``localised`` (% of digits with box IoU > 0.5; the headline),
  ``localised_<c>`` per class, ``mean_iou`` and the triplet ``loss``."""

  def describe(outputs, labels):
    overlap = np.asarray(iou(box_from_attention(outputs["params"], canvas_hw), labels["boxes"]))
    return [f"class {c}, IoU {o:.2f}" for c, o in zip(np.asarray(labels["classes"]), overlap)]

  return objectives.Evaluation(
      functools.partial(_per_example, canvas_hw=tuple(canvas_hw), margin=margin), _summarise,
      "localised", describe)


def localised_by_class(localised: np.ndarray, classes: np.ndarray) -> dict[str, float]:
  """Percentage of examples localised per class (``"0"``..``"9"``) and overall (``"all"``)."""
  localised, classes = np.asarray(localised, np.float64), np.asarray(classes)
  out = {str(c): round(100.0 * float(localised[classes == c].mean()), 2)
         for c in range(10) if np.any(classes == c)}
  out["all"] = round(100.0 * float(localised.mean()), 2)
  return out
