"""The compiled CPU kernel for bilinear, zero-padded sampling (``native/bilinear.cc``).

The C++ source is compiled on first use with the system C++ compiler
(``$CXX``, else ``g++``/``c++``) against jaxlib's XLA FFI headers
(``jax.ffi.include_dir()``), cached under ``$STN_JAX_CACHE`` (default
``~/.cache/stn_jax``) by a hash of the source, jax version, compiler, flags and (for
the ``-march=native`` build, tried first) the CPU's instruction set, and
registered with ``jax.ffi`` for the CPU platform. Where no compiler is found
or the build fails, :func:`available` is False (with one warning saying
why and what it costs) and :mod:`stn_jax.sampling` uses its pure-JAX
implementation (:mod:`stn_jax.sampler_gather`), which is also what the kernel
is tested against. ``STN_JAX_NATIVE=0`` turns it off.

Differentiation. :func:`bilinear_zeros` binds a JAX primitive (made with
``jax.extend``) with its own rules, so that every transformation works:
``grad``, ``vjp``, ``jvp``, ``jacfwd``, ``jacrev``, ``hessian``, ``grad`` of
``grad``, ``linear_transpose``, ``vmap`` of any of them, ``jit``, ``pmap``:

* its JVP is a second primitive, ``tangent(d_images, d_grid, images, grid) =
  sample(d_images, grid) + J(images, grid) . d_grid``, linear in
  ``(d_images, d_grid)``, with ``J [..., C, 2]`` the derivative with respect
  to each normalised point (computed by a kernel, pixel-centre rule included:
  :data:`stn_jax.sampling.PIXEL_CENTRE_TOLERANCE` is passed to the kernels);
* the transpose of ``tangent`` is the backward kernel (image and grid
  gradients in one pass).

So first-order reverse mode (training) runs the forward kernel and the
backward kernel, as fast as a ``custom_vjp`` pair, and forward mode runs
kernels too. Beyond first order, the derivatives of ``tangent`` and of the
backward kernel are the pure-JAX sampler's (``jax.jvp`` of it), so
higher-order results equal the pure-JAX path's.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir

from stn_jax import sampler_axes
from stn_jax import sampler_gather

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native", "bilinear.cc")
# FFI target name -> the library's handler symbol.
_TARGETS = {"stn_jax_bilinear_zeros_forward": "StnBilinearForward",
            "stn_jax_bilinear_zeros_value_and_jacobian": "StnBilinearValueAndJacobian",
            "stn_jax_bilinear_zeros_backward": "StnBilinearBackward"}
_FORWARD, _VALUE_AND_JACOBIAN, _BACKWARD = _TARGETS
# What the fallback costs, from docs/benchmarks/results.md (pure-JAX / compiled
# sampler, forward+backward, the paper's shapes on a 2-core CPU).
_SLOWER = ("the pure-JAX sampler it falls back to is 3.5-5x slower in forward+backward on CPU "
           "(docs/benchmarks/results.md)")


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


# -O3 for the loops; -fno-trapping-math lets the compiler vectorise the comparisons (it
# changes no result, only floating-point exception flags, which nothing reads);
# -ffp-contract=off keeps a * b + c two roundings (as the pure-JAX reference and the tests
# assume) where the target has fused multiply-adds.
_FLAGS = ("-O3", "-ffp-contract=off", "-fno-trapping-math", "-std=c++17", "-fPIC", "-shared", "-w")
# Tried first: this CPU's vector instructions (AVX2/AVX-512 gathers vectorise the forward
# loop); the portable build is the fallback where the compiler does not take the flag.
_HOST_FLAGS = ("-march=native",)


def _host_cpu() -> bytes:
  """What identifies this CPU's instruction set, for the cache key of a -march=native build."""
  import platform
  identity = platform.machine() + platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      identity += "".join(sorted({line for line in f
                                  if line.startswith(("flags", "model name", "Features"))}))
  except OSError:
    pass
  return identity.encode()


