"""Transform parameterisations (one table of kinds, one of families), composition and inversion.

A localisation net predicts a raw vector ``params [B, P]``; a *kind* names how
that vector becomes a transform of one of three *families*:

============  ==  =========================================  ===========
kind           P  transform (acting on normalised (x, y))     family
============  ==  =========================================  ===========
affine         6  ``[[a, b, tx], [c, d, ty]]`` (row-major)     affine
attention      3  ``(s, tx, ty)``: ``[[s, 0, tx], [0, s, ty]]``  affine
translation    2  ``(tx, ty)``: ``[[1, 0, tx], [0, 1, ty]]``     affine
rotation       1  ``(phi,)`` radians, about the centre          affine
similarity     4  ``(a, b, tx, ty)``: ``[[a, -b, tx], [b, a, ty]]``
                  with ``a = s cos phi``, ``b = s sin phi``     affine
projective     8  ``[[h0, h1, h2], [h3, h4, h5], [h6, h7, 1]]``   projective
tps           2K  source control points ``[K, 2]`` (x, y)      tps
============  ==  =========================================  ===========

The affine family's transforms are ``[B, 2, 3]`` matrices, the projective
family's ``[B, 3, 3]`` homographies and the tps family's ``[B, K, 2]`` source
control points (see :func:`stn_jax.grids.tps_grid`). As in the paper, a
transform maps output (target) coordinates to input (source) coordinates.

``attention`` is the paper's constrained transform for CUB-200 and
co-localisation (isotropic scale plus translation: it crops and zooms).
Rotations act on normalised coordinates, so they are rigid in pixel space only
for square images.

The tables: :data:`TRANSFORM_KINDS` holds one :class:`TransformKind` record per
kind (name, family, number of parameters, identity parameters, parameters ->
transform) and :data:`FAMILIES` one :class:`TransformFamily` per family (the
per-example shape of its transforms and its grid function). Everything else
(:func:`params_to_transform`, :func:`stn_jax.warp`, the modules, the tests)
reads them, so a new kind is one function plus one entry, e.g. a shear::

  def _shear(params):                       # [B, 1] -> [B, 2, 3]
    one, zero = jnp.ones_like(params[:, 0]), jnp.zeros_like(params[:, 0])
    return affine_rows(one, params[:, 0], zero, zero, one, zero)

  TRANSFORM_KINDS["shear"] = fixed_kind("shear", "affine", (0.0,), _shear)

and a new family is a grid function plus a :class:`TransformFamily` entry.

Non-finite parameters: an example with any NaN or +-inf parameter gets an
all-NaN transform (so every point of its grid reads as outside and its output
is 0), and the gradient with respect to all its parameters is exactly 0 (the
output does not depend on them); other examples are unaffected.

The coordinate helpers (:func:`normalization_matrix`,
:func:`pixel_transform_to_normalized`, :func:`pixel_to_normalized`,
:func:`normalized_to_pixel`) live in :mod:`stn_jax.coordinates` and are
re-exported here under their documented names.

Every function here is pure and differentiable with respect to its array
arguments. Transforms are computed in the dtype of the parameters (integers
become float32; float64 stays float64).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from stn_jax import _validation as v
from stn_jax import coordinates
from stn_jax import grids
# Documented names (README): the coordinate helpers, re-exported.
from stn_jax.coordinates import (normalization_matrix, normalized_to_pixel,  # noqa: F401
                                 pixel_to_normalized, pixel_transform_to_normalized)

DEFAULT_CONTROL_SHAPE = (4, 4)  # The paper's TPS: a 4x4 grid of control points.


@dataclasses.dataclass(frozen=True)
class TransformFamily:
  """A form of transform and how it becomes a sampling grid.

  Attributes:
    name: the family's name, also a kind name that takes the transform itself.
    shape: per-example shape of the family's transforms; ``None`` marks a free
      axis (the number of TPS control points).
    grid: ``grid(transform [B, *shape], out_hw, align_corners, control_shape)``
      -> ``[B, Ho, Wo, 2]``; ``control_shape`` is ``None`` when the transform
      was given directly rather than as raw parameters.
  """
  name: str
  shape: tuple[Optional[int], ...]
  grid: Callable[..., jax.Array]

  def shape_str(self) -> str:
    """``'[B, 2, 3]'``-style description of a batch of transforms."""
    return v.shape_str(("B",) + tuple("K" if d is None else d for d in self.shape))

  def accepts(self, shape: Sequence[int]) -> bool:
    """Whether ``shape`` (with the batch axis) is a batch of this family's transforms."""
    return (len(shape) == 1 + len(self.shape)
            and all(d is None or d == s for d, s in zip(self.shape, shape[1:])))


