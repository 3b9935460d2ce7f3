"""Tests of stn_jax.transforms and stn_jax.warp."""

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.test_util import check_grads

import stn_jax
from stn_jax import transforms

SIZES = {"affine": 6, "attention": 3, "translation": 2, "rotation": 1, "similarity": 4,
         "projective": 8, "tps": 32}


@pytest.mark.parametrize("kind", transforms.KINDS)
def test_identity_params_give_identity_grid(kind):
  p = stn_jax.identity_params(kind)
  assert p.shape == (SIZES.get(kind, p.size),) == (transforms.num_params(kind),)
  grid = stn_jax.transform_grid(jnp.tile(p, (2, 1)), (5, 7), transform=kind)
  np.testing.assert_allclose(grid, jnp.broadcast_to(stn_jax.identity_grid((5, 7)), grid.shape),
                             atol=1e-6)


def test_params_to_transform_values():
  s, tx, ty = 0.5, 0.1, -0.2
  np.testing.assert_allclose(
      stn_jax.params_to_transform("attention", jnp.asarray([[s, tx, ty]])),
      [[[s, 0, tx], [0, s, ty]]])
  np.testing.assert_allclose(
      stn_jax.params_to_transform("translation", jnp.asarray([[tx, ty]])),
      [[[1, 0, tx], [0, 1, ty]]])
  phi = 0.3
  np.testing.assert_allclose(
      stn_jax.params_to_transform("rotation", jnp.asarray([[phi]])),
      [[[np.cos(phi), -np.sin(phi), 0], [np.sin(phi), np.cos(phi), 0]]], atol=1e-7)
  np.testing.assert_allclose(
      stn_jax.params_to_transform("similarity", jnp.asarray([[0.8, 0.6, tx, ty]])),
      [[[0.8, -0.6, tx], [0.6, 0.8, ty]]])
  np.testing.assert_allclose(
      stn_jax.params_to_transform("projective", jnp.arange(8.0)[None]),
      [[[0, 1, 2], [3, 4, 5], [6, 7, 1]]])
  assert stn_jax.params_to_transform("tps", jnp.zeros((3, 18)), control_shape=(3, 3)).shape == (3, 9, 2)


def _apply(matrix, points):
  homog = np.concatenate([points, np.ones((len(points), 1))], 1) @ np.asarray(matrix).T
  return homog[:, :2] / homog[:, 2:] if homog.shape[1] == 3 else homog


@pytest.mark.parametrize("shapes", [(2, 2), (2, 3), (3, 2), (3, 3)])
def test_compose_applies_inner_then_outer(shapes):
  rng = np.random.default_rng(0)
  def random_matrix(rows):
    m = np.eye(3)[:rows] + 0.2 * rng.standard_normal((rows, 3))
    if rows == 3:
      m[2] = [0.1 * rng.standard_normal(), 0.1 * rng.standard_normal(), 1.0]
    return m
  outer, inner = random_matrix(shapes[0]), random_matrix(shapes[1])
  with jax.enable_x64(True):
    composed = np.asarray(transforms.compose(jnp.asarray(outer), jnp.asarray(inner)))
  assert composed.shape == ((2, 3) if shapes == (2, 2) else (3, 3))
  points = rng.uniform(-1, 1, (10, 2))
  np.testing.assert_allclose(_apply(composed, points), _apply(outer, _apply(inner, points)),
                             atol=1e-12)


@pytest.mark.parametrize("rows", [2, 3])
def test_invert_round_trips(rows):
  rng = np.random.default_rng(1)
  m = np.eye(3)[:rows] + 0.2 * rng.standard_normal((4, rows, 3))
  with jax.enable_x64(True):
    inv = transforms.invert(jnp.asarray(m))
    assert inv.shape == m.shape
    ident = transforms.to_homogeneous(transforms.compose(inv, jnp.asarray(m)))
  ident = np.asarray(ident) / np.asarray(ident)[:, 2:, 2:]
  np.testing.assert_allclose(ident, np.broadcast_to(np.eye(3), ident.shape), atol=1e-12)


