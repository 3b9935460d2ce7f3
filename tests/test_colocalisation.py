"""Tests of stn_jax.colocalisation: triplet loss, boxes, IoU, data and the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from stn_jax import colocalisation as co
from stn_jax import datasets, modules, warping


def test_triplet_hinge_on_hand_made_embeddings():
  anchor = jnp.asarray([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
  positive = jnp.asarray([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
  negative = jnp.asarray([[0.0, 2.0], [0.0, 1.0], [1.0, 1.5]])
  # near = 1, 1, 0; far = 4, 1, 0.25
  np.testing.assert_allclose(np.asarray(co.triplet_hinge(anchor, positive, negative)),
                             [0.0, 1.0, 0.75])
  np.testing.assert_allclose(
      np.asarray(co.triplet_hinge(anchor, positive, negative, margin=3.5)), [0.5, 3.5, 3.25])


def test_triplet_hinge_gradients():
  rng = np.random.default_rng(0)
  a, p, n = (rng.standard_normal((4, 3)) for _ in range(3))
  with jax.enable_x64(True):
    args = tuple(jnp.asarray(x) for x in (a, p, n))
    check_grads(lambda *xs: co.triplet_hinge(*xs, margin=10.0), args, order=2,
                modes=["rev", "fwd"])
    ga, gp, gn = jax.grad(lambda *xs: co.triplet_hinge(*xs, margin=10.0).sum(), (0, 1, 2))(*args)
  # Active hinge: d/da = 2(a - p) - 2(a - n), d/dp = -2(a - p), d/dn = 2(a - n).
  np.testing.assert_allclose(ga, 2 * (a - p) - 2 * (a - n), atol=1e-12)
  np.testing.assert_allclose(gp, -2 * (a - p), atol=1e-12)
  np.testing.assert_allclose(gn, 2 * (a - n), atol=1e-12)
  inactive = jax.grad(lambda x: co.triplet_hinge(x, x, x + 10.0).sum())(jnp.asarray(a))
  np.testing.assert_array_equal(inactive, 0.0)


def test_pair_partners():
  np.testing.assert_array_equal(co.pair_partners(jnp.arange(6)), [1, 0, 3, 2, 5, 4])
  x = jnp.arange(8.0).reshape(4, 2)
  np.testing.assert_array_equal(co.pair_partners(x), x[jnp.asarray([1, 0, 3, 2])])
  with pytest.raises(ValueError, match="even number of examples"):
    co.pair_partners(jnp.zeros((3, 2)))


def test_iou_on_hand_made_boxes():
  a = jnp.asarray([[0.0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 4, 4], [0, 0, 0, 0],
                   [0, 0, 2, 2]])
  b = jnp.asarray([[0.0, 0, 2, 2], [3, 3, 5, 5], [1, 0, 3, 2], [1, 1, 3, 3], [0, 0, 0, 0],
                   [2, 0, 4, 2]])
  np.testing.assert_allclose(np.asarray(co.iou(a, b)), [1.0, 0.0, 1 / 3, 0.25, 0.0, 0.0],
                             atol=1e-7)
  np.testing.assert_allclose(np.asarray(co.iou(b, a)), np.asarray(co.iou(a, b)))
  with pytest.raises(ValueError, match=r"a must have shape \[..., 4\]"):
    co.iou(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="b must have a floating-point dtype"):
    co.iou(jnp.zeros((2, 4)), jnp.zeros((2, 4), jnp.int32))


def test_box_from_attention_is_the_crop_the_transformer_reads():
  params = jnp.asarray([[1 / 3, 0.0, 0.0], [1.0, 0.0, 0.0], [1 / 3, -2 / 3, 2 / 3]])
  boxes = np.asarray(co.box_from_attention(params))
  np.testing.assert_allclose(boxes, [[28, 28, 56, 56], [0, 0, 84, 84], [0, 56, 28, 84]],
                             atol=1e-4)
  canvas = np.random.default_rng(1).uniform(0, 1, (3, 84, 84, 1)).astype(np.float32)
  crops = np.asarray(warping.warp(canvas, params[jnp.asarray([0, 2, 2])], (28, 28), transform="attention"))
  np.testing.assert_allclose(crops[0], canvas[0, 28:56, 28:56], atol=1e-5)
  np.testing.assert_allclose(crops[1], canvas[1, 56:84, 0:28], atol=1e-5)
  with pytest.raises(ValueError, match=r"params must have shape \[B, 3\]"):
    co.box_from_attention(jnp.zeros((2, 6)))


def digits_and_labels(n=64):
  return datasets.synthetic_digits(n, seed=0)


@pytest.mark.parametrize("num_clutter", [0, 3])
def test_canvases_are_deterministic_and_hold_the_digit_in_its_box(num_clutter):
  digits, _ = digits_and_labels(8)
  key = jax.random.key(3)
  images, boxes = co.make_canvases(key, digits, num_clutter=num_clutter)
  again, boxes_again = co.make_canvases(key, digits, num_clutter=num_clutter)
  other, _ = co.make_canvases(jax.random.key(4), digits, num_clutter=num_clutter)
  assert images.shape == (8, 84, 84, 1) and images.dtype == jnp.float32
  assert boxes.shape == (8, 4)
  np.testing.assert_array_equal(images, again)
  np.testing.assert_array_equal(boxes, boxes_again)
  assert np.abs(np.asarray(images) - np.asarray(other)).max() > 0.5
  boxes = np.asarray(boxes).astype(int)
  assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2:] <= 84)
  np.testing.assert_array_equal(boxes[:, 2:] - boxes[:, :2], 28)
  plain, plain_boxes = co.make_canvases(key, digits, num_clutter=0)
  np.testing.assert_array_equal(boxes, np.asarray(plain_boxes).astype(int))
  for img, plain_img, box, digit in zip(np.asarray(images), np.asarray(plain), boxes, digits):
    x0, y0, x1, y1 = box
    np.testing.assert_allclose(plain_img[y0:y1, x0:x1], digit / 255.0, atol=1e-6)
    outside = plain_img.copy()
    outside[y0:y1, x0:x1] = 0
    np.testing.assert_array_equal(outside, 0.0)
    assert np.all(img >= plain_img - 1e-7)           # Clutter is pasted by maximum.
  extra = (np.asarray(images) > np.asarray(plain) + 1e-3).sum()
  assert (extra > 0) == (num_clutter > 0)


def test_pair_batches_are_pure_same_class_pairs():
  digits, labels = digits_and_labels(200)
  by_class = co.class_index(labels)
  kwargs = dict(batch=8, seed=5, num_clutter=4)
  x, y = co.pair_batch(digits, by_class, step=3, **kwargs)
  x2, y2 = co.pair_batch(digits, by_class, step=3, **kwargs)
  x3, _ = co.pair_batch(digits, by_class, step=4, **kwargs)
  assert x.shape == (8, 84, 84, 1) and y["boxes"].shape == (8, 4) and y["classes"].shape == (8,)
  np.testing.assert_array_equal(x, x2)
  np.testing.assert_array_equal(y["boxes"], y2["boxes"])
  assert not np.array_equal(x, x3)
  np.testing.assert_array_equal(y["classes"][0::2], y["classes"][1::2])
  half, half_y = co.pair_batch(digits, by_class, step=3, shard=slice(4, 8), **kwargs)
  np.testing.assert_array_equal(half, x[4:])
  np.testing.assert_array_equal(half_y["classes"], y["classes"][4:])
  _, fixed = co.pair_batch(digits, by_class, step=0, batch=6, seed=0, digit_class=7)
  np.testing.assert_array_equal(fixed["classes"], 7)
  with pytest.raises(ValueError, match="batch must be a positive even number"):
    co.pair_batch(digits, by_class, step=0, batch=7, seed=0)
  with pytest.raises(ValueError, match="digit_class must be -1"):
    co.pair_batch(digits, by_class, step=0, batch=6, seed=0, digit_class=10)
  with pytest.raises(ValueError, match=r"digits must have shape \[B, 28, 28, 1\]"):
    co.make_canvases(jax.random.key(0), np.zeros((2, 28, 28, 3), np.uint8))


def test_model_starts_centred_and_trains_only_the_localisation_net():
  digits, labels = digits_and_labels(64)
  weights = co.init_encoder(jax.random.key(0))
  model = co.CoLocaliser(weights, rngs=nnx.Rngs(params=0, dropout=0))
  x, y = co.pair_batch(digits, co.class_index(labels), batch=4, seed=0, step=0)
  out = model(jnp.asarray(x))
  assert out["params"].shape == (4, 3)
  assert out["embedding"].shape == out["random_embedding"].shape == (4, co.EMBEDDING_DIM)
  np.testing.assert_allclose(np.asarray(co.box_from_attention(out["params"])),
                             np.broadcast_to([28, 28, 56, 56], (4, 4)), atol=1e-4)
  loss, localised = co.colocalisation_terms(out, y)
  assert loss.shape == localised.shape == (4,) and np.all(np.isfinite(loss))
  expected = np.asarray(co.iou(jnp.asarray([[28.0, 28, 56, 56]]), y["boxes"])) > 0.5
  np.testing.assert_array_equal(localised, expected)
  params = nnx.state(model, nnx.Param)
  assert all("encoder" not in str(path) for path, _ in nnx.to_flat_state(params))
  assert len(nnx.to_flat_state(nnx.state(model, co.FrozenWeight))) == len(weights)

  model.eval()   # Evaluation: the random crops come from a fixed key; no state changes.
  first, second = model(jnp.asarray(x)), model(jnp.asarray(x))
  np.testing.assert_array_equal(first["random_embedding"], second["random_embedding"])
  model.train()

  def total(m):
    o = m(jnp.asarray(x))
    return co.colocalisation_terms(o, y, margin=100.0)[0].sum()
  grads = nnx.grad(total)(model)
  norms = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and sum(norms) > 0


def test_normalized_embeddings_are_unit_length_with_finite_gradients():
  digits, labels = digits_and_labels(64)
  weights = co.init_encoder(jax.random.key(0))
  model = co.CoLocaliser(weights, normalize_embeddings=True, rngs=nnx.Rngs(params=0, dropout=0))
  raw = co.CoLocaliser(weights, rngs=nnx.Rngs(params=0, dropout=0))
  x, y = co.pair_batch(digits, co.class_index(labels), batch=4, seed=0, step=0)
  out, out_raw = model(jnp.asarray(x)), raw(jnp.asarray(x))
  for name in ("embedding", "random_embedding"):
    # Unit length, except where the encoder gives exactly zero (a blank crop): zero stays zero.
    length = np.linalg.norm(np.asarray(out_raw[name]), axis=-1, keepdims=True)
    assert (length > 0).any()
    unit = np.asarray(out_raw[name]) / np.where(length > 0, length, 1.0)
    np.testing.assert_allclose(np.asarray(out[name]), unit, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out[name]), axis=-1),
                               (length[:, 0] > 0).astype(np.float32), rtol=1e-5)
  # A crop the encoder maps to zero stays zero (no 0/0).
  zero_weights = {k: jnp.zeros_like(w) for k, w in weights.items()}
  blank = co.CoLocaliser(zero_weights, normalize_embeddings=True,
                         rngs=nnx.Rngs(params=0, dropout=0))
  assert not np.asarray(blank(jnp.asarray(x))["embedding"]).any()
  grads = nnx.grad(lambda m: co.colocalisation_terms(m(jnp.asarray(x)), y)[0].sum())(model)
  norms = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and sum(norms) > 0


def test_box_inside_canvas_bounds_the_box_and_is_differentiable():
  raw = jnp.asarray([[-30.0, 30.0, -30.0], [30.0, -5.0, 5.0], [0.0, 0.0, 0.0],
                     [np.log(0.5), 0.3, -0.2]])
  params = co.box_inside_canvas(raw)
  boxes = np.asarray(co.box_from_attention(params))
  assert np.all(boxes >= -1e-4) and np.all(boxes <= 84 + 1e-4)
  np.testing.assert_allclose(np.asarray(params[2]), [0.5, 0.0, 0.0], atol=1e-7)
  np.testing.assert_allclose(float(params[3, 0]), 1 / 3, rtol=1e-6)
  assert float(params[1, 0]) <= 1.0 and np.all(np.isfinite(np.asarray(params)))
  check_grads(co.box_inside_canvas, (raw[2:],), order=1, modes=["fwd", "rev"], eps=1e-3,
              atol=1e-2, rtol=1e-2)
  with pytest.raises(ValueError, match=r"raw must have shape .*\[B, 3\]"):
    co.box_inside_canvas(jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="needs an 'attention' localisation net"):
    co.InsideCanvas(modules.LocalisationNet((28, 28), 1, transform="affine",
                                            rngs=nnx.Rngs(0)))
  weights = co.init_encoder(jax.random.key(0))
  raw_model = co.CoLocaliser(weights, inside_canvas=False, rngs=nnx.Rngs(params=0, dropout=0))
  x = jnp.zeros((2, 84, 84, 1))
  np.testing.assert_allclose(np.asarray(raw_model(x)["params"]),
                             np.broadcast_to([28 / 84, 0, 0], (2, 3)), atol=1e-6)
  with pytest.raises(ValueError, match="learn_scale=False .* needs inside_canvas=True"):
    co.CoLocaliser(weights, inside_canvas=False, learn_scale=False,
                   rngs=nnx.Rngs(params=0, dropout=0))
  with pytest.raises(ValueError, match=r"initial_scale must be in \(0, 1\)"):
    co.CoLocaliser(weights, initial_scale=1.5, rngs=nnx.Rngs(params=0, dropout=0))


def test_placement_spread_and_curriculum():
  digits, _ = digits_and_labels(16)
  key = jax.random.key(3)
  _, centred = co.make_canvases(key, digits[:16], spread=0.0)
  np.testing.assert_array_equal(np.asarray(centred), np.broadcast_to([28, 28, 56, 56], (16, 4)))
  _, half = co.make_canvases(key, digits[:16], spread=0.5)
  assert np.all(np.asarray(half)[:, :2] >= 14) and np.all(np.asarray(half)[:, :2] <= 42)
  _, anywhere = co.make_canvases(key, digits[:16])
  assert np.all(np.asarray(anywhere)[:, :2] >= 0) and np.all(np.asarray(anywhere)[:, :2] <= 56)
  np.testing.assert_allclose([co.curriculum_spread(s, steps=100, start=0.2)
                              for s in (0, 50, 100, 500)], [0.2, 0.6, 1.0, 1.0])
  assert co.curriculum_spread(7, steps=0, start=0.0) == 1.0
  with pytest.raises(ValueError, match="curriculum steps must be >= 0"):
    co.curriculum_spread(0, steps=10, start=1.5)
  fixed = co.box_inside_canvas(jnp.asarray([[5.0, 3.0, -3.0], [-5.0, 0.0, 0.0]]), 0.25)
  np.testing.assert_allclose(np.asarray(fixed[:, 0]), 0.25)
  boxes = np.asarray(co.box_from_attention(fixed))
  assert np.all(boxes >= -1e-4) and np.all(boxes <= 84 + 1e-4)


def test_localised_by_class():
  got = co.localised_by_class(np.array([1, 0, 1, 1, 0, 1]), np.array([3, 3, 5, 5, 5, 9]))
  assert got == {"3": 50.0, "5": 66.67, "9": 100.0, "all": 66.67}


def test_pretrained_encoder_is_deterministic_and_learns():
  digits, labels = digits_and_labels(64)
  a = co.pretrain_encoder(digits, labels, steps=3, batch=8, seed=1, learning_rate=1e-2)
  b = co.pretrain_encoder(digits, labels, steps=3, batch=8, seed=1, learning_rate=1e-2)
  start = co.init_encoder(jax.random.key(1))
  assert set(a) == set(start)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert any(not np.allclose(a[k], start[k]) for k in a)


def test_encoder_pretrained_with_clutter_is_deterministic_and_differs():
  digits, labels = digits_and_labels(64)
  kwargs = dict(steps=3, batch=8, seed=1, learning_rate=1e-2)
  plain = co.pretrain_encoder(digits, labels, **kwargs)
  a = co.pretrain_encoder(digits, labels, num_clutter=2, **kwargs)
  b = co.pretrain_encoder(digits, labels, num_clutter=2, **kwargs)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
    assert np.all(np.isfinite(a[k]))
  assert any(not np.allclose(a[k], plain[k]) for k in a)   # the clutter reached the training
  for bad in (-1, 1.5, True):
    with pytest.raises(ValueError, match="num_clutter must be an integer >= 0"):
      co.pretrain_encoder(digits, labels, num_clutter=bad, **kwargs)


def test_evaluation_sums_to_per_class_percentages():
  ev = co.evaluation()
  params = jnp.asarray([[1 / 3, 0.0, 0.0]] * 4)   # Every predicted box: (28, 28, 56, 56).
  boxes = jnp.asarray([[28.0, 28, 56, 56], [0, 0, 28, 28], [28, 28, 56, 56], [29, 28, 57, 56]])
  labels = {"boxes": boxes, "classes": jnp.asarray([3, 3, 5, 5])}
  outputs = {"params": params, "embedding": jnp.zeros((4, 2)),
             "random_embedding": jnp.ones((4, 2))}
  values = ev.per_example(outputs, labels)
  sums = {k: float(jnp.sum(x)) for k, x in values.items()}
  got = ev.summarise(sums, 4.0)
  assert ev.headline == "localised"
  assert got["localised"] == 75.0 and got["localised_3"] == 50.0 and got["localised_5"] == 100.0
  assert "localised_0" not in got
  np.testing.assert_allclose(got["loss"], 0.0)   # far = 2 > near + margin = 1
  assert ev.describe(outputs, labels)[1] == "class 3, IoU 0.00"