@dataclasses.dataclass(frozen=True)
class TransformKind:
  """A parameterisation a localisation net predicts: raw ``[B, P]`` -> a family's transform.

  Attributes:
    name: the kind's name (``transform=`` everywhere).
    family: name of its :class:`TransformFamily`.
    num_params: ``control_shape -> P`` (``control_shape`` matters only to kinds
      built on a control grid).
    identity: ``control_shape -> [P]`` float64 parameters of the identity map.
    to_transform: ``(params [B, P], control_shape) -> [B, *family shape]``,
      in the dtype of ``params``.
  """
  name: str
  family: str
  num_params: Callable[[tuple[int, int]], int]
  identity: Callable[[tuple[int, int]], np.ndarray]
  to_transform: Callable[[jax.Array, tuple[int, int]], jax.Array]


def fixed_kind(name: str, family: str, identity: Sequence[float],
               to_transform: Callable[[jax.Array], jax.Array]) -> TransformKind:
  """A :class:`TransformKind` whose parameters do not depend on a control grid."""
  values = np.asarray(identity, np.float64)
  values.setflags(write=False)
  return TransformKind(name, family, num_params=lambda _: values.size,
                       identity=lambda _: values,
                       to_transform=lambda params, _: to_transform(params))


def affine_rows(*entries: jax.Array) -> jax.Array:
  """Six ``[B]`` arrays ``a, b, tx, c, d, ty`` -> ``[B, 2, 3]`` ``[[a, b, tx], [c, d, ty]]``."""
  return jnp.stack(entries, axis=-1).reshape(-1, 2, 3)


def _attention(p):
  s, tx, ty = p.T
  zero = jnp.zeros_like(s)
  return affine_rows(s, zero, tx, zero, s, ty)


def _translation(p):
  tx, ty = p.T
  one, zero = jnp.ones_like(tx), jnp.zeros_like(tx)
  return affine_rows(one, zero, tx, zero, one, ty)


def _rotation(p):
  c, s = jnp.cos(p[:, 0]), jnp.sin(p[:, 0])
  zero = jnp.zeros_like(c)
  return affine_rows(c, -s, zero, s, c, zero)


def _similarity(p):
  a, b, tx, ty = p.T
  return affine_rows(a, -b, tx, b, a, ty)


def _projective(p):
  return jnp.concatenate([p, jnp.ones_like(p[:, :1])], axis=1).reshape(-1, 3, 3)


def _check_control_shape(control_shape: Sequence[int]) -> tuple[int, int]:
  ny, nx = v.check_hw("control_shape", control_shape)
  if min(ny, nx) < 2:
    raise ValueError(
        "control_shape must be at least (2, 2) for a thin-plate spline (a single row or "
        f"column of control points is collinear); got {tuple(control_shape)!r}.")
  return ny, nx