def test_compose_equals_sequential_warps():
  """Warping by inner then by outer is one warp by compose(inner, outer)."""
  rng = np.random.default_rng(2)
  images = jnp.asarray(rng.uniform(0, 1, (1, 16, 16, 1)))
  inner = np.asarray([[[1.0, 0, 0.25], [0, 1, 0]]])     # Shift by 2 pixels.
  outer = np.asarray([[[0, -1.0, 0], [1, 0, 0]]])       # Quarter turn.
  two_steps = stn_jax.warp(stn_jax.warp(images, inner), outer)
  one_step = stn_jax.warp(images, transforms.compose(jnp.asarray(inner), jnp.asarray(outer)))
  # Compare away from the borders, where the two-step warp lost pixels.
  np.testing.assert_allclose(np.asarray(two_steps)[0, 3:-3, 3:-3],
                             np.asarray(one_step)[0, 3:-3, 3:-3], atol=1e-5)


@pytest.mark.parametrize("align_corners", [False, True])
def test_coordinate_helpers_round_trip_and_agree(align_corners):
  hw = (6, 9)
  rng = np.random.default_rng(3)
  pix = rng.uniform(-2, 10, (5, 2))
  norm = transforms.pixel_to_normalized(jnp.asarray(pix), hw, align_corners=align_corners)
  np.testing.assert_allclose(transforms.normalized_to_pixel(norm, hw, align_corners=align_corners),
                             pix, atol=1e-5)
  m = np.asarray(transforms.normalization_matrix(hw, align_corners=align_corners))
  np.testing.assert_allclose(_apply(m, pix), norm, atol=1e-6)
  # The corner pixel centres and edges land where the convention says.
  corner = transforms.pixel_to_normalized(jnp.asarray([[0.0, 0.0], [8.0, 5.0]]), hw,
                                          align_corners=align_corners)
  expected = [[-1, -1], [1, 1]] if align_corners else [[-1 + 1 / 9, -1 + 1 / 6], [1 - 1 / 9, 1 - 1 / 6]]
  np.testing.assert_allclose(corner, expected, atol=1e-6)


def test_pixel_space_transform_converts_to_normalised():
  """A pixel translation by (+1, 0), expressed in normalised form, shifts by one pixel."""
  hw = (5, 8)
  pixel_shift = jnp.asarray([[1.0, 0, 1], [0, 1, 0], [0, 0, 1]])
  theta = transforms.pixel_transform_to_normalized(pixel_shift, hw, hw)[None, :2]
  images = jnp.asarray(np.random.default_rng(4).standard_normal((1,) + hw + (1,)), jnp.float32)
  out = stn_jax.warp(images, theta)
  np.testing.assert_allclose(out[:, :, :-1], images[:, :, 1:], atol=1e-5)


@pytest.mark.parametrize("kind", transforms.KINDS)
def test_warp_check_grads_wrt_params(kind):
  rng = np.random.default_rng(5)
  with jax.enable_x64(True):
    images = jnp.asarray(rng.uniform(0, 1, (2, 7, 7, 1)))
    params = stn_jax.identity_params(kind, dtype=jnp.float64)
    params = jnp.tile(params, (2, 1)) + 0.05 * jnp.asarray(rng.standard_normal((2, params.size)))
    f = functools.partial(stn_jax.warp, out_hw=(5, 6), transform=kind, method="bicubic")
    # Bicubic is C1: first-order checks everywhere, second order with care.
    check_grads(lambda p: f(images, p), (params,), order=1, eps=1e-5, atol=1e-4, rtol=1e-4)


