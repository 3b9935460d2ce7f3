"""The compiled CPU kernels: bilinear, zero-padded sampling (``native/bilinear.cc``) and convolution (``native/convolution.cc``).

The C++ sources are compiled (into one library) on first use with the system C++ compiler
(``$CXX``, else ``g++``/``c++``) against jaxlib's XLA FFI headers
(``jax.ffi.include_dir()``), cached under ``$STN_JAX_CACHE`` (default
``~/.cache/stn_jax``) by a hash of the source, jax version, compiler, flags and (for
the ``-march=native`` build, tried first) the CPU's instruction set, and
registered with ``jax.ffi`` for the CPU platform. Where no compiler is found
or the build fails, :func:`available` is False (with one warning saying
why and what it costs) and :mod:`stn_jax.sampling` uses its pure-JAX
implementation (:mod:`stn_jax.sampler_gather`), which is also what the kernel
is tested against, and :mod:`stn_jax.convolution` XLA's convolutions.
``STN_JAX_NATIVE=0`` turns both off.

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

_NATIVE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native")
# Compiled together into one library; the header is part of the cache key.
SOURCES = tuple(os.path.join(_NATIVE_DIR, name) for name in ("bilinear.cc", "convolution.cc"))
_HEADERS = (os.path.join(_NATIVE_DIR, "parallel.h"),)
# FFI target name -> the library's handler symbol.
_TARGETS = {"stn_jax_bilinear_zeros_forward": "StnBilinearForward",
            "stn_jax_bilinear_zeros_value_and_jacobian": "StnBilinearValueAndJacobian",
            "stn_jax_bilinear_zeros_backward": "StnBilinearBackward",
            "stn_jax_conv_forward": "StnConvForward",
            "stn_jax_conv_kernel_gradient": "StnConvKernelGradient"}
_FORWARD, _VALUE_AND_JACOBIAN, _BACKWARD, _CONV_FORWARD, _CONV_KERNEL_GRADIENT = _TARGETS
# What the fallback costs, from docs/benchmarks/results.md (pure-JAX / compiled
# sampler, forward+backward, the paper's shapes on a 2-core CPU) and the training step
# with XLA's convolutions instead of the kernels (README, "Speed").
_SLOWER = ("the pure-JAX sampler it falls back to is 3.5-5x slower in forward+backward on CPU "
           "(docs/benchmarks/results.md), and with XLA's convolutions the ST-CNN training step "
           "is about 1.6x slower")


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


# -O3 for the loops; -fno-trapping-math lets the compiler vectorise the comparisons (it
# changes no result, only floating-point exception flags, which nothing reads);
# -ffp-contract=off keeps a * b + c two roundings (as the pure-JAX reference and the tests
# assume) where the target has fused multiply-adds; native/convolution.cc turns contraction
# back on for itself (a pragma): its results are compared to XLA's within a tolerance.
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
  source = b""
  for path in SOURCES + _HEADERS:
    with open(path, "rb") as f:
      source += f.read()
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
  cache = os.environ.get("STN_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "stn_jax")
  builds = []   # (flags, cached library): this CPU's build first, then the portable one
  for extra in (_HOST_FLAGS, ()):
    key = source + jax.__version__.encode() + version.encode() + " ".join(_FLAGS + extra).encode()
    if extra:
      key += _host_cpu()
    builds.append((extra, os.path.join(
        cache, f"libstn_native_{hashlib.sha256(key).hexdigest()[:16]}.so")))
  for _, library in builds:   # a cached build of either kind: no compiler run at all
    if os.path.exists(library):
      return library
  os.makedirs(cache, exist_ok=True)
  errors = []
  for extra, library in builds:
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
      partial = os.path.join(tmp, "lib.so")
      command = [compiler, *_FLAGS, *extra, "-I", jax.ffi.include_dir(), *SOURCES, "-o",
                 partial, "-lpthread"]
      result = subprocess.run(command, capture_output=True, text=True)
      if result.returncode == 0:
        os.replace(partial, library)   # Atomic: concurrent builders never see half a file.
        return library
      errors.append(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
  raise RuntimeError("\n".join(errors))


@functools.lru_cache(maxsize=None)
def available() -> bool:
  """Whether the compiled CPU kernels are built and registered (builds them on first call)."""
  if os.environ.get("STN_JAX_NATIVE", "1") == "0":
    return False
  compiler = _compiler()
  if compiler is None:
    warnings.warn("stn_jax: no C++ compiler found, so the compiled CPU kernels (sampler and "
                  f"convolutions) are not built; {_SLOWER}. Install a C++ compiler (e.g. "
                  "`apt-get install g++`, or set $CXX) and restart, or set STN_JAX_NATIVE=0 to "
                  "use the pure-JAX sampler and XLA's convolutions silently.")
    return False
  try:
    import ctypes
    library = ctypes.cdll.LoadLibrary(_build(compiler))
    for target, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                  platform="cpu")
  except Exception as error:  # noqa: BLE001 - any failure means: use the fallback.
    warnings.warn(f"stn_jax: the compiled CPU kernels are unavailable ({error}); {_SLOWER}. "
                  "Fix the compiler error above, or set STN_JAX_NATIVE=0 to use the pure-JAX "
                  "sampler and XLA's convolutions silently.")
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


# --- Convolution: two bilinear primitives ------------------------------------------------------
# conv(x, kernel; padding): x [N, H, W, C] zero-padded by padding = ((top, bottom), (left,
# right)), kernel [KH, KW, C, O] -> [N, H + top + bottom - KH + 1, W + left + right - KW + 1, O],
# a stride-1 correlation (lax.conv_general_dilated with NHWC/HWIO/NHWC), and its kernel
# gradient kernel_gradient(x, g; kernel_hw, padding) -> [KH, KW, C, O], sum over (n, y, x) of
# padded_x[n, y + ky, x + kx, c] g[n, y, x, o]. Both are bilinear and each transpose is one of
# the two: the input gradient is conv of the cotangent, padded by (KH - 1 - top, KH - 1 -
# bottom) and (KW - 1 - left, KW - 1 - right), with the flipped, transposed kernel (so padding
# may not exceed KH - 1, KW - 1). Derivatives of every order run the kernels.


def _padded_width(channels: int) -> int:
  return -(-channels // 8) * 8


def _pad(x, padding):
  return jnp.pad(x, [(0, 0), *padding, (0, 0)]) if any(map(any, padding)) else x


def _conv_call(x, kernel, *, padding):
  x = _pad(x, padding)
  kh, kw, _, o = kernel.shape
  padded = jnp.pad(kernel, [(0, 0), (0, 0), (0, 0), (0, _padded_width(o) - o)])
  n, h, w, _ = x.shape
  out = jax.ShapeDtypeStruct((n, h - kh + 1, w - kw + 1, o), jnp.float32)
  return jax.ffi.ffi_call(_CONV_FORWARD, out)(x, padded)


def _kernel_gradient_call(x, g, *, kernel_hw, padding):
  out = jax.ShapeDtypeStruct((*kernel_hw, x.shape[-1], g.shape[-1]), jnp.float32)
  return jax.ffi.ffi_call(_CONV_KERNEL_GRADIENT, out)(
      _pad(x, padding), g, padded_width=np.int64(_padded_width(g.shape[-1])))


def _conv_reference(x, kernel, *, padding):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _kernel_gradient_reference(x, g, *, kernel_hw, padding):
  kernel = jnp.zeros((*kernel_hw, x.shape[-1], g.shape[-1]), x.dtype)
  return jax.vjp(lambda k: _conv_reference(x, k, padding=padding), kernel)[1](g)[0]


def _conv_shape(x, kernel, *, padding):
  (top, bottom), (left, right) = padding
  return jax.core.ShapedArray((x.shape[0], x.shape[1] + top + bottom - kernel.shape[0] + 1,
                               x.shape[2] + left + right - kernel.shape[1] + 1,
                               kernel.shape[3]), jnp.float32)


_conv_p = jex_core.Primitive("stn_jax_conv")
_conv_p.def_impl(_conv_call)
_conv_p.def_abstract_eval(_conv_shape)
_kernel_gradient_p = jex_core.Primitive("stn_jax_conv_kernel_gradient")
_kernel_gradient_p.def_impl(_kernel_gradient_call)
_kernel_gradient_p.def_abstract_eval(lambda x, g, *, kernel_hw, padding: jax.core.ShapedArray(
    (*kernel_hw, x.shape[-1], g.shape[-1]), jnp.float32))
for _primitive, _call, _reference_fn in ((_conv_p, _conv_call, _conv_reference),
                                         (_kernel_gradient_p, _kernel_gradient_call,
                                          _kernel_gradient_reference)):
  mlir.register_lowering(_primitive, mlir.lower_fun(_call, multiple_results=False),
                         platform="cpu")
  # Elsewhere (only reached if a program binds them for another platform): XLA's convolution.
  mlir.register_lowering(_primitive, mlir.lower_fun(_reference_fn, multiple_results=False))


# Input gradients with fewer channels than this are products over patches (the kernel would
# pad C output channels to 8 and waste most of its work).
MIN_KERNEL_INPUT_GRADIENT_CHANNELS = 5


def _patch_input_gradient(g, kernel, padding):
  """The input gradient as the transpose of ``patches(padded x) @ kernel matrix`` (pure JAX)."""
  from stn_jax import convolution   # the patches' layout; imported here (it imports this module)
  kh, kw, c, o = kernel.shape
  (top, bottom), (left, right) = padding
  n, ho, wo, _ = g.shape
  shape = (n, ho + kh - 1 - top - bottom, wo + kw - 1 - left - right, c)

  def forward(x):
    return jnp.einsum("bhwk,ko->bhwo", convolution.patches(_pad(x, padding), (kh, kw)),
                      kernel.reshape(kh * kw * c, o))
  return jax.linear_transpose(forward, jax.ShapeDtypeStruct(shape, g.dtype))(g)[0]


def _input_gradient(g, kernel, padding):
  """The transpose of ``conv(., kernel; padding)`` applied to the cotangent ``g``."""
  kh, kw, c, _ = kernel.shape
  if c < MIN_KERNEL_INPUT_GRADIENT_CHANNELS:
    return _patch_input_gradient(g, kernel, padding)
  (top, bottom), (left, right) = padding
  return _conv_p.bind(g, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2),
                      padding=((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)))


ad.defbilinear(
    _conv_p,
    lambda ct, x, kernel, *, padding: _input_gradient(ct, kernel, padding),
    lambda ct, x, kernel, *, padding: _kernel_gradient_p.bind(
        x, ct, kernel_hw=tuple(kernel.aval.shape[:2]), padding=padding))
ad.defbilinear(
    _kernel_gradient_p,
    lambda ct, x, g, *, kernel_hw, padding: _input_gradient(g, ct, padding),
    lambda ct, x, g, *, kernel_hw, padding: _conv_p.bind(x, ct, padding=padding))


def _conv_batch(args, dims, *, padding):
  (x, kernel), (x_dim, kernel_dim) = args, dims
  if kernel_dim is None:   # a batch of inputs, one kernel: fold the batch axis into N
    x = jnp.moveaxis(x, x_dim, 0)
    out = _conv_p.bind(x.reshape((-1,) + x.shape[2:]), kernel, padding=padding)
    return out.reshape(x.shape[:2] + out.shape[1:]), 0
  reference = functools.partial(_conv_reference, padding=padding)
  return jax.vmap(reference, in_axes=dims)(x, kernel), 0


def _kernel_gradient_batch(args, dims, **params):
  # Per-example kernel gradients and other batched uses: XLA's convolution.
  reference = functools.partial(_kernel_gradient_reference, **params)
  return jax.vmap(reference, in_axes=dims)(*args), 0


batching.primitive_batchers[_conv_p] = _conv_batch
batching.primitive_batchers[_kernel_gradient_p] = _kernel_gradient_batch


def conv_padding_fits(padding, kernel_hw) -> bool:
  """Whether ``padding`` is ``((top, bottom), (left, right))``, each in ``[0, kernel size - 1]``."""
  return (len(padding) == 2 and all(len(pair) == 2 for pair in padding)
          and all(0 <= p < k for pair, k in zip(padding, kernel_hw) for p in pair))


def conv(x: jax.Array, kernel: jax.Array,
         padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))) -> jax.Array:
  """Stride-1 convolution of float32 ``x [N, H, W, C]``, zero-padded, with ``kernel [KH, KW, C, O]``.

  ``padding`` is ``((top, bottom), (left, right))``, each between 0 and the
  kernel's size less one. Returns ``[N, H + top + bottom - KH + 1, W + left +
  right - KW + 1, O]`` float32, equal within float32 rounding (sums run in
  another order, with fused multiply-adds) to ``lax.conv_general_dilated(x,
  kernel, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))``.
  Differentiable to any order in both arguments (reverse and forward mode run
  the kernels), ``vmap``-able. Call only when :func:`available` is True (on the
  CPU backend).
  """
  padding = tuple(tuple(int(p) for p in pair) for pair in padding)
  kernel_hw = kernel.shape[:2]
  if not conv_padding_fits(padding, kernel_hw):
    raise ValueError(f"padding must be ((top, bottom), (left, right)) between 0 and the kernel "
                     f"size less one, {tuple(k - 1 for k in kernel_hw)}; got {padding}")
  return _conv_p.bind(x, kernel, padding=padding)
