"""The compiled CPU kernel for bilinear, zero-padded sampling (``native/bilinear.cc``).

The C++ source is compiled on first use with the system C++ compiler
(``$CXX``, else ``g++``/``c++``) against jaxlib's XLA FFI headers
(``jax.ffi.include_dir()``), cached under ``$STN_JAX_CACHE`` (default
``~/.cache/stn_jax``) by a hash of the source, jax version and compiler, and
registered with ``jax.ffi`` for the CPU platform. Where no compiler is found
or the build fails, :func:`available` is False (with one warning saying
why) and :mod:`stn_jax.sampling` uses its pure-JAX implementation, which is
also what the kernel is tested against. ``STN_JAX_NATIVE=0`` turns it off.

Forward and backward are separate FFI calls tied by a ``jax.custom_vjp``:
the backward kernel computes the image gradient as a scatter of the four
weighted corners in one pass and the grid gradient analytically.
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

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native", "bilinear.cc")
_FORWARD = "stn_jax_bilinear_zeros_forward"
_BACKWARD = "stn_jax_bilinear_zeros_backward"


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _build(compiler: str) -> str:
  """Compiles the kernel (once per source/jax/compiler) and returns the library's path."""
  with open(SOURCE, "rb") as f:
    source = f.read()
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
  digest = hashlib.sha256(source + jax.__version__.encode() + version.encode()).hexdigest()[:16]
  cache = os.environ.get("STN_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "stn_jax")
  library = os.path.join(cache, f"libstn_bilinear_{digest}.so")
  if os.path.exists(library):
    return library
  os.makedirs(cache, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache) as tmp:
    partial = os.path.join(tmp, "lib.so")
    command = [compiler, "-O3", "-std=c++17", "-fPIC", "-shared", "-w",
               "-I", jax.ffi.include_dir(), SOURCE, "-o", partial, "-lpthread"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode:
      raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    os.replace(partial, library)   # Atomic: concurrent builders never see half a file.
  return library


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """Whether the compiled CPU kernel is built and registered (builds it on first call)."""
  if os.environ.get("STN_JAX_NATIVE", "1") == "0":
    return False
  compiler = _compiler()
  if compiler is None:
    warnings.warn("stn_jax: no C++ compiler found; using the pure-JAX sampler on CPU.")
    return False
  try:
    import ctypes
    library = ctypes.cdll.LoadLibrary(_build(compiler))
    jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(library.StnBilinearForward),
                                platform="cpu")
    jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(library.StnBilinearBackward),
                                platform="cpu")
  except Exception as error:  # noqa: BLE001 - any failure means: use the fallback.
    warnings.warn(f"stn_jax: the compiled CPU sampler is unavailable ({error}); "
                  "using the pure-JAX sampler.")
    return False
  return True


def _forward_call(images, grid, align_corners):
  out = jax.ShapeDtypeStruct(grid.shape[:-1] + images.shape[-1:], jnp.float32)
  return jax.ffi.ffi_call(_FORWARD, out, vmap_method="broadcast_all")(
      images, grid, align_corners=bool(align_corners))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def bilinear_zeros(images: jax.Array, grid: jax.Array, align_corners: bool) -> jax.Array:
  """Bilinear, zero-padded sampling of float32 ``images [..., H, W, C]`` at ``grid [..., Ho, Wo, 2]``.

  The CPU kernel; call only when :func:`available` is True (on the CPU backend).
  """
  return _forward_call(images, grid, align_corners)


def _fwd(images, grid, align_corners):
  return _forward_call(images, grid, align_corners), (images, grid)


def _bwd(align_corners, residuals, cotangent):
  images, grid = residuals
  shapes = (jax.ShapeDtypeStruct(images.shape, jnp.float32),
            jax.ShapeDtypeStruct(grid.shape, jnp.float32))
  grad_images, grad_grid = jax.ffi.ffi_call(_BACKWARD, shapes, vmap_method="broadcast_all")(
      images, grid, cotangent.astype(jnp.float32), align_corners=bool(align_corners))
  return grad_images, grad_grid


bilinear_zeros.defvjp(_fwd, _bwd)