def test_warp_accepts_matrices_and_params_alike():
  rng = np.random.default_rng(6)
  images = jnp.asarray(rng.uniform(0, 1, (2, 6, 6, 3)), jnp.float32)
  params = jnp.asarray(stn_jax.identity_params("projective")[None] + 0.1 * rng.standard_normal((2, 8)),
                       jnp.float32)
  matrix = stn_jax.params_to_transform("projective", params)
  np.testing.assert_allclose(stn_jax.warp(images, params, (4, 5), transform="projective"),
                             stn_jax.warp(images, matrix, (4, 5), transform="projective"), atol=1e-6)
  np.testing.assert_allclose(
      stn_jax.warp(images, params, (4, 5), transform="projective"),
      stn_jax.sample(images, stn_jax.projective_grid(matrix, (4, 5))), atol=1e-6)
  assert stn_jax.warp(images, jnp.zeros((2, 2, 3))).shape == (2, 6, 6, 3)  # out_hw defaults to input.
  tps = jnp.tile(stn_jax.identity_params("tps", control_shape=(3, 3)), (2, 1))
  np.testing.assert_allclose(stn_jax.warp(images, tps, transform="tps", control_shape=(3, 3)),
                             images, atol=1e-5)


class WarpVariantsTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*transforms.KINDS)
  def test_identity_warp(self, kind):
    images = jnp.asarray(np.random.default_rng(7).uniform(0, 1, (2, 5, 5, 2)), jnp.float32)
    params = jnp.tile(stn_jax.identity_params(kind), (2, 1))
    out = self.variant(functools.partial(stn_jax.warp, transform=kind))(images, params)
    chex.assert_shape(out, images.shape)
    np.testing.assert_allclose(out, images, atol=1e-5)


BAD_TRANSFORM_CASES = [
    (lambda: stn_jax.identity_params("shear"), r"unknown transform 'shear'; expected one of 'affine', 'attention'"),
    (lambda: stn_jax.params_to_transform("affine", np.zeros((2, 5))), r"params for transform 'affine' must have shape \[B, 6\]; got \[2, 5\]"),
    (lambda: stn_jax.params_to_transform("tps", np.zeros((2, 18))), r"params for transform 'tps' \(a 4x4 control grid\) must have shape \[B, 32\]; got \[2, 18\]"),
    (lambda: stn_jax.params_to_transform("affine", np.zeros(6)), r"params must have rank 2 with shape \[B, 6\]; got rank 1"),
    (lambda: transforms.compose(np.eye(2), np.eye(3)), r"outer must be an affine \[..., 2, 3\] or projective \[..., 3, 3\] matrix; got shape \[2, 2\]"),
    (lambda: stn_jax.warp(np.zeros((2, 4, 4, 1)), np.zeros((2, 2, 3)), transform="attention"), r"theta for transform 'attention' must have shape \[B, 3\]; got \[2, 2, 3\]"),
    (lambda: stn_jax.warp(np.zeros((2, 4, 4, 1)), np.zeros((2, 3, 3))), r"theta for transform 'affine' must have shape \[B, 6\] or \[B, 2, 3\]; got \[2, 3, 3\]"),
    (lambda: stn_jax.warp(np.zeros((2, 4, 4, 1)), np.zeros((3, 6))), r"images and theta must have the same batch size; got images \[2, 4, 4, 1\] and theta \[3, 6\]"),
    (lambda: stn_jax.warp(np.zeros((4, 4, 1)), np.zeros((3, 6))), r"images must have rank 4"),
    (lambda: stn_jax.warp(np.zeros((2, 4, 4, 1)), np.zeros((2, 6)), (4, -1)), r"out_hw must be a pair of positive integers"),
    (lambda: stn_jax.transform_grid(np.zeros((2, 16, 3)), (4, 4), transform="tps"), r"theta for transform 'tps' must have shape \[B, 32\] or \[B, K, 2\]; got \[2, 16, 3\]"),
    (lambda: transforms.num_params("tps", control_shape=(1, 4)), r"control_shape must be at least \(2, 2\) for a thin-plate spline .*; got \(1, 4\)"),
    (lambda: transforms.pixel_transform_to_normalized(np.eye(2), (4, 4), (4, 4)), r"matrix must be a pixel-space affine \[..., 2, 3\] or projective \[..., 3, 3\] matrix; got shape \[2, 2\]"),
]