def _build(compiler: str) -> str:
  """Compiles the kernel (once per source/jax/compiler/flags/CPU) and returns the library's path."""
  with open(SOURCE, "rb") as f:
    source = f.read()
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
  cache = os.environ.get("STN_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "stn_jax")
  builds = []   # (flags, cached library): this CPU's build first, then the portable one
  for extra in (_HOST_FLAGS, ()):
    key = source + jax.__version__.encode() + version.encode() + " ".join(_FLAGS + extra).encode()
    if extra:
      key += _host_cpu()
    builds.append((extra, os.path.join(
        cache, f"libstn_bilinear_{hashlib.sha256(key).hexdigest()[:16]}.so")))
  for _, library in builds:   # a cached build of either kind: no compiler run at all
    if os.path.exists(library):
      return library
  os.makedirs(cache, exist_ok=True)
  errors = []
  for extra, library in builds:
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
      partial = os.path.join(tmp, "lib.so")
      command = [compiler, *_FLAGS, *extra, "-I", jax.ffi.include_dir(), SOURCE, "-o", partial,
                 "-lpthread"]
      result = subprocess.run(command, capture_output=True, text=True)
      if result.returncode == 0:
        os.replace(partial, library)   # Atomic: concurrent builders never see half a file.
        return library
      errors.append(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
  raise RuntimeError("\n".join(errors))


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """Whether the compiled CPU kernel is built and registered (builds it on first call)."""
  if os.environ.get("STN_JAX_NATIVE", "1") == "0":
    return False
  compiler = _compiler()
  if compiler is None:
    warnings.warn("stn_jax: no C++ compiler found, so the compiled CPU sampler is not built; "
                  f"{_SLOWER}. Install a C++ compiler (e.g. `apt-get install g++`, or set $CXX) "
                  "and restart, or set STN_JAX_NATIVE=0 to use the pure-JAX sampler silently.")
    return False
  try:
    import ctypes
    library = ctypes.cdll.LoadLibrary(_build(compiler))
    for target, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform="cpu")
  except Exception as error:  # noqa: BLE001 - any failure means: use the fallback.
    warnings.warn(f"stn_jax: the compiled CPU sampler is unavailable ({error}); {_SLOWER}. "
                  "Fix the compiler error above, or set STN_JAX_NATIVE=0 to use the pure-JAX "
                  "sampler silently.")
    return False
  return True




# --- The kernels as functions of arrays ------------------------------------------------------
# Shapes: images [B, H, W, C], grid [B, Ho, Wo, 2], values and cotangents [B, Ho, Wo, C]; float32.


def _centre_tolerance():
  return np.float32(sampler_axes.PIXEL_CENTRE_TOLERANCE)


def _forward_call(images, grid, *, align_corners: bool):
  out = jax.ShapeDtypeStruct(grid.shape[:-1] + images.shape[-1:], jnp.float32)
  return jax.ffi.ffi_call(_FORWARD, out, vmap_method="broadcast_all")(
      images, grid, align_corners=align_corners)


def _jacobian_call(images, grid, *, align_corners: bool):
  """``[B, Ho, Wo, C, 2]``: the derivative of the values with respect to the normalised (x, y)."""
  shape = grid.shape[:-1] + images.shape[-1:]
  outs = (jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct(shape + (2,), jnp.float32))
  return jax.ffi.ffi_call(_VALUE_AND_JACOBIAN, outs, vmap_method="broadcast_all")(
      images, grid, align_corners=align_corners, centre_tolerance=_centre_tolerance())[1]


def _tangent_call(d_images, d_grid, images, grid, *, align_corners: bool):
  """The JVP ``sample(d_images, grid) + J(images, grid) . d_grid`` by the kernels."""
  jacobian = _jacobian_call(images, grid, align_corners=align_corners)
  return (_forward_call(d_images, grid, align_corners=align_corners)
          + (jacobian * d_grid[..., None, :]).sum(-1))


def _reference(images, grid, align_corners: bool):
  """The pure-JAX sampler: the kernels' oracle and their derivatives beyond first order."""
  return sampler_gather.sample(images, grid, "bilinear", "zeros", align_corners)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _backward(images, grid, cotangent, align_corners: bool):
  """``(image gradient, grid gradient)`` of ``cotangent`` by the backward kernel."""
  shapes = (jax.ShapeDtypeStruct(images.shape, jnp.float32),
            jax.ShapeDtypeStruct(grid.shape, jnp.float32))
  return jax.ffi.ffi_call(_BACKWARD, shapes, vmap_method="broadcast_all")(
      images, grid, cotangent, align_corners=align_corners,
      centre_tolerance=_centre_tolerance())


def _reference_backward(images, grid, cotangent, align_corners: bool):
  return jax.vjp(lambda i, g: _reference(i, g, align_corners), images, grid)[1](cotangent)


@_backward.defjvp
def _backward_jvp(align_corners, primals, tangents):
  return jax.jvp(functools.partial(_reference_backward, align_corners=align_corners),
                 primals, tangents)


def _reference_tangent(d_images, d_grid, images, grid, align_corners: bool):
  return jax.jvp(lambda i, g: _reference(i, g, align_corners), (images, grid),
                 (d_images, d_grid))[1]


# --- Two primitives and their rules -----------------------------------------------------------
# sample(images, grid), and its JVP tangent(d_images, d_grid, images, grid), linear in
# (d_images, d_grid), whose transpose is the backward kernel.


def _out_aval(images, grid):
  return jax.core.ShapedArray(grid.shape[:-1] + images.shape[-1:], jnp.float32)


def _fold_batch(primitive, args, dims, **params):
  """Batching rule: folds the mapped axis into the batch axis (every rule sees ``[B, ...]``)."""
  size = next(x.shape[d] for x, d in zip(args, dims) if d is not None)
  args = [jnp.broadcast_to(x, (size,) + x.shape) if d is None else jnp.moveaxis(x, d, 0)
          for x, d in zip(args, dims)]
  out = primitive.bind(*(x.reshape((-1,) + x.shape[2:]) for x in args), **params)
  return out.reshape((size, -1) + out.shape[1:]), 0


_sample_p = jex_core.Primitive("stn_jax_bilinear_zeros")
_sample_p.def_impl(_forward_call)
_sample_p.def_abstract_eval(lambda images, grid, *, align_corners: _out_aval(images, grid))
mlir.register_lowering(_sample_p, mlir.lower_fun(_forward_call, multiple_results=False),
                       platform="cpu")

_tangent_p = jex_core.Primitive("stn_jax_bilinear_zeros_tangent")
_tangent_p.def_impl(_tangent_call)
_tangent_p.def_abstract_eval(
    lambda d_images, d_grid, images, grid, *, align_corners: _out_aval(images, grid))
mlir.register_lowering(_tangent_p, mlir.lower_fun(_tangent_call, multiple_results=False),
                       platform="cpu")


def _sample_jvp(primals, tangents, *, align_corners):
  images, grid = primals
  d_images, d_grid = (ad.instantiate_zeros(t) for t in tangents)
  return (_sample_p.bind(images, grid, align_corners=align_corners),
          _tangent_p.bind(d_images, d_grid, images, grid, align_corners=align_corners))


def _sample_transpose(cotangent, images, grid, *, align_corners):
  # Linear in the images (jax.linear_transpose); the grid gradient is not needed.
  if ad.is_undefined_primal(grid):
    raise ValueError("bilinear sampling is linear in the images, not in the grid.")
  if type(cotangent) is ad.Zero:
    return [None, None]
  zeros = jnp.zeros(images.aval.shape, jnp.float32)
  return [_backward(zeros, grid, cotangent, align_corners)[0], None]


def _tangent_transpose(cotangent, d_images, d_grid, images, grid, *, align_corners):
  if ad.is_undefined_primal(images) or ad.is_undefined_primal(grid):
    raise ValueError("the bilinear tangent is linear in (d_images, d_grid) only.")
  if type(cotangent) is ad.Zero:
    return [None] * 4
  grad_images, grad_grid = _backward(images, grid, cotangent, align_corners)
  return [grad_images if ad.is_undefined_primal(d_images) else None,
          grad_grid if ad.is_undefined_primal(d_grid) else None, None, None]


def _tangent_jvp(primals, tangents, *, align_corners):
  # Second order and beyond: the pure-JAX sampler's derivatives.
  return jax.jvp(functools.partial(_reference_tangent, align_corners=align_corners), primals,
                 tuple(ad.instantiate_zeros(t) for t in tangents))


ad.primitive_jvps[_sample_p] = _sample_jvp
ad.primitive_jvps[_tangent_p] = _tangent_jvp
ad.primitive_transposes[_sample_p] = _sample_transpose
ad.primitive_transposes[_tangent_p] = _tangent_transpose
batching.primitive_batchers[_sample_p] = functools.partial(_fold_batch, _sample_p)
batching.primitive_batchers[_tangent_p] = functools.partial(_fold_batch, _tangent_p)


def bilinear_zeros(images: jax.Array, grid: jax.Array, align_corners: bool) -> jax.Array:
  """Bilinear, zero-padded sampling of float32 ``images [B, H, W, C]`` at ``grid [B, Ho, Wo, 2]``.

  Returns ``[B, Ho, Wo, C]`` float32, equal to ``stn_jax.sampling.sample(images,
  grid, align_corners=align_corners, implementation='xla')`` to float32 rounding,
  derivatives of every order included (see the module docstring). Call only
  when :func:`available` is True (on the CPU backend).
  """
  return _sample_p.bind(images, grid, align_corners=bool(align_corners))
