"""Tests of stn_jax.distortions and stn_jax.datasets on small data made here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from stn_jax import datasets, distortions


def fake_digits(n, seed=0):
  """uint8 [n, 28, 28, 1] blobs inside the central 20x20 box, like MNIST."""
  rng = np.random.default_rng(seed)
  digits = np.zeros((n, 28, 28, 1), np.uint8)
  digits[:, 4:24, 4:24, 0] = rng.integers(0, 256, (n, 20, 20))
  return digits


@pytest.mark.parametrize("variant", distortions.VARIANTS)
def test_each_variant_shape_range_and_determinism(variant):
  digits = fake_digits(8)
  out = distortions.distort(jax.random.key(0), digits, variant)
  assert out.shape == (8,) + distortions.OUTPUT_HW[variant] + (1,) and out.dtype == jnp.float32
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0 and float(out.max()) > 0.1
  again = distortions.distort(jax.random.key(0), digits, variant)
  np.testing.assert_array_equal(out, again)
  other = distortions.distort(jax.random.key(1), digits, variant)
  assert not np.allclose(out, other)


def test_zero_rotation_and_identity_rts_return_the_digit():
  digits = distortions.to_float(fake_digits(4))
  same = distortions.rotate(jax.random.key(0), digits, max_degrees=0.0)
  np.testing.assert_allclose(same, digits, atol=1e-5)
  same = distortions.rotate_translate_scale(jax.random.key(0), digits, canvas_hw=(28, 28),
                                            max_degrees=0.0, scale_range=(1.0, 1.0))
  np.testing.assert_allclose(same, digits, atol=1e-5)
  # On the 42x42 canvas, an unrotated, unscaled digit keeps all its ink.
  placed = distortions.rotate_translate_scale(jax.random.key(0), digits, max_degrees=0.0,
                                              scale_range=(1.0, 1.0))
  np.testing.assert_allclose(placed.sum(axis=(1, 2, 3)), digits.sum(axis=(1, 2, 3)), rtol=1e-4)


def test_translated_digit_is_an_exact_copy_on_the_canvas():
  digits = distortions.to_float(fake_digits(4))
  canvas = np.asarray(distortions.translate(jax.random.key(3), digits))
  for i in range(4):
    ys, xs = np.nonzero(canvas[i, ..., 0])
    top, left = ys.min() - 4, xs.min() - 4
    np.testing.assert_array_equal(canvas[i, top:top + 28, left:left + 28], digits[i])
    assert canvas[i].sum() == pytest.approx(float(digits[i].sum()), rel=1e-6)


def test_clutter_adds_ink_from_other_digits():
  digits = distortions.to_float(fake_digits(4))
  k_pos, _ = jax.random.split(jax.random.key(0))
  plain = distortions.translate(k_pos, digits)
  cluttered = distortions.cluttered(jax.random.key(0), digits)
  assert np.all(np.asarray(cluttered) >= np.asarray(plain))
  assert float(cluttered.sum()) > float(plain.sum())


def test_addition_labels_are_sums():
  a, b = fake_digits(6, 0), fake_digits(6, 1)
  la, lb = jnp.arange(6), jnp.asarray([9, 8, 7, 0, 1, 2])
  images, labels = distortions.addition_pairs(jax.random.key(0), a, b, la, lb)
  assert images.shape == (6, 42, 42, 2)
  np.testing.assert_array_equal(labels, [9, 9, 9, 3, 5, 7])


def test_digit_sequences_labels_and_lengths():
  digits = fake_digits(40).reshape(8, 5, 28, 28, 1)
  labels = jnp.arange(40).reshape(8, 5) % 10
  images, lengths, seq = distortions.digit_sequences(jax.random.key(0), digits, labels)
  assert images.shape == (8, 64, 64, 1)
  assert np.all((lengths >= 1) & (lengths <= 5))
  for i in range(8):
    n = int(lengths[i])
    np.testing.assert_array_equal(seq[i, :n], labels[i, :n])
    np.testing.assert_array_equal(seq[i, n:], distortions.NO_DIGIT)
  # A one-digit sequence only shows the first digit: blank the others and compare.
  blank = digits.copy()
  blank[:, 1:] = 0
  images_blank, _, _ = distortions.digit_sequences(jax.random.key(0), blank, labels)
  one = np.asarray(lengths) == 1
  np.testing.assert_allclose(np.asarray(images)[one], np.asarray(images_blank)[one], atol=1e-6)


def test_batch_stream_is_resumable_and_shards_partition_the_batch():
  images, labels = fake_digits(64), np.arange(64) % 10
  stream = datasets.distorted_batches(images, labels, variant="R", global_batch=16, seed=3)
  first = [next(stream) for _ in range(6)]   # Crosses an epoch boundary (4 steps per epoch).
  resumed = datasets.distorted_batches(images, labels, variant="R", global_batch=16, seed=3,
                                       start_step=4)
  for k in range(4, 6):
    x, y = next(resumed)
    np.testing.assert_array_equal(x, first[k][0])
    np.testing.assert_array_equal(y, first[k][1])
  assert not np.array_equal(first[0][1], first[4][1])  # A new order each epoch.
  shards = [datasets.shard_of_batch(16, i, 4) for i in range(4)]
  covered = np.concatenate([np.arange(16)[s] for s in shards])
  np.testing.assert_array_equal(covered, np.arange(16))
  per_process = [next(datasets.distorted_batches(images, labels, variant="R", global_batch=16,
                                                 seed=3, process_index=i, process_count=2))
                 for i in range(2)]
  np.testing.assert_array_equal(np.concatenate([p[1] for p in per_process]), first[0][1])
  # Each example's distortion does not depend on the process count.
  np.testing.assert_allclose(np.concatenate([p[0] for p in per_process]), first[0][0], atol=1e-6)
  with pytest.raises(ValueError, match="global batch 10 must divide by the process count 4"):
    datasets.shard_of_batch(10, 0, 4)


def test_test_set_is_distorted_once_with_a_fixed_seed():
  images = fake_digits(30)
  a = datasets.distorted_test_set(images, variant="P", chunk=8)
  b = datasets.distorted_test_set(images, variant="P", chunk=8)
  assert a.shape == (30, 28, 28, 1)
  np.testing.assert_array_equal(a, b)


def test_loaders_with_mock_data():
  with tfds.testing.mock_data(num_examples=7):
    x, y = datasets.load_mnist("train")
    assert x.shape == (7, 28, 28, 1) and x.dtype == np.uint8 and y.shape == (7,)
    x, y = datasets.load_svhn_cropped("test")
    assert x.shape == (7, 32, 32, 3) and np.all((y >= 0) & (y < 10))
    x, y = datasets.load_cub("train", size=48)
    assert x.shape == (7, 48, 48, 3) and np.all((y >= 0) & (y < 200))


def test_missing_data_with_download_off_gives_one_clear_message(tmp_path, monkeypatch):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "elsewhere"))
  monkeypatch.setenv(datasets.DOWNLOAD_ENV, "0")
  with pytest.raises(datasets.DataNotFoundError) as info:
    datasets.load_mnist("test", data_dir=str(tmp_path / "empty"))
  message = str(info.value)
  assert f"'mnist' is not prepared in '{tmp_path / 'empty'}'" in message
  # It names only switches that exist: the CLI's flags, the variables, the argument.
  for named in ("--nodownload", "STN_JAX_DOWNLOAD=0", "TFDS_DATA_DIR", "--data_dir", "data_dir="):
    assert named in message
  assert "stn-jax[download]" not in message   # MNIST needs no TensorFlow
  with pytest.raises(datasets.DataNotFoundError, match=str(tmp_path / "elsewhere")):
    datasets.load_mnist("test")   # Falls back to $TFDS_DATA_DIR.
  with pytest.raises(datasets.DataNotFoundError, match="with TensorFlow installed"):
    datasets.load_svhn_cropped("test", data_dir=str(tmp_path / "empty"))   # TFDS's own download
  assert not (tmp_path / "empty").exists() and not (tmp_path / "elsewhere").exists()


def test_bad_variant_and_shape():
  with pytest.raises(ValueError, match="unknown variant 'Q'"):
    distortions.distort(jax.random.key(0), fake_digits(2), "Q")
  with pytest.raises(ValueError, match=r"digits must have shape \[B, 28, 28, 1\]; got \[2, 32, 32, 1\]"):
    distortions.distort(jax.random.key(0), np.zeros((2, 32, 32, 1), np.uint8), "R")


def test_p_corner_quads_fold_only_under_noise():
  from experiments.p_distortion_stats import quad_statistics
  assert quad_statistics(0.0, 2000) == {"not_convex": 0.0, "area_below_40pct": 0.0}
  noisy = quad_statistics(5.0, 20000)
  assert 0.005 < noisy["not_convex"] < 0.05 and noisy["area_below_40pct"] > noisy["not_convex"]