_TPS_KIND = TransformKind(
    "tps", "tps",
    num_params=lambda shape: 2 * int(np.prod(_check_control_shape(shape))),
    identity=lambda shape: coordinates.control_points(*_check_control_shape(shape)).reshape(-1),
    to_transform=lambda params, _: params.reshape(params.shape[0], params.shape[1] // 2, 2))

# One record per kind; the README's table and the module docstring list them.
TRANSFORM_KINDS: dict[str, TransformKind] = {k.name: k for k in (
    fixed_kind("affine", "affine", (1, 0, 0, 0, 1, 0), lambda p: p.reshape(-1, 2, 3)),
    fixed_kind("attention", "affine", (1, 0, 0), _attention),
    fixed_kind("translation", "affine", (0, 0), _translation),
    fixed_kind("rotation", "affine", (0,), _rotation),
    fixed_kind("similarity", "affine", (1, 0, 0, 0), _similarity),
    fixed_kind("projective", "projective", (1, 0, 0, 0, 1, 0, 0, 0), _projective),
    _TPS_KIND,
)}


def _tps_family_grid(points, out_hw, align_corners, control_shape):
  target = None if control_shape is None else coordinates.control_points(*control_shape)
  return grids.tps_grid(points, out_hw, target_points=target, align_corners=align_corners)


# One record per family.
FAMILIES: dict[str, TransformFamily] = {f.name: f for f in (
    TransformFamily("affine", (2, 3), lambda m, hw, ac, _: grids.affine_grid(
        m, hw, align_corners=ac)),
    TransformFamily("projective", (3, 3), lambda m, hw, ac, _: grids.projective_grid(
        m, hw, align_corners=ac)),
    TransformFamily("tps", (None, 2), _tps_family_grid),
)}

KINDS = tuple(TRANSFORM_KINDS)  # The kind names, in table order.


def _kind(kind: str) -> TransformKind:
  v.check_choice("transform", kind, tuple(TRANSFORM_KINDS))
  return TRANSFORM_KINDS[kind]


def family(kind: str) -> str:
  """``'affine'``, ``'projective'`` or ``'tps'``: the form of ``kind``'s transforms."""
  return _kind(kind).family


def num_params(kind: str, *, control_shape: Sequence[int] = DEFAULT_CONTROL_SHAPE) -> int:
  """Length ``P`` of the raw parameter vector of ``kind``."""
  return _kind(kind).num_params(tuple(control_shape))


def identity_params(kind: str, *, control_shape: Sequence[int] = DEFAULT_CONTROL_SHAPE,
                    dtype=jnp.float32) -> jax.Array:
  """The raw ``[P]`` vector whose transform is the identity.

  Used as the bias of a localisation net's last layer (whose weights start at
  zero), so that a fresh spatial transformer is the identity map.
  """
  return jnp.asarray(_kind(kind).identity(tuple(control_shape)), dtype=dtype)


def params_to_transform(kind: str, params: jax.Array, *,
                        control_shape: Sequence[int] = DEFAULT_CONTROL_SHAPE) -> jax.Array:
  """Maps raw parameters ``[B, P]`` to ``kind``'s transform (see the module table).

  An example with a non-finite parameter gets an all-NaN transform and a zero
  gradient (see the module docstring).

  Returns:
    ``[B, 2, 3]`` for the affine family, ``[B, 3, 3]`` for ``projective`` and
    ``[B, K, 2]`` source control points for ``tps``, in the dtype of ``params``
    (float32 for integer ``params``).
  """
  record = _kind(kind)
  control_shape = tuple(control_shape)
  p = record.num_params(control_shape)
  v.check_rank("params", params, 2, f"[B, {p}]")
  if np.shape(params)[1] != p:
    extra = f" (a {control_shape[0]}x{control_shape[1]} control grid)" if kind == "tps" else ""
    raise ValueError(
        f"params for transform {kind!r}{extra} must have shape [B, {p}]; "
        f"got {v.shape_str(np.shape(params))}.")
  params = jnp.asarray(params)
  if not jnp.issubdtype(params.dtype, jnp.floating):
    params = params.astype(jnp.float32)
  # Double where: the kind's function only sees finite parameters (the
  # identity's, for a non-finite example), so no inf/NaN partial derivative
  # multiplies the zero cotangent of a NaN example.
  finite = jnp.isfinite(params).all(axis=-1, keepdims=True)
  identity = jnp.asarray(record.identity(control_shape), params.dtype)
  transform = record.to_transform(jnp.where(finite, params, identity), control_shape)
  finite = finite.reshape((-1,) + (1,) * (transform.ndim - 1))
  return jnp.where(finite, transform, jnp.asarray(jnp.nan, transform.dtype))


def _check_matrix(name: str, m) -> None:
  if np.ndim(m) < 2 or np.shape(m)[-2:] not in ((2, 3), (3, 3)):
    raise ValueError(
        f"{name} must be an affine [..., 2, 3] or projective [..., 3, 3] matrix; "
        f"got shape {v.shape_str(np.shape(m))}.")


def to_homogeneous(matrix: jax.Array) -> jax.Array:
  """``[..., 2, 3]`` affine matrices to ``[..., 3, 3]`` (appends ``(0, 0, 1)``); 3x3 unchanged."""
  _check_matrix("matrix", matrix)
  matrix = jnp.asarray(matrix)
  if matrix.shape[-2] == 3:
    return matrix
  last = jnp.broadcast_to(jnp.asarray([0, 0, 1], matrix.dtype), matrix.shape[:-2] + (1, 3))
  return jnp.concatenate([matrix, last], axis=-2)


def _matmul(a, b):
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def compose(outer: jax.Array, inner: jax.Array) -> jax.Array:
  """The transform ``x -> outer(inner(x))``.

  Both are affine ``[..., 2, 3]`` or projective ``[..., 3, 3]`` matrices (batch
  axes broadcast). The result is affine if both are, projective otherwise.
  Since transforms map output to input coordinates, warping with ``inner`` and
  then warping the result with ``outer`` equals one warp with
  ``compose(inner, outer)``.
  """
  _check_matrix("outer", outer)
  _check_matrix("inner", inner)
  both_affine = np.shape(outer)[-2] == 2 and np.shape(inner)[-2] == 2
  product = _matmul(to_homogeneous(outer), to_homogeneous(inner))
  return product[..., :2, :] if both_affine else product


def invert(matrix: jax.Array) -> jax.Array:
  """Inverse of affine ``[..., 2, 3]`` or projective ``[..., 3, 3]`` matrices.

  An affine inverse is affine. A projective inverse is returned scaled so its
  bottom-right entry is 1 where that entry is not ~0 (homographies are defined
  up to scale). Singular matrices give non-finite entries.
  """
  _check_matrix("matrix", matrix)
  matrix = jnp.asarray(matrix)
  if matrix.shape[-2] == 2:
    linear, shift = matrix[..., :2], matrix[..., 2:]
    inv_linear = jnp.linalg.inv(linear)
    return jnp.concatenate([inv_linear, -_matmul(inv_linear, shift)], axis=-1)
  inv = jnp.linalg.inv(matrix)
  scale = inv[..., 2:, 2:]
  ok = jnp.abs(scale) > grids.PROJECTIVE_EPS
  return inv / jnp.where(ok, scale, 1.0)