@pytest.mark.parametrize("call,message", BAD_TRANSFORM_CASES)
def test_bad_input_raises_value_error(call, message):
  with pytest.raises(ValueError, match=message):
    call()


# --- The tables: every test below runs for every kind and family entry. -------------------

RECORDS = list(transforms.TRANSFORM_KINDS.values())
CONTROL_SHAPE = (3, 2)  # A non-square control grid, so nothing assumes sqrt(K).


def _noisy_identity(record, batch, rng, scale=0.05):
  ident = record.identity(CONTROL_SHAPE)
  return ident + scale * rng.standard_normal((batch, ident.size))


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
def test_kind_record_is_consistent(record):
  assert record.family in transforms.FAMILIES
  p = record.num_params(CONTROL_SHAPE)
  assert record.identity(CONTROL_SHAPE).shape == (p,)
  assert transforms.num_params(record.name, control_shape=CONTROL_SHAPE) == p
  assert transforms.family(record.name) == record.family
  params = jnp.asarray(_noisy_identity(record, 3, np.random.default_rng(0)), jnp.float32)
  transform = stn_jax.params_to_transform(record.name, params, control_shape=CONTROL_SHAPE)
  assert transforms.FAMILIES[record.family].accepts(transform.shape), transform.shape
  assert transform.dtype == jnp.float32
  with pytest.raises(ValueError, match=rf"params for transform {record.name!r}.* must have "
                                       rf"shape \[B, {p}\]; got \[3, {p + 1}\]"):
    stn_jax.params_to_transform(record.name, jnp.zeros((3, p + 1)), control_shape=CONTROL_SHAPE)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
def test_kind_identity_gives_identity_grid_and_warp(record, align_corners):
  params = jnp.tile(stn_jax.identity_params(record.name, control_shape=CONTROL_SHAPE), (2, 1))
  kw = dict(transform=record.name, control_shape=CONTROL_SHAPE, align_corners=align_corners)
  grid = stn_jax.transform_grid(params, (4, 7), **kw)
  expected = stn_jax.identity_grid((4, 7), align_corners=align_corners)
  np.testing.assert_allclose(grid, jnp.broadcast_to(expected, grid.shape), atol=1e-6)
  images = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (2, 4, 7, 3)), jnp.float32)
  np.testing.assert_allclose(stn_jax.warp(images, params, **kw), images, atol=1e-5)
  # An empty batch gives an empty grid.
  empty = stn_jax.transform_grid(params[:0], (4, 7), **kw)
  assert empty.shape == (0, 4, 7, 2)


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
def test_kind_grid_gradients_and_jit(record):
  rng = np.random.default_rng(2)
  with jax.enable_x64(True):
    params = jnp.asarray(_noisy_identity(record, 2, rng))
    f = lambda p: stn_jax.transform_grid(p, (3, 4), transform=record.name,
                                          control_shape=CONTROL_SHAPE)
    check_grads(f, (params,), order=2, modes=("rev",))
    np.testing.assert_allclose(jax.jit(f)(params), f(params), rtol=0, atol=1e-14)


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.name)
def test_non_finite_parameter_is_outside_with_zero_finite_gradient(record):
  """One NaN/+-inf entry: that example reads nothing, and no NaN reaches any gradient."""
  rng = np.random.default_rng(3)
  images = jnp.asarray(rng.uniform(0, 1, (2, 5, 5, 1)), jnp.float32)
  good = jnp.asarray(_noisy_identity(record, 2, rng), jnp.float32)
  kw = dict(transform=record.name, control_shape=CONTROL_SHAPE)
  loss = jax.jit(lambda p: (stn_jax.warp(images, p, **kw) ** 2).sum(axis=(1, 2, 3)))
  grad = jax.jit(jax.grad(lambda p: loss(p).sum()))
  clean_loss, clean_grad = loss(good), grad(good)
  for entry in range(good.shape[1]):
    for value in (np.nan, np.inf, -np.inf):
      bad = good.at[1, entry].set(value)
      transform = stn_jax.params_to_transform(record.name, bad, control_shape=CONTROL_SHAPE)
      assert np.all(np.isnan(transform[1])) and np.array_equal(
          transform[0], stn_jax.params_to_transform(record.name, good, control_shape=CONTROL_SHAPE)[0])
      got_loss, got_grad = loss(bad), grad(bad)
      assert got_loss[1] == 0.0 and got_loss[0] == clean_loss[0]
      assert np.all(np.isfinite(got_grad)), (entry, value)
      np.testing.assert_array_equal(got_grad[1], 0.0)
      np.testing.assert_array_equal(got_grad[0], clean_grad[0])


