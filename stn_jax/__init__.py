"""stn_jax: Spatial Transformer Networks in JAX and Flax.

Bottom layer, pure functions: :mod:`stn_jax.coordinates` (the coordinate
conventions), :mod:`stn_jax.grids` (grid generators), :mod:`stn_jax.sampling`
(differentiable samplers), :mod:`stn_jax.transforms` (the tables of
parameterisations and families, matrix helpers), and :func:`warp` (grid plus
sampling).
Above them, Flax NNX modules: :mod:`stn_jax.modules` (localisation nets,
spatial transformers) and :mod:`stn_jax.models` (the paper's models).
Images are channels-last ``[B, H, W, C]``; grids are ``[B, Ho, Wo, 2]`` of
normalised ``(x, y)``, as PyTorch's ``affine_grid``/``grid_sample``.
"""

from stn_jax import coordinates
from stn_jax import grids
from stn_jax import sampling
from stn_jax import transforms
from stn_jax.grids import affine_grid, control_grid, identity_grid, projective_grid, tps_grid
from stn_jax.sampling import sample
from stn_jax.transforms import identity_params, params_to_transform
from stn_jax.warping import transform_grid, warp
from stn_jax import models  # noqa: E402  (Flax layer, above the pure functions)
from stn_jax import modules  # noqa: E402
from stn_jax.modules import LocalisationNet, ParallelTransformers, SpatialTransformer

__version__ = "0.1.0"

__all__ = [
    "LocalisationNet", "ParallelTransformers", "SpatialTransformer", "models", "modules",
    "affine_grid", "control_grid", "coordinates", "grids", "identity_grid", "identity_params",
    "params_to_transform", "projective_grid", "sample", "sampling", "tps_grid",
    "transform_grid", "transforms", "warp",
]
