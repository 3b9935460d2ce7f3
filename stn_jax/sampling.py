"""Differentiable image sampling at the points of a grid.

:func:`sample` reads ``images [B, H, W, C]`` at the normalised points
``(x, y)`` of a ``grid [B, Ho, Wo, 2]`` and returns ``[B, Ho, Wo, C]``
(conventions in :mod:`stn_jax.coordinates`: ``x`` along the width, -1..1
from the left/top edge (``align_corners=False``) or corner pixel centre
(True); the grid holds, for each output pixel, the input point it reads).

Methods:

* ``'bilinear'``: the paper's kernel ``max(0, 1 - |x|)`` per axis.
* ``'nearest'``: the nearest pixel (ties round to even, as ``grid_sample``);
  zero gradient with respect to the grid.
* ``'bicubic'``: Keys' cubic convolution (``a = -0.75``) over 4x4 pixels.

Padding modes (what points outside the image read): ``'zeros'`` (0),
``'border'`` (the nearest border pixel) and ``'reflection'`` (the image
mirrored at the corner pixel centres with ``align_corners=True``, at the
outer edges otherwise; for ``'bicubic'`` each of the 16 taps is padded, as
in ``grid_sample``).

Grid points that are not finite (NaN, +-inf) are outside the image in every
padding mode: they read 0 and no NaN reaches the output or any gradient.
Finite coordinates beyond :data:`COORD_LIMIT` are clamped to it.

**The gradient at pixel centres.** The bilinear kernel has a corner at every
pixel centre, so the derivative there is one-sided, and which side a point
falls on is a rounding accident (an identity grid computes 4.0 in one place
and 3.9999999999999996 in another, eagerly or under ``jit``). Every newly
initialised spatial transformer samples exactly there. We define it: where
the pixel coordinate ``c`` of a point along an axis is within
:data:`PIXEL_CENTRE_TOLERANCE` ``= 1e-4`` pixel of an integer ``n``, the
derivative of the bilinear output with respect to ``c`` is the mean of the
two one-sided derivatives, ``(v[n + 1] - v[n - 1]) / 2`` (the padding mode's
values outside the image: 0 for ``'zeros'``) -- the central difference, what
a jittered point gets on average. Values are unchanged. 1e-4 pixel exceeds
the rounding error of float32 coordinate arithmetic on images up to ~500
pixels (one float32 ulp of 448 is 3e-5), is far below any sub-pixel offset
a model uses, and a 1e-9 pixel nudge in float64 does not cross it. Every
bilinear backend implements the rule (tested equal at and near centres).
Padding applies to the taps, so the same rule gives the derivative at the
corners of ``'border'``/``'reflection'`` at the image border (the mean of
the one-sided derivatives there too). Keys' cubic kernel has a continuous
derivative at the taps and needs no rule (tested).

**PyTorch parity.** Values match ``grid_sample`` (images channels-last) for
every method, padding mode and ``align_corners``, except one case: an axis
of one pixel with ``align_corners=True`` and ``'zeros'`` padding, where
``grid_sample`` maps every coordinate to that pixel, so points however far
outside read the image (PyTorch issue #15386); here points with ``|x| > 1``
(or ``|y| > 1``) along such an axis are outside and read 0. Gradients match
``grid_sample``'s except within :data:`PIXEL_CENTRE_TOLERANCE` of a pixel
centre along an axis (bilinear), where PyTorch takes whichever one-sided
derivative rounding picks and we take their mean.

**Backends.** :data:`BACKENDS` lists the implementations, what each supports
and its function; ``implementation=`` names one, or ``'auto'`` (default)
lets :func:`choose_implementation` pick per platform, shape and dtype:

=========  ======================  ================  ===============  ============================
name       methods                 padding modes     dtypes           platforms
=========  ======================  ================  ===============  ============================
``xla``    all                     all               all floating     all (pure-JAX gathers)
``native`` bilinear                zeros             float32          CPU (compiled kernel)
``matmul`` bilinear                all               all floating     all (gather-free products)
=========  ======================  ================  ===============  ============================

The choice follows the platform the program is *lowered* for
(``lax.platform_dependent``), not the process's default device, so a
program traced on a CPU machine lowers for TPU or GPU without the CPU
kernel (e.g. with ``jax.export``). Policy: CPU: ``native`` where it applies
and was built, else ``xla``; GPU: ``xla`` (no GPU measurement exists yet);
TPU: ``matmul`` for bilinear sampling of images of at most
:data:`TPU_MATMUL_MAX_PIXELS` pixels whose first product's intermediate is
at most :data:`MATMUL_MAX_INTERMEDIATE_BYTES`, else ``xla`` (a cost model,
not a measurement: see :func:`choose_implementation`).

All backends agree to float32 rounding, gradients included, and support
``jit``, ``vmap``, ``grad``, ``jvp``, ``jacfwd``, ``hessian`` and higher
orders. Images may be float32, bfloat16, float16 or float64; weights and
sums are computed in at least float32 and the result has the images' dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from stn_jax import _native
from stn_jax import _validation as v
from stn_jax import sampler_gather
from stn_jax import sampler_matmul
from stn_jax.sampler_axes import COORD_LIMIT, PIXEL_CENTRE_TOLERANCE

__all__ = ["BACKENDS", "Backend", "COORD_LIMIT", "IMPLEMENTATIONS", "METHODS",
           "MATMUL_MAX_INTERMEDIATE_BYTES", "PADDING_MODES", "PIXEL_CENTRE_TOLERANCE", "PLATFORMS",
           "TPU_MATMUL_MAX_PIXELS", "check_sample_args", "choose_implementation", "sample"]

METHODS = ("bilinear", "nearest", "bicubic")
PADDING_MODES = ("zeros", "border", "reflection")
# Lowering platforms 'auto' chooses for (lax.platform_dependent's names).
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
# TPU policy (a cost model; no TPU measurement yet). The matmul path spends
# H * (W + 1) / 4 multiply-adds per element the gather path gathers: at most
# ~1,000 for 64x64 images, below what a TPU's matrix unit does in the time of
# one gathered element (order 10^13-10^14 multiply-adds/s against order
# 10^9-10^10 gathered elements/s), and its backward pass is more products
# where the gather path's is a scatter, TPUs' slowest operation.
TPU_MATMUL_MAX_PIXELS = 64 * 64
# ... and its [B, Ho*Wo, H, C] intermediate must stay small next to device memory.
MATMUL_MAX_INTERMEDIATE_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class Backend:
  """One sampler implementation and what it supports.

  ``function(images, grid, method, padding_mode, align_corners)`` takes
  checked arguments (and a batch of at least one point). ``dtypes`` is None
  for every floating dtype, else the dtypes both ``images`` and ``grid``
  must have; ``platforms`` lists the lowering platforms it runs on;
  ``available`` says whether it can run in this process.
  """
  name: str
  function: Callable[..., jax.Array]
  methods: tuple[str, ...]
  padding_modes: tuple[str, ...]
  dtypes: Optional[tuple[str, ...]]
  platforms: tuple[str, ...]
  available: Callable[[], bool]
  description: str

  def refusal(self, method: str, padding_mode: str, images_dtype, grid_dtype) -> Optional[str]:
    """Why this backend cannot take these arguments (a sentence), or None if it can."""
    dtypes = (jnp.dtype(images_dtype).name, jnp.dtype(grid_dtype).name)
    if (method in self.methods and padding_mode in self.padding_modes
        and (self.dtypes is None or set(dtypes) <= set(self.dtypes))):
      return None
    def allowed(name, values, every):
      if tuple(values) == tuple(every):
        return None
      return f"{name}={values[0]!r}" if len(values) == 1 else f"{name} in {tuple(values)}"
    wants = [a for a in (allowed("method", self.methods, METHODS),
                         allowed("padding_mode", self.padding_modes, PADDING_MODES)) if a]
    if self.dtypes is not None:
      wants.append(f"{'/'.join(self.dtypes)} images and grid")
    return (f"implementation={self.name!r} takes {', '.join(wants)}; got method={method!r}, "
            f"padding_mode={padding_mode!r}, images {dtypes[0]} and grid {dtypes[1]}.")


def _native_sample(images, grid, method, padding_mode, align_corners):
  del method, padding_mode  # Bilinear and zeros only (the table says so).
  return _native.bilinear_zeros(images, grid, bool(align_corners))


BACKENDS: dict[str, Backend] = {b.name: b for b in [
    Backend("xla", sampler_gather.sample, METHODS, PADDING_MODES, None, PLATFORMS,
            lambda: True, "pure-JAX gathers (stn_jax.sampler_gather), the reference"),
    Backend("native", _native_sample, ("bilinear",), ("zeros",), ("float32",), ("cpu",),
            _native.available, "compiled C++ kernel through jax.ffi (stn_jax._native)"),
    Backend("matmul", sampler_matmul.sample, sampler_matmul.METHODS, PADDING_MODES, None,
            PLATFORMS, lambda: True, "gather-free batched products (stn_jax.sampler_matmul)"),
]}
IMPLEMENTATIONS = ("auto",) + tuple(BACKENDS)


def choose_implementation(platform: str, method: str, padding_mode: str, images_shape,
                          grid_shape, images_dtype, grid_dtype) -> str:
  """The backend ``implementation='auto'`` uses when lowering for ``platform``.

  Args:
    platform: a lowering platform, one of :data:`PLATFORMS`.
    method, padding_mode: as :func:`sample`'s.
    images_shape, grid_shape: ``[B, H, W, C]`` and ``[B, Ho, Wo, 2]``.
    images_dtype, grid_dtype: their dtypes.

  Returns:
    A key of :data:`BACKENDS`: on ``'cpu'``, ``'native'`` where it supports
    the arguments and is available in a process whose default backend is
    the CPU (so accelerator hosts never build it), else ``'xla'``; on
    ``'cuda'``/``'rocm'``, ``'xla'`` (not yet measured on a GPU); on
    ``'tpu'``, ``'matmul'`` for bilinear sampling when ``H * W <=``
    :data:`TPU_MATMUL_MAX_PIXELS` and the intermediate is at most
    :data:`MATMUL_MAX_INTERMEDIATE_BYTES` (a cost model: see the constants),
    else ``'xla'``.
  """
  v.check_choice("platform", platform, PLATFORMS)
  def fits(name):
    return BACKENDS[name].refusal(method, padding_mode, images_dtype, grid_dtype) is None
  if platform == "cpu":
    if fits("native") and jax.default_backend() == "cpu" and BACKENDS["native"].available():
      return "native"
  elif platform == "tpu":
    _, h, w, _ = images_shape
    if (fits("matmul") and h * w <= TPU_MATMUL_MAX_PIXELS
        and sampler_matmul.intermediate_bytes(images_shape, grid_shape)
        <= MATMUL_MAX_INTERMEDIATE_BYTES):
      return "matmul"
  return "xla"


def check_sample_args(images, grid, method: str, padding_mode: str) -> None:
  """Raises ``ValueError`` for arguments :func:`sample` cannot take."""
  v.check_rank("images", images, 4, "[B, H, W, C]")
  v.check_floating("images", images)
  v.check_rank("grid", grid, 4, "[B, Ho, Wo, 2]")
  v.check_axis("grid", grid, 3, 2, "[B, Ho, Wo, 2] (last axis (x, y))")
  v.check_floating("grid", grid)
  v.check_same_batch("images", images, "grid", grid)
  v.check_choice("method", method, METHODS)
  v.check_choice("padding_mode", padding_mode, PADDING_MODES)
  if 0 in jnp.shape(images)[1:3]:
    raise ValueError("images must have at least one pixel along H and W, shape [B, H, W, C] "
                     f"with H, W >= 1; got {v.shape_str(jnp.shape(images))}.")


def _single_pixel_axes_outside(grid, hw, padding_mode: str, align_corners: bool):
  """Marks points outside ``[-1, 1]`` along an axis of one pixel as outside (``+inf``).

  With ``align_corners=True`` such an axis maps every coordinate to its one
  pixel, so zeros padding would never apply (PyTorch #15386).
  """
  if padding_mode != "zeros" or not align_corners or 1 not in hw:
    return grid
  h, w = hw
  outside = [(jnp.abs(grid[..., k]) > 1) if size == 1 else False for k, size in enumerate((w, h))]
  return jnp.where((outside[0] | outside[1])[..., None], jnp.inf, grid)


def sample(images: jax.Array, grid: jax.Array, *, method: str = "bilinear",
           padding_mode: str = "zeros", align_corners: bool = False,
           implementation: str = "auto") -> jax.Array:
  """Samples ``images`` at the normalised points of ``grid``.

  Args:
    images: ``[B, H, W, C]`` floating-point images (any number of channels).
    grid: ``[B, Ho, Wo, 2]`` points ``(x, y)`` in normalised coordinates.
    method: ``'bilinear'`` (default), ``'nearest'`` or ``'bicubic'``.
    padding_mode: ``'zeros'`` (default), ``'border'`` or ``'reflection'``.
    align_corners: whether -1 and 1 are corner pixel centres (True) or edges.
    implementation: ``'auto'`` (default: :func:`choose_implementation` per
      lowering platform) or a key of :data:`BACKENDS` (``'xla'``,
      ``'native'``, ``'matmul'``), which raises ``ValueError`` for arguments
      it does not support (``RuntimeError`` where it is unavailable).

  Returns:
    ``[B, Ho, Wo, C]`` in the dtype of ``images`` (empty if ``B``, ``Ho``,
    ``Wo`` or ``C`` is 0). Differentiable with respect to ``images`` and
    ``grid`` (see the module docstring for the rules).
  """
  check_sample_args(images, grid, method, padding_mode)
  v.check_choice("implementation", implementation, IMPLEMENTATIONS)
  images, grid = jnp.asarray(images), jnp.asarray(grid)
  align_corners = bool(align_corners)
  if implementation != "auto":
    backend = BACKENDS[implementation]
    refusal = backend.refusal(method, padding_mode, images.dtype, grid.dtype)
    if refusal:
      raise ValueError(refusal)
    if not backend.available():
      raise RuntimeError(f"implementation={implementation!r} is unavailable in this process "
                         "(see the warning above; STN_JAX_NATIVE=0 turns the CPU kernel off).")
  b, h, w, c = images.shape
  _, ho, wo, _ = grid.shape
  if 0 in (b, ho, wo, c):
    return jnp.zeros((b, ho, wo, c), images.dtype)
  grid = _single_pixel_axes_outside(grid, (h, w), padding_mode, align_corners)
  args = (method, padding_mode, align_corners)
  if implementation != "auto":
    return BACKENDS[implementation].function(images, grid, *args)
  choice = {p: choose_implementation(p, method, padding_mode, images.shape, grid.shape,
                                     images.dtype, grid.dtype) for p in PLATFORMS}
  def run(name):
    return lambda i, g: BACKENDS[name].function(i, g, *args)
  if len(set(choice.values())) == 1:
    return run(choice["cpu"])(images, grid)
  per_platform = {p: run(name) for p, name in choice.items() if name != "xla"}
  return jax.lax.platform_dependent(images, grid, default=run("xla"), **per_platform)