@pytest.mark.parametrize("family", list(transforms.FAMILIES.values()), ids=lambda f: f.name)
def test_family_entry_grid_of_identity(family):
  record = transforms.TRANSFORM_KINDS[family.name]  # The kind that takes the transform itself.
  ident = record.to_transform(jnp.asarray(record.identity((2, 2)))[None], (2, 2))
  assert family.accepts(ident.shape) and not family.accepts(ident.shape + (1,))
  grid = stn_jax.transform_grid(ident, (3, 5), transform=family.name)
  np.testing.assert_allclose(grid[0], stn_jax.identity_grid((3, 5)), atol=1e-6)
  wrong = np.zeros((1,) + tuple(3 if d is None else d + 1 for d in family.shape))
  with pytest.raises(ValueError, match=re.escape(f"or {family.shape_str()}; got")):
    stn_jax.transform_grid(wrong, (3, 5), transform=family.name)


def test_a_new_kind_is_one_table_entry(monkeypatch):
  """The module docstring's shear example: one function, one entry, and warp takes it."""
  def shear(params):
    one, zero = jnp.ones_like(params[:, 0]), jnp.zeros_like(params[:, 0])
    return transforms.affine_rows(one, params[:, 0], zero, zero, one, zero)
  monkeypatch.setitem(transforms.TRANSFORM_KINDS, "shear",
                      transforms.fixed_kind("shear", "affine", (0.0,), shear))
  images = jnp.asarray(np.random.default_rng(4).uniform(0, 1, (1, 6, 6, 1)), jnp.float32)
  np.testing.assert_allclose(stn_jax.warp(images, jnp.zeros((1, 1)), transform="shear"), images,
                             atol=1e-6)
  sheared = stn_jax.warp(images, jnp.asarray([[0.5]]), transform="shear")
  expected = stn_jax.warp(images, jnp.asarray([[[1.0, 0.5, 0.0], [0.0, 1.0, 0.0]]]))
  np.testing.assert_allclose(sheared, expected, atol=1e-6)


def test_pixel_transform_to_normalized_matches_float64_numpy():
  """float64 stays float64 (it used to round the normalisation to float32)."""
  rng = np.random.default_rng(5)
  h = np.eye(3) + 0.1 * rng.standard_normal((3, 3))
  for align_corners in (False, True):
    for in_hw, out_hw in (((28, 28), (42, 42)), ((5, 1), (1, 7))):
      def norm(hw, inverse):
        m = np.eye(3)
        for axis, n in enumerate(hw[::-1]):   # x along the width, y along the height
          scale = (n - 1) / 2 if align_corners else n / 2
          offset = (n - 1) / 2
          m[axis, axis], m[axis, 2] = (scale, offset) if inverse else (
              (1 / scale, -offset / scale) if scale else (0.0, 0.0))
        return m
      expected = norm(in_hw, False) @ h @ norm(out_hw, True)
      with jax.enable_x64(True):
        got = transforms.pixel_transform_to_normalized(jnp.asarray(h), in_hw, out_hw,
                                                       align_corners=align_corners)
        assert got.dtype == jnp.float64
      np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
